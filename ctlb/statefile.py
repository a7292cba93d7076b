"""The agent's account of itself, for `ctlb status` and `ctlb services` to read.

Written atomically to `<run dir>/state.json` after every sync: what the source held, what could
not be served and why, the service-port names behind the ids in the maps, and a digest of the
desired datapath view the maps are compared against.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import asdict, dataclass, field

STATE_FILE = "state.json"


@dataclass(slots=True)
class AgentState:
    pid: int
    node: str
    source: str
    cgroup: str
    bpffs: str
    started: str
    last_sync: str | None = None
    syncs: int = 0
    last_sync_timings: dict[str, float] = field(default_factory=dict)  # read, semantics, program (ms)
    desired_digest: str = ""
    desired_frontends: int = 0
    in_sync: bool = False
    problems: list[dict[str, str]] = field(default_factory=list)
    services: dict[str, str] = field(default_factory=dict)  # svc id -> service port name
    frontend_kinds: dict[str, str] = field(default_factory=dict)  # frontend -> ClusterIP, NodePort, ...


def write(run_dir: pathlib.Path, state: AgentState) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{STATE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(asdict(state), indent=1, sort_keys=True))
    os.replace(tmp, run_dir / STATE_FILE)


def read(run_dir: pathlib.Path) -> AgentState | None:
    try:
        raw = json.loads((run_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    return AgentState(**raw)


def remove(run_dir: pathlib.Path) -> None:
    (run_dir / STATE_FILE).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
