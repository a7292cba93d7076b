"""Keeps the pod maps current: pods and namespaces from the store, pod cgroups from cgroupfs.

Two things move independently. Objects change in the store (a namespace relabelled, a pod
annotated, created, deleted); cgroups appear and vanish on the node (kubelet makes a pod's cgroup
after the API already has the pod). `update` takes the first, `rescan` the second; both end in
one `PodTable.apply`, so a pod is in the datapath as soon as both its object and its cgroup
exist. A pod whose cgroup is not there yet is looked for again on every rescan.

The mesh's programs (the redirect, sock_ops, getsockopt) hang on each meshed pod's own cgroup
(`PodLinks`): attached once the pod's entry is in the maps, detached a moment after it left the
mesh or the node. Pods outside the mesh never run them.
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

# How long a pod keeps the mesh's programs after it left the mesh: a connect redirected just
# before its entry changed must still be recorded by sock_ops when its SYN is built.
LINK_GRACE_S = 1.0


class PodLinks(Protocol):
    """The mesh's programs on meshed pods' cgroups (`ctlb.datapath.programs.PodLinks`)."""

    def sync(self, wanted: dict[int, Path]) -> dict[int, str]: ...


@dataclass(frozen=True, slots=True)
class MeshStatus:
    pods: int  # pods of this node in the datapath
    meshed: int  # of which in the mesh
    waiting: tuple[str, ...]  # ns/name of pods whose cgroup is not found yet


class MeshControl:
    def __init__(self, *, pinned: Mapping[str, maps.PinnedMap], settings: switch.MeshSettings,
                 node_name: str, cgroup_root: Path, cgroup_mount: Path,
                 pod_links: PodLinks | None = None) -> None:
        self.settings = settings
        self._pod_links = pod_links
        self._linked: dict[int, Path] | None = None  # pod cgroup id -> path, as last synced; None: never
        self._unlinking: dict[int, float] = {}  # pod cgroup id -> when it stopped being meshed
        self._link_problems: tuple[model.Problem, ...] = ()
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
        outcome = self._table.apply(placements.values())
        self._table_problems = outcome.problems
        if outcome.writes:
            self._log_moves(self._placed, placements)
        self._placed = placements
        self.meshed = sum(p.mode.meshed for p in placements.values())
        self._link_pods()
        return outcome.writes

    def _link_pods(self) -> None:
        """The mesh's programs on the cgroup of every meshed pod in the maps, and of pods that
        left the mesh less than LINK_GRACE_S ago; on no other."""
        if self._pod_links is None:
            return
        meshed = {p.cgroup_id: self._cgroups[uid].path for uid, p in self._placed.items()
                  if p.mode.meshed and uid in self._cgroups and self._table.pod_id(p.cgroup_id) is not None}
        wanted = {**self._lingering(meshed), **meshed}
        if wanted == self._linked and not self._link_problems:
            return
        failed = self._pod_links.sync(wanted)
        self._linked = wanted
        names = {p.cgroup_id: f"{p.mode.namespace}/{p.mode.name}" for p in self._placed.values()}
        self._link_problems = tuple(
            model.Problem(f"Pod {names.get(c, c)}", f"not captured: attaching the mesh's programs to its cgroup failed: {why}")
            for c, why in sorted(failed.items()))

    def _lingering(self, meshed: Mapping[int, Path]) -> dict[int, Path]:
        """The pods that left the mesh less than LINK_GRACE_S ago and whose cgroup is still there."""
        now = time.monotonic()
        for cgroup_id in (self._linked or {}).keys() - meshed.keys():
            self._unlinking.setdefault(cgroup_id, now)
        linked = self._linked or {}
        self._unlinking = {c: since for c, since in self._unlinking.items()
                           if c not in meshed and now - since < LINK_GRACE_S and c in linked and linked[c].exists()}
        return {c: linked[c] for c in self._unlinking}

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
        return (*self._decision.problems, *self._table_problems, *self._link_problems)

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
