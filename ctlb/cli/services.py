"""`ctlb services`: every frontend with its backends, like a NAT table dump."""

from __future__ import annotations

import argparse

from ctlb import desired, statefile
from ctlb.cli import common
from ctlb.datapath import inspect, reconcile, tables

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
            "source_ranges": _source_ranges(found.programmed, fe, value),
            "source_ranges_admit_node": bool(value.flags & tables.LB_F_SOURCE_NODE),
        })
    return rows


def _source_ranges(programmed: reconcile.Programmed, fe: desired.Frontend,
                   value: tables.FrontendValue) -> list[str] | None:
    """The ranges a gated frontend admits clients from; None when it admits every client."""
    if not value.flags & tables.LB_F_SOURCE_RANGES:
        return None
    ranges = programmed.source_ranges.get((fe.address.version, value.svc_id), set())
    return [str(n) for n in sorted(ranges, key=lambda n: (int(n.network_address), n.prefixlen))]


def _sources_cell(row: dict[str, object]) -> str:
    ranges = row["source_ranges"]
    if ranges is None:
        return "-"
    return ",".join(ranges) + (" +node" if row["source_ranges_admit_node"] else "")  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    common.require_root("services")
    rows = collect(args)
    if args.json:
        common.print_json(rows)
        return 0
    print(common.table(
        ["FRONTEND", "KIND", "SERVICE", "BACKENDS", "AFFINITY", "SOURCES"],
        [[str(r["frontend"]), str(r["kind"]), str(r["service"]),
          ", ".join(r["backends"]) or ("(none: dropped)" if r["drop"] else "(none: refused)"),  # type: ignore[arg-type]
          f"{r['affinity_timeout']}s" if r["affinity_timeout"] else "-", _sources_cell(r)] for r in rows]))
    return 0
