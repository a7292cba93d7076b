"""The node agent: source -> semantics -> datapath, and the state file. It wires; it does not decide."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import pathlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import structlog

from ctlb import datapath, desired, healthcheck, model, planner, semantics, statefile, trace
from ctlb.datapath import cgroup, maps, reconcile, sockdiag
from ctlb.sources import manifests, store
from meshredirect import control, switch, xdsfeed

if TYPE_CHECKING:
    from meshredirect.xds import XdsServer

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class AgentConfig:
    manifests: tuple[pathlib.Path, ...]  # empty: the Kubernetes API is the source
    node_name: str
    cgroup: pathlib.Path
    bpffs: pathlib.Path
    run_dir: pathlib.Path
    sizes: datapath.MapSizes = field(default_factory=datapath.MapSizes)
    interval: float = 0.2  # seconds between looks at the source
    kubeconfig: pathlib.Path | None = None  # None: in-cluster config (API source only)
    mesh: switch.MeshSettings = field(default_factory=switch.MeshSettings)
    # Where the node's xDS server listens (`unix:/path`, `host:port`); empty: no xDS server.
    xds_listen: tuple[str, ...] = ()
    # Where kube-proxy's /healthz and /livez are served; None: not served.
    healthz_address: healthcheck.BindAddress | None = None
    # How long a change may wait for a sync before the proxy counts as unhealthy.
    health_timeout: float = healthcheck.DEFAULT_HEALTH_TIMEOUT


class Source(Protocol):
    """Where objects come from. It writes them into the agent's store, from the agent's thread
    (`refresh`) or from threads of its own; the agent programs only once it is `synced`."""

    def describe(self) -> str: ...
    def refresh(self) -> None: ...
    def synced(self) -> bool: ...
    def wait(self, timeout: float) -> None: ...
    def status(self) -> dict[str, object]: ...
    def close(self) -> None: ...


class ManifestSource:
    """Manifest files as a source: changed files are read into the store when the agent asks."""

    def __init__(self, paths: Sequence[pathlib.Path], *, objects: store.ObjectStore, interval: float) -> None:
        self.paths = tuple(paths)
        self._store = objects
        self._watcher = manifests.ManifestWatcher(self.paths, interval=interval)
        self._reader = manifests.ManifestReader(self.paths)
        self._read_once = False

    def describe(self) -> str:
        return "manifests:" + ",".join(str(p) for p in self.paths)

    def refresh(self) -> None:
        if self._watcher.changed():
            self._reader.refresh(self._store)
            self._read_once = True

    def synced(self) -> bool:
        return self._read_once

    def wait(self, timeout: float) -> None:
        """Returns as soon as the files may have changed, or after `timeout`."""
        self._watcher.wait(timeout)

    def status(self) -> dict[str, object]:
        return {"synced": self._read_once}

    def close(self) -> None:
        self._watcher.close()


class ApiSource:
    """The Kubernetes API as a source: its watch threads write into the store as events arrive."""

    def __init__(self, objects: store.ObjectStore, *, kubeconfig: pathlib.Path | None, node_name: str) -> None:
        from ctlb.sources import kubeapi  # the kubernetes client is slow to import; manifests need none of it

        self._store = objects
        self._source = kubeapi.KubeApiSource(objects, client=kubeapi.api_client(kubeconfig), node_name=node_name)
        self._source.start()

    def describe(self) -> str:
        return self._source.describe()

    def refresh(self) -> None:
        """The watch threads write as events arrive; a bug that ended one is raised here."""
        self._source.check()

    def synced(self) -> bool:
        return self._source.synced()

    def wait(self, timeout: float) -> None:
        # Wakes as objects come, during the first list too (the agent plans ahead meanwhile),
        # and when a list completes (the source pokes the store then).
        self._store.wait(timeout)

    def status(self) -> dict[str, object]:
        return dataclasses.asdict(self._source.status())

    def close(self) -> None:
        self._source.close()


_NO_CHANGES = store.Changes(before={}, problems_changed=False)

# How long a start-up runs with the cyclic collector off (see `Agent.run`). One that takes longer
# is not fast anyway, and may be a source failing over and over: its garbage (tracebacks hold
# cycles) must not pile up.
STARTUP_WITHOUT_GC_S = 10.0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class Agent:
    def __init__(self, config: AgentConfig, *, source: Source, objects: store.ObjectStore,
                 dp: datapath.Datapath, xds_server: XdsServer | None = None) -> None:
        self.config = config
        self.source = source
        self.store = objects
        self.datapath = dp
        self.planner = planner.Planner(config.node_name)
        self.mesh = control.MeshControl(pinned=dp.pinned, settings=config.mesh, node_name=config.node_name,
                                        cgroup_root=config.cgroup, cgroup_mount=cgroup.cgroup2_mount(),
                                        pod_links=dp.pod_links)
        # Sidecars are served only while this node has some: building Envoy's config costs.
        self.xds = None if xds_server is None else xdsfeed.XdsFeed(xds_server, wanted=lambda: self.mesh.meshed > 0)
        # Seeded from the maps as adopted, before the first apply changes them.
        self._pinned = sockdiag.PinnedPeers(sockdiag.programmed_peers(dp.reconciler.programmed))
        self._gc_thresholds = gc.get_threshold()
        self._gc_off_until = 0.0
        self._reported: set[model.Problem] = set()
        # The desired view's digest, kept as a sum over service ports so a change costs its port.
        self._digest_of: dict[desired.ServicePortName, int] = {}
        self._digest_sum = 0
        self._kinds_of: dict[desired.ServicePortName, dict[str, str]] = {}
        self._viewed: dict[desired.ServicePortName, desired.ServicePortState] = {}  # what each share is of
        self._frontend_kinds: dict[str, str] = {}
        # What planning ahead of the first sync moved, with the state each had before.
        self._planned_ahead: planner.Moved = {}
        # kube-proxy's health servers: the proxy's own (if asked for) and one per Service health check.
        self.health = healthcheck.ProxyHealth(timeout=config.health_timeout, pending=objects.pending_since)
        self.health_checks = healthcheck.ServiceHealthServers(health=self.health)
        self.healthz = (None if config.healthz_address is None
                        else healthcheck.ProxyHealthServer(config.healthz_address, health=self.health))
        self._health_checks_version = 0
        self._sync_problems: list[model.Problem] = []  # the last sync's problems but the health checks'
        self.state = statefile.AgentState(
            pid=os.getpid(), node=config.node_name, source=source.describe(),
            cgroup=str(config.cgroup), bpffs=str(config.bpffs), started=_now(),
        )

    def sync(self, *, read_ms: float = 0.0) -> bool:
        """Programs what changed in the store since the last sync; False if nothing had."""
        started = time.perf_counter()
        first = self.state.syncs == 0
        with self.store.locked():
            pending = self.store.pending_since()
            if pending is not None:
                self.health.queued(pending)  # before `take` clears it: no moment without either
            changes = self.store.take()
            if changes is None and not first:
                return False
            if self._planned_ahead:
                # Planned ahead while the source listed: only what came since, and what waited, is left.
                changed, self._planned_ahead = self._planned_ahead, {}
                for name, previous in self.planner.update(self.store, changes or _NO_CHANGES).items():
                    changed.setdefault(name, previous)
            else:
                changed = self.planner.update(self.store, None if first else changes)
            pods_moved = control.MeshControl.touched_by(None if first else changes)
            if pods_moved:
                self.mesh.update(self.store)
            source_problems = self.store.problems()
            services = self.store.objects("Service") if self.xds is not None else []
            node = self.store.get(("Node", "", self.config.node_name))
        self.health.set_node_eligible(semantics.node_eligible(node if isinstance(node, model.Node) else None))
        plan = self.planner.state()
        if self.xds is not None:
            self.xds.offer(plan.service_ports, [s for s in services if isinstance(s, model.Service)])
        decided = time.perf_counter()
        outcome = self.datapath.apply(plan, hint=None if first else changed)
        if pods_moved:
            self._tend_pods()
        programmed = time.perf_counter()
        self._end_stale_flows(changed, plan)
        self.health.updated()
        if self.planner.health_checks_version != self._health_checks_version:
            self._health_checks_version = self.planner.health_checks_version
            self.health_checks.update(self.planner.health_checks())
        self._sync_problems = sorted({*source_problems, *plan.problems, *outcome.problems, *self.mesh.problems})
        problems = sorted({*self._sync_problems, *self.health_checks.problems()})
        self._report(problems)
        names_changed = self._record(plan, changed, outcome, problems)
        timings = {"read_ms": round(read_ms, 3), "semantics_ms": round(1000 * (decided - started), 3),
                   "program_ms": round(1000 * (programmed - decided), 3)}
        self.state.last_sync_timings = timings
        statefile.write(self.config.run_dir, self.state, names=names_changed)
        if first:
            # The first sync builds every object the agent will hold for long: move them out of
            # the collector's reach, or full collections over them stall later syncs ~200 ms.
            # No collection first: it would walk that heap once more (0.25-0.35 s at 10k
            # Services) to find next to nothing, since what start-up builds holds no cycles.
            gc.freeze()
            self._end_startup_collector()
        log.info("synced", services=self.store.count("Service"), service_ports=len(plan.service_ports),
                 changed=len(changed), frontends=self.planner.frontend_count, writes=outcome.writes,
                 deletes=outcome.deletes, problems=len(problems), in_sync=self.state.in_sync, **timings)
        return True

    def _tend_pods(self) -> None:
        """Finds the pods' cgroups again and programs what moved: kubelet makes and removes pod
        cgroups on its own schedule, which no object change announces."""
        self.mesh.rescan()
        self.mesh.apply()
        status = dataclasses.asdict(self.mesh.status())
        pods = self.mesh.pod_names()
        pods_renamed = pods != self.state.pods
        if status != self.state.mesh or pods_renamed:
            self.state.mesh = status
            self.state.pods = pods
            if self.state.syncs:
                statefile.write(self.config.run_dir, self.state, names=pods_renamed)

    def _end_stale_flows(self, moved: planner.Moved, plan: desired.DesiredState) -> None:
        """Connected UDP sockets keep the backend they got at connect, and dropped sockets the
        drop address: when that peer serves them no more, end them so the application's next
        socket is balanced afresh. Then the drop action's program may go, if unused."""
        gone = self._pinned.update(moved, plan.service_ports)
        if gone:
            destroyed = sockdiag.destroy_sockets_to(gone, cgroup=self.config.cgroup)
            log.info("stale_udp_flows_ended", peers=sorted(str(p) for p in gone), sockets=destroyed)
        self.datapath.release_unused()

    def _report(self, problems: Sequence[model.Problem]) -> None:
        """Logs each problem once, when it appears, and says when it is gone."""
        current = set(problems)
        for p in sorted(current - self._reported):
            log.error("object_not_served", object=p.ref, reason=p.reason)
        for p in sorted(self._reported - current):
            log.info("object_problem_resolved", object=p.ref)
        self._reported = current

    def _record(self, plan: desired.DesiredState, changed: planner.Moved,
                outcome: reconcile.Outcome, problems: Sequence[model.Problem]) -> bool:
        """Brings the state file's account up to date with the changed service ports only;
        True if the names (ids, frontends) changed and must be written again."""
        st = self.state
        names_changed = self.state.syncs == 0
        for name in changed:
            names_changed |= self._update_view(name, plan.service_ports.get(name))
        st.last_sync = _now()
        st.syncs += 1
        st.desired_digest = reconcile.combine(self._digest_sum)
        st.desired_frontends = self.planner.frontend_count
        # The reconciler's shadow is what it wrote: it matches the plan unless something failed.
        st.in_sync = not outcome.problems
        st.problems = [{"object": p.ref, "reason": p.reason} for p in problems]
        st.source_status = self.source.status()
        st.health = self._health_status()
        if names_changed:
            st.services = {str(i): str(n) for i, n in sorted(self.datapath.reconciler.service_of.items())}
            st.frontend_kinds = dict(sorted(self._frontend_kinds.items()))
        return names_changed

    def _update_view(self, name: desired.ServicePortName, sp: desired.ServicePortState | None) -> bool:
        """Replaces one service port's share of the digest and of the frontend kinds; True if
        its frontends or kinds moved (a port that came or went moves too)."""
        if sp is not None and self._viewed.get(name) is sp:
            return False  # worked out for this very state already (while planning ahead)
        self._viewed.pop(name, None)
        self._digest_sum -= self._digest_of.pop(name, 0)
        old_kinds = self._kinds_of.pop(name, {})
        if sp is None:
            kinds: dict[str, str] = {}
        else:
            self._viewed[name] = sp
            self._digest_of[name] = reconcile.service_port_digest(sp)
            self._digest_sum += self._digest_of[name]
            kinds = {str(fe): str(kind) for fe, kind in sp.frontends.items()}
            self._kinds_of[name] = kinds
        if kinds == old_kinds:
            return False
        for key in old_kinds.keys() - kinds.keys():
            self._frontend_kinds.pop(key, None)
        self._frontend_kinds.update(kinds)
        return True

    def run(self, stop: threading.Event) -> None:
        # Until the first sync the heap only grows (hundreds of thousands of objects, next to no
        # garbage): the cyclic collector would walk it over and over (~0.07 s of a 1.2 s start
        # at 10k Services, in collections of the youngest generation alone) to find next to
        # nothing (22 unreachable objects at the end of such a start). It is off until then, or
        # until STARTUP_WITHOUT_GC_S have passed, and collects rarely in between.
        self._gc_thresholds = gc.get_threshold()
        gc.set_threshold(100_000, 50, 1000)
        gc.disable()
        self._gc_off_until = time.monotonic() + STARTUP_WITHOUT_GC_S
        while not stop.is_set():
            started = time.perf_counter()
            self.source.refresh()
            synced = self.source.synced() and self.sync(read_ms=1000 * (time.perf_counter() - started))
            if not synced:
                self._plan_ahead()
                self._note_source_status()
                if self.state.syncs:
                    self._tend_pods()
                elif time.monotonic() > self._gc_off_until:
                    gc.enable()  # a slow start: collect (rarely) again
            self._tend_health()
            self._end_abandoned_trace()
            if not stop.is_set():
                self.source.wait(self.config.interval)
        if not self.state.syncs:
            self._end_startup_collector()  # stopped before the first sync

    def _end_abandoned_trace(self) -> None:
        """A socket-trace killed before it could turn tracing off leaves every decision paying
        for events no one reads: end that."""
        owner = trace.end_abandoned(self.datapath.pinned[maps.TRACE_CTL])
        if owner is not None:
            log.info("trace_abandoned", pid=owner, action="tracing turned off")

    def _end_startup_collector(self) -> None:
        gc.set_threshold(*self._gc_thresholds)
        gc.enable()

    def close(self) -> None:
        """Stops the health servers (the datapath stays)."""
        self.health_checks.close()
        if self.healthz is not None:
            self.healthz.close()

    def _tend_health(self) -> None:
        """Tries again the health ports that could not be listened on, and reports what now does."""
        listening = self.health_checks.retry()
        if self.healthz is not None:
            listening |= self.healthz.retry()
        if listening and self.state.syncs:
            problems = sorted({*self._sync_problems, *self.health_checks.problems()})
            self._report(problems)
            self.state.problems = [{"object": p.ref, "reason": p.reason} for p in problems]
            self.state.health = self._health_status()
            statefile.write(self.config.run_dir, self.state, names=False)

    def _health_status(self) -> dict[str, object]:
        return {"healthz": self.healthz.status() if self.healthz is not None else None,
                "checks": self.health_checks.status()}

    def _plan_ahead(self) -> None:
        """Before the first sync, while the source still lists: plans what has come so far
        (programming nothing), so the first sync is left with the rest. At 10k Services this
        takes the planning off the first sync, into the time the list waits on the server."""
        if self.state.syncs:
            return
        with self.store.locked():
            changes = self.store.take()
            if changes is None:
                return
            moved = self.planner.update(self.store, changes, listing=True)
            for name, previous in moved.items():
                self._planned_ahead.setdefault(name, previous)
        # Their share of the state file's digest and frontend kinds too (~50 ms at 10k Services),
        # which the first sync then finds done.
        service_ports = self.planner.state().service_ports
        for name in moved:
            self._update_view(name, service_ports.get(name))

    def _note_source_status(self) -> None:
        """Writes the state file when only the source's health changed (lost, back), so
        `ctlb status` tells a stale source even while nothing can be synced."""
        status = self.source.status()
        if status != self.state.source_status:
            self.state.source_status = status
            statefile.write(self.config.run_dir, self.state, names=self.state.syncs == 0)
            log.info("source_status", **status)


