"""`ctlb services`: every frontend with its backends, like a NAT table dump."""

from __future__ import annotations

import argparse

from ctlb import statefile
from ctlb.cli import common
from ctlb.datapath import inspect, tables

EPILOG = """examples:
  ctlb services
  ctlb services --json | jq '.[] | select(.service | startswith("default/"))'
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("services", help="frontends and their backends, as programmed", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_location_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def collect(args: argparse.Namespace) -> list[dict[str, object]]:
    found = inspect.inspect(args.bpffs)
    if found is None:
        return []
    agent = statefile.read(args.run_dir)
    names = agent.services if agent else {}
    kinds = agent.frontend_kinds if agent else {}
    rows: list[dict[str, object]] = []
    for fe, value in sorted(found.programmed.frontends.items()):
        backends = found.programmed.sets.get((fe.address.version, value.set_id), ()) if value.count else ()
        rows.append({
            "frontend": str(fe),
            "kind": kinds.get(str(fe), ""),
            "service": names.get(str(value.svc_id), f"#{value.svc_id}"),
            "svc_id": value.svc_id,
            "backends": [str(b) for b in backends],
            "affinity_timeout": value.affinity_timeout if value.flags & tables.LB_F_AFFINITY else None,
            "drop": not value.count and bool(value.flags & tables.LB_F_DROP),
        })
    return rows


def run(args: argparse.Namespace) -> int:
    common.require_root("services")
    rows = collect(args)
    if args.json:
        common.print_json(rows)
        return 0
    print(common.table(
        ["FRONTEND", "KIND", "SERVICE", "BACKENDS", "AFFINITY"],
        [[str(r["frontend"]), str(r["kind"]), str(r["service"]),
          ", ".join(r["backends"]) or ("(none: dropped)" if r["drop"] else "(none: refused)"),  # type: ignore[arg-type]
          f"{r['affinity_timeout']}s" if r["affinity_timeout"] else "-"] for r in rows]))
    return 0
