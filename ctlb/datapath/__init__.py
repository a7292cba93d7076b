"""The kernel side: programs attached to a cgroup, pinned maps, and the reconciler over them."""

from __future__ import annotations

import pathlib
from collections.abc import Collection

import structlog

from ctlb import desired
from ctlb.datapath import maps, programs, reconcile, tables

__all__ = ["Datapath", "MapSizes"]

MapSizes = programs.MapSizes

log = structlog.get_logger()


class Datapath:
    """Programs loaded and attached, maps adopted: ready to take desired states."""

    def __init__(self, *, bpf: object, pinned: dict[str, maps.PinnedMap]) -> None:
        self._bpf = bpf
        self.pinned = pinned
        self.reconciler = reconcile.Reconciler(tables.kernel_tables(pinned))

    @classmethod
    def install(cls, *, bpffs: pathlib.Path, cgroup: pathlib.Path, sizes: programs.MapSizes) -> Datapath:
        """Loads the programs, opens or creates the pinned maps, attaches (or swaps in) the
        programs on `cgroup`, and adopts what the maps already hold."""
        programs.ensure_bpffs_dir(bpffs)
        bpf, prog_fds = programs.compile_and_load(bpffs, sizes)
        programs.attach(cgroup, bpffs, prog_fds)
        pinned = maps.open_pinned(bpffs, maps.layouts_of(bpf))
        _warn_on_size_change(pinned, sizes)
        datapath = cls(bpf=bpf, pinned=pinned)
        log.info("datapath_ready", bpffs=str(bpffs), cgroup=str(cgroup),
                 adopted_frontends=len(datapath.reconciler.programmed.frontends))
        return datapath

    def apply(self, state: desired.DesiredState, *,
              hint: Collection[desired.ServicePortName] | None = None) -> reconcile.Outcome:
        """Programs `state`; `hint` names the service ports that may have changed, if known."""
        return self.reconciler.apply(state, hint=hint)

    def close(self) -> None:
        """Releases this process's handles; programs and pins stay (restarts drop nothing)."""
        for pinned in self.pinned.values():
            pinned.close()
        cleanup = getattr(self._bpf, "cleanup", None)
        if cleanup is not None:
            cleanup()


def _warn_on_size_change(pinned: dict[str, maps.PinnedMap], sizes: programs.MapSizes) -> None:
    wanted = {**{n: sizes.frontends for n in maps.FRONTENDS.values()},
              **{n: sizes.backends for n in (*maps.BACKENDS.values(), *maps.MEMBERS.values())},
              **{n: sizes.revnat for n in maps.REVNAT.values()},
              **{n: sizes.affinity for n in maps.AFFINITY.values()}}
    for name, m in pinned.items():
        if m.max_entries != wanted[name]:
            log.warning("map_size_unchanged", map=name, pinned=m.max_entries, configured=wanted[name],
                        hint="pinned maps keep their size; `ctlb uninstall` and restart to resize")