def _start_xds(config: AgentConfig) -> XdsServer | None:
    if not config.xds_listen:
        return None
    from meshredirect import xds  # grpc and Envoy's protobufs: loaded only when serving xDS

    config.run_dir.mkdir(parents=True, exist_ok=True)
    server = xds.XdsServer(config.xds_listen, options=xds.Options(outbound_port=config.mesh.outbound_port))
    server.start()
    return server


def run(config: AgentConfig, *, stop: threading.Event) -> None:
    """Runs the agent until `stop` is set. The datapath stays in place when it returns."""
    log.info("agent_starting", node=config.node_name, cgroup=str(config.cgroup), bpffs=str(config.bpffs))
    dp = datapath.Datapath.install(bpffs=config.bpffs, cgroup=config.cgroup, sizes=config.sizes)
    objects = store.ObjectStore()
    source: Source
    if config.manifests:
        source = ManifestSource(config.manifests, objects=objects, interval=config.interval)
    else:
        source = ApiSource(objects, kubeconfig=config.kubeconfig, node_name=config.node_name)
    xds_server = _start_xds(config)
    the_agent = None
    try:
        the_agent = Agent(config, source=source, objects=objects, dp=dp, xds_server=xds_server)
        the_agent.run(stop)
    finally:
        if the_agent is not None:
            the_agent.close()
        if the_agent is not None and the_agent.xds is not None:
            the_agent.xds.close()
        elif xds_server is not None:
            xds_server.stop()
        source.close()
        dp.close()
        log.info("agent_stopped", datapath="left in place")
