"""Keeps the pod maps current: pods and namespaces from the store, pod cgroups from cgroupfs.

Two things move independently. Objects change in the store (a namespace relabelled, a pod
annotated, created, deleted); cgroups appear and vanish on the node (kubelet makes a pod's cgroup
after the API already has the pod). `update` takes the first, `rescan` the second; both end in
one `PodTable.apply`, so a pod is in the datapath as soon as both its object and its cgroup
exist. A pod whose cgroup is not there yet is looked for again on every rescan.

The mesh's own programs (sock_ops, getsockopt) are attached only while the node has a meshed
pod: before the first pod is redirected, and detached once none has been for a while.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from ctlb import model
from ctlb.datapath import maps
from ctlb.sources import store
from meshredirect import cgroups, podmap, switch

log = structlog.get_logger()

_KINDS = frozenset({"Namespace", "Pod"})

# How long the mesh's programs stay attached after the last meshed pod left: a connect that read
# the node's settings just before they changed may still be redirected, and its socket must
# still be recorded when its SYN is built.
PROGRAMS_GRACE_S = 1.0


class Programs(Protocol):
    """The mesh's programs, attached on demand (`ctlb.datapath.programs.OnDemand`)."""

    def ensure(self) -> None: ...

    def release(self) -> None: ...


@dataclass(frozen=True, slots=True)
class MeshStatus:
    pods: int  # pods of this node in the datapath
    meshed: int  # of which in the mesh
    waiting: tuple[str, ...]  # ns/name of pods whose cgroup is not found yet


class MeshControl:
    def __init__(self, *, pinned: Mapping[str, maps.PinnedMap], settings: switch.MeshSettings,
                 node_name: str, cgroup_root: Path, cgroup_mount: Path,
                 programs: Programs | None = None) -> None:
        self.settings = settings
        self._programs = programs
        self._unused_since: float | None = None  # when the node last had no meshed pod
        self._node_name = node_name
        self._root = cgroup_root
        self._mount = cgroup_mount
        self._table = podmap.PodTable(pinned, settings)
        self._decision = switch.Decision()
        self._cgroups: dict[str, cgroups.PodCgroup] = {}
        self._placed: dict[str, podmap.PodPlacement] = {}
        self._table_problems: tuple[model.Problem, ...] = ()
        self.meshed = 0  # meshed pods in the datapath; read by other threads

    @staticmethod
    def touched_by(changes: store.Changes | None) -> bool:
        """Whether `changes` can move a pod's mode (None: everything may have)."""
        return changes is None or any(kind in _KINDS for kind, _, _ in changes.keys)

    def update(self, objects: store.ObjectStore) -> None:
        """Decides every pod's mode again from the store (read under its lock by the caller)."""
        namespaces = {ns.name: ns for ns in objects.objects("Namespace") if isinstance(ns, model.Namespace)}
        pods = [p for p in objects.objects("Pod") if isinstance(p, model.Pod)]
        self._decision = switch.pod_modes(pods, namespaces, node_name=self._node_name, settings=self.settings)

    def rescan(self) -> None:
        self._cgroups = cgroups.find_pod_cgroups(self._root, mount=self._mount)

    def waiting(self) -> bool:
        """Pods known from the store whose cgroup was not found: worth a rescan soon."""
        return any(uid not in self._cgroups for uid in self._decision.pods)

    def apply(self) -> int:
        """Programs the pods that have both a mode and a cgroup; returns the map writes."""
        placements: dict[str, podmap.PodPlacement] = {}
        for uid, mode in self._decision.pods.items():
            found = self._cgroups.get(uid)
            if found is not None:
                placements[uid] = podmap.PodPlacement(mode=mode, cgroup_id=found.cgroup_id, level=found.level)
        if self._programs is not None and any(p.mode.meshed for p in placements.values()):
            self._programs.ensure()  # before a pod's connections are redirected: they must be recorded
        outcome = self._table.apply(placements.values())
        self._table_problems = outcome.problems
        if outcome.writes:
            self._log_moves(self._placed, placements)
        self._placed = placements
        self.meshed = sum(p.mode.meshed for p in placements.values())
        self._release_programs_when_unused()
        return outcome.writes

    def _release_programs_when_unused(self) -> None:
        if self.meshed:
            self._unused_since = None
            return
        now = time.monotonic()
        if self._unused_since is None:
            self._unused_since = now
        elif now - self._unused_since >= PROGRAMS_GRACE_S and self._programs is not None:
            self._programs.release()

    def pod_names(self) -> dict[str, str]:
        """ns/name by pod id, for the pods in the datapath (socket-trace names the callers)."""
        names: dict[str, str] = {}
        for placement in self._placed.values():
            pod_id = self._table.pod_id(placement.cgroup_id)
            if pod_id is not None:
                names[str(pod_id)] = f"{placement.mode.namespace}/{placement.mode.name}"
        return names

    @property
    def problems(self) -> tuple[model.Problem, ...]:
        return (*self._decision.problems, *self._table_problems)

    def status(self) -> MeshStatus:
        waiting = sorted(f"{m.namespace}/{m.name}" for uid, m in self._decision.pods.items()
                         if uid not in self._cgroups)
        return MeshStatus(pods=len(self._placed), meshed=sum(p.mode.meshed for p in self._placed.values()),
                          waiting=tuple(waiting))

    @staticmethod
    def _log_moves(before: Mapping[str, podmap.PodPlacement], after: Mapping[str, podmap.PodPlacement]) -> None:
        for uid, placement in after.items():
            old = before.get(uid)
            if old is None or old.mode.meshed != placement.mode.meshed:
                mode = placement.mode
                log.info("pod_mode", pod=f"{mode.namespace}/{mode.name}",
                         mode="mesh" if mode.meshed else "ctlb")
        for uid in before.keys() - after.keys():
            mode = before[uid].mode
            log.info("pod_gone", pod=f"{mode.namespace}/{mode.name}")
