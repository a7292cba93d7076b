"""The node agent: source -> semantics -> datapath, and the state file. It wires; it does not decide."""

from __future__ import annotations

import datetime
import gc
import os
import pathlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from ctlb import datapath, desired, model, semantics, statefile
from ctlb.datapath import reconcile
from ctlb.sources import lastgood, manifests

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class AgentConfig:
    manifests: tuple[pathlib.Path, ...]
    node_name: str
    cgroup: pathlib.Path
    bpffs: pathlib.Path
    run_dir: pathlib.Path
    sizes: datapath.MapSizes = field(default_factory=datapath.MapSizes)
    interval: float = 0.2  # seconds between looks at the source


class ManifestSource:
    """Manifest files as a source: a new snapshot whenever the files change."""

    def __init__(self, paths: Sequence[pathlib.Path], *, interval: float) -> None:
        self.paths = tuple(paths)
        self._watcher = manifests.ManifestWatcher(self.paths, interval=interval)
        self._reader = manifests.ManifestReader(self.paths)
        self._last_good = lastgood.LastGood()

    def describe(self) -> str:
        return "manifests:" + ",".join(str(p) for p in self.paths)

    def poll(self) -> model.Snapshot | None:
        if not self._watcher.changed():
            return None
        return self._last_good.merge(self._reader.read())

    def wait(self, timeout: float) -> None:
        """Returns as soon as the files may have changed, or after `timeout`."""
        self._watcher.wait(timeout)

    def close(self) -> None:
        self._watcher.close()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _this_node(snapshot: model.Snapshot, name: str) -> model.Node | None:
    return next((n for n in snapshot.nodes if n.name == name), None)


class Agent:
    def __init__(self, config: AgentConfig, *, source: ManifestSource, dp: datapath.Datapath) -> None:
        self.config = config
        self.source = source
        self.datapath = dp
        self._reported: set[model.Problem] = set()
        self._memo = semantics.Memo()
        self.state = statefile.AgentState(
            pid=os.getpid(), node=config.node_name, source=source.describe(),
            cgroup=str(config.cgroup), bpffs=str(config.bpffs), started=_now(),
        )

    def sync(self, snapshot: model.Snapshot, *, read_ms: float = 0.0) -> None:
        """Programs one snapshot of the source and records the result."""
        started = time.perf_counter()
        node = _this_node(snapshot, self.config.node_name)
        state = semantics.desired_state(services=snapshot.services, endpoint_slices=snapshot.endpoint_slices,
                                        node=node, memo=self._memo)
        decided = time.perf_counter()
        outcome = self.datapath.apply(state)
        programmed = time.perf_counter()
        problems = sorted({*snapshot.problems, *state.problems, *outcome.problems})
        self._report(problems)
        self._record(state, outcome, problems)
        timings = {"read_ms": round(read_ms, 3), "semantics_ms": round(1000 * (decided - started), 3),
                   "program_ms": round(1000 * (programmed - decided), 3)}
        self.state.last_sync_timings = timings
        statefile.write(self.config.run_dir, self.state)
        if self.state.syncs == 1:
            # The first sync builds every object the agent will hold for long: move them out of
            # the collector's reach, or full collections over them stall later syncs ~200 ms.
            gc.collect()
            gc.freeze()
        log.info("synced", services=len(snapshot.services), service_ports=len(state.service_ports),
                 frontends=state.frontend_count(), writes=outcome.writes, deletes=outcome.deletes,
                 problems=len(problems), in_sync=self.state.in_sync, **timings)

    def _report(self, problems: Sequence[model.Problem]) -> None:
        """Logs each problem once, when it appears, and says when it is gone."""
        current = set(problems)
        for p in sorted(current - self._reported):
            log.error("object_not_served", object=p.ref, reason=p.reason)
        for p in sorted(self._reported - current):
            log.info("object_problem_resolved", object=p.ref)
        self._reported = current

    def _record(self, state: desired.DesiredState, outcome: reconcile.Outcome,
                problems: Sequence[model.Problem]) -> None:
        want = reconcile.desired_view(state)
        st = self.state
        st.last_sync = _now()
        st.syncs += 1
        st.desired_digest = reconcile.digest(want)
        st.desired_frontends = len(want)
        st.in_sync = not outcome.problems and reconcile.digest(self.datapath.reconciler.view()) == st.desired_digest
        st.problems = [{"object": p.ref, "reason": p.reason} for p in problems]
        st.services = {str(i): str(n) for i, n in sorted(self.datapath.reconciler.service_of.items())}
        st.frontend_kinds = {str(fe): str(kind) for sp in state.service_ports.values()
                             for fe, kind in sp.frontends.items()}

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            snapshot = self.source.poll()
            if snapshot is not None:
                self.sync(snapshot, read_ms=1000 * (time.perf_counter() - started))
            if not stop.is_set():
                self.source.wait(self.config.interval)


def run(config: AgentConfig, *, stop: threading.Event) -> None:
    """Runs the agent until `stop` is set. The datapath stays in place when it returns."""
    log.info("agent_starting", node=config.node_name, cgroup=str(config.cgroup), bpffs=str(config.bpffs))
    dp = datapath.Datapath.install(bpffs=config.bpffs, cgroup=config.cgroup, sizes=config.sizes)
    source = ManifestSource(config.manifests, interval=config.interval)
    try:
        Agent(config, source=source, dp=dp).run(stop)
    finally:
        source.close()
        dp.close()
        log.info("agent_stopped", datapath="left in place")
