"""The agent's account of itself, for `ctlb status` and `ctlb services` to read.

Written atomically after every sync: `<run dir>/state.json` says what could not be served and
why, how fresh the source is, and the digest of the desired datapath view the maps are compared
against; `<run dir>/names.json` holds the service-port names behind the ids in the maps, the
kind of each frontend, and the pods behind the pod ids socket-trace reports. The names are tens of thousands of entries at 10k Services, so they are
rewritten only when they change, not on every endpoint change.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field, fields

STATE_FILE = "state.json"
NAMES_FILE = "names.json"
_NAME_FIELDS = ("services", "frontend_kinds", "pods")


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
    source_status: dict[str, object] = field(default_factory=dict)  # connected, synced, stale_since, last_error
    mesh: dict[str, object] = field(default_factory=dict)  # pods, meshed, waiting (pods without a cgroup yet)
    health: dict[str, object] = field(default_factory=dict)  # healthz (address, listening, error), checks
    services: dict[str, str] = field(default_factory=dict)  # svc id -> service port name
    frontend_kinds: dict[str, str] = field(default_factory=dict)  # frontend -> ClusterIP, NodePort, ...
    pods: dict[str, str] = field(default_factory=dict)  # pod id (struct pod_info.pod_id) -> ns/name


def write(run_dir: pathlib.Path, state: AgentState, *, names: bool = True) -> None:
    """Writes the state; the names file too unless `names` is False (they did not change)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / STATE_FILE, {f.name: getattr(state, f.name) for f in fields(state)
                                       if f.name not in _NAME_FIELDS})
    if names:
        _write_json(run_dir / NAMES_FILE, {name: getattr(state, name) for name in _NAME_FIELDS})


def _write_json(path: pathlib.Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(value, separators=(",", ":")))
    os.replace(tmp, path)


def read(run_dir: pathlib.Path) -> AgentState | None:
    try:
        raw = json.loads((run_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    try:
        raw.update(json.loads((run_dir / NAMES_FILE).read_text()))
    except FileNotFoundError:
        pass  # written after the state file: a reader may come in between
    return AgentState(**raw)


def read_names(run_dir: pathlib.Path) -> dict[str, dict[str, str]]:
    """The names file alone ({} before the agent wrote one): for readers that want no more."""
    try:
        return json.loads((run_dir / NAMES_FILE).read_text())
    except FileNotFoundError:
        return {}


def remove(run_dir: pathlib.Path) -> None:
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    (run_dir / NAMES_FILE).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
