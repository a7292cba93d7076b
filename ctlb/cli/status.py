"""`ctlb status`: attached programs, map fill, what is programmed, and whether it is in sync."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from ctlb import healthcheck, statefile
from ctlb.cli import common
from ctlb.datapath import inspect, programs, reconcile, tables

EPILOG = """examples:
  ctlb status             # table; exit 0 only when the datapath matches the source
  ctlb status --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="datapath and agent status; exit 0 only when in sync", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_location_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


@dataclass(slots=True)
class Status:
    installed: bool
    agent_running: bool
    in_sync: bool
    reasons: list[str] = field(default_factory=list)  # why not in sync
    attached: list[dict[str, object]] = field(default_factory=list)
    attached_to_pods: list[dict[str, object]] = field(default_factory=list)  # the mesh's, per meshed pod
    maps: list[dict[str, object]] = field(default_factory=list)
    frontends: int = 0
    backends: int = 0
    agent: dict[str, object] = field(default_factory=dict)
    problems: list[dict[str, str]] = field(default_factory=list)


def collect(args: argparse.Namespace) -> Status:
    found = inspect.inspect(args.bpffs)
    agent = statefile.read(args.run_dir)
    st = Status(installed=found is not None, agent_running=bool(agent and statefile.pid_alive(agent.pid)),
                in_sync=False)
    if found is None:
        st.reasons.append(f"no datapath installed in {args.bpffs}")
    else:
        st.attached = [{"hook": a.hook, "program": a.program, "prog_id": a.prog_id, "cgroup_id": a.cgroup_id}
                       for a in found.attachments]
        st.attached_to_pods = [{"hook": a.hook, "program": a.program, "prog_id": a.prog_id,
                                "cgroup_id": a.cgroup_id} for a in found.pod_attachments]
        st.maps = [{"map": f.name, "entries": f.entries, "max_entries": f.max_entries} for f in found.fill]
        st.frontends = len(found.programmed.frontends)
        st.backends = sum(len(b) for b in found.programmed.sets.values())
        missing = _missing_hooks(found)
        if missing:
            expected = _expected_hooks(found)
            st.reasons.append(f"{len(expected) - len(missing)} of {len(expected)} programs attached "
                              f"(missing: {', '.join(missing)})")
    if agent is None:
        st.reasons.append(f"no agent state in {args.run_dir}")
    else:
        st.agent = {"pid": agent.pid, "node": agent.node, "source": agent.source, "started": agent.started,
                    "last_sync": agent.last_sync, "syncs": agent.syncs, "cgroup": agent.cgroup}
        st.problems = agent.problems
        st.agent["source_status"] = agent.source_status
        st.agent["mesh"] = agent.mesh
        st.agent["health"] = agent.health
        stale = agent.source_status.get("stale_since")
        if stale:
            error = agent.source_status.get("last_error")
            st.reasons.append(f"source is stale since {stale}: serving what it last had"
                              + (f" ({error})" if error else ""))
        elif agent.source_status and not agent.source_status.get("synced", True):
            st.reasons.append("source has not completed its first list yet")
        if not st.agent_running:
            st.reasons.append(f"agent (pid {agent.pid}) is not running: the source is not being followed")
        if found is not None and reconcile.programmed_digest(found.programmed) != agent.desired_digest:
            st.reasons.append("programmed maps differ from the desired state")
        if agent.last_sync is None:
            st.reasons.append("agent has not synced yet")
    st.in_sync = not st.reasons
    return st


def _expected_hooks(found: inspect.Inspection) -> tuple[programs.Hook, ...]:
    """Every hook, and the drop action's egress hook only while a programmed frontend needs it."""
    egress = any(v.flags & tables.NEEDS_EGRESS for v in found.programmed.frontends.values())
    return programs.expected_hooks(egress=egress)


def _missing_hooks(found: inspect.Inspection) -> list[str]:
    attached = {a.hook for a in found.attachments}
    return [h.name for h in _expected_hooks(found) if h.name not in attached]


def run(args: argparse.Namespace) -> int:
    common.require_root("status")
    st = collect(args)
    if args.json:
        common.print_json(dataclasses.asdict(st))
    else:
        print(render(st))
    return 0 if st.in_sync else 1


def render(st: Status) -> str:
    out = [f"In sync:     {'yes' if st.in_sync else 'no'}"]
    out += [f"  - {r}" for r in st.reasons]
    if st.agent:
        out.append(f"Agent:       pid {st.agent['pid']} ({'running' if st.agent_running else 'not running'}), "
                   f"node {st.agent['node']}, {st.agent['source']}")
        out.append(f"Last sync:   {st.agent['last_sync']} ({st.agent['syncs']} syncs)")
    out.append(f"Programmed:  {st.frontends} frontends, {st.backends} backend slots")
    mesh = st.agent.get("mesh") if st.agent else None
    if isinstance(mesh, dict) and mesh:
        out.append(f"Pods:        {mesh.get('pods', 0)} on this node, {mesh.get('meshed', 0)} in the mesh")
        waiting = mesh.get("waiting") or []
        if waiting:
            out.append(f"  - no cgroup found yet for: {', '.join(str(w) for w in waiting)}")
    out += _render_health(st.agent.get("health") if st.agent else None)
    if st.attached or st.attached_to_pods:
        rows = [[str(a["hook"]), str(a["program"]), str(a["prog_id"]), str(a["cgroup_id"])] for a in st.attached]
        rows += [[f"{a['hook']} (pod)", str(a["program"]), str(a["prog_id"]), str(a["cgroup_id"])]
                 for a in st.attached_to_pods]
        out += ["", common.table(["HOOK", "PROGRAM", "PROG ID", "CGROUP ID"], rows)]
    if st.maps:
        out += ["", common.table(["MAP", "ENTRIES", "MAX", "FILL"],
                                 [[str(m["map"]), str(m["entries"]), str(m["max_entries"]),
                                   f"{100 * int(m['entries']) / max(int(m['max_entries']), 1):.1f}%"]
                                  for m in st.maps])]
    if st.problems:
        out += ["", f"Objects not served ({len(st.problems)}):",
                common.table(["OBJECT", "REASON"], [[p["object"], p["reason"]] for p in st.problems])]
    return "\n".join(out)


def _render_health(health: object) -> list[str]:
    """The healthz line, and a table of the Services' health checks when there are some."""
    if not isinstance(health, dict) or not health:
        return []
    healthz = health.get("healthz")
    if not isinstance(healthz, dict):
        out = ["Healthz:     off"]
    elif healthz.get("listening"):
        out = [f"Healthz:     http://{healthz['address']}/healthz and /livez"]
    else:
        out = [f"Healthz:     not listening: {healthz.get('error')} (tried again every {healthcheck.RETRY_INTERVAL:g} s)"]
    checks = health.get("checks") or []
    if isinstance(checks, list) and checks:
        rows = [[str(c["service"]), str(c["port"]),
                 ", ".join(f"{family} {n}" for family, n in dict(c["local_endpoints"]).items()) or "-",
                 str(c["address"]) if c.get("listening") else f"no: {c.get('error')}"]
                for c in checks]
        out += ["", common.table(["HEALTH CHECK", "PORT", "LOCAL ENDPOINTS", "LISTENING"], rows)]
    return out
