"""The kernel side: programs attached to a cgroup, pinned maps, and the reconciler over them."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Collection

import structlog

from ctlb import desired
from ctlb.datapath import maps, programs, reconcile, tables

__all__ = ["Datapath", "MapSizes"]

MapSizes = programs.MapSizes

log = structlog.get_logger()


class Datapath:
    """Programs loaded and attached, maps adopted: ready to take desired states."""

    def __init__(self, *, bpf: object, pinned: dict[str, maps.PinnedMap],
                 egress: programs.OnDemand | None = None, pod_links: programs.PodLinks | None = None) -> None:
        self._bpf = bpf
        self.pinned = pinned
        self.egress = egress
        self.pod_links = pod_links  # the mesh's programs on each meshed pod's cgroup (meshredirect.control)
        self.reconciler = reconcile.Reconciler(tables.kernel_tables(pinned), egress=egress)
        self._pending_attach: Callable[[], None] | None = None

    @classmethod
    def install(cls, *, bpffs: pathlib.Path, cgroup: pathlib.Path, sizes: programs.MapSizes) -> Datapath:
        """Loads the programs, opens or creates the pinned maps, adopts what the maps already
        hold, and attaches (or swaps in) the programs on `cgroup`.

        When programs are attached already but this version's frontend tables are empty (an
        upgrade from an earlier map layout), the swap waits for the first `apply`: the running
        programs keep serving from their own maps until the new ones are filled.
        """
        programs.ensure_bpffs_dir(bpffs)
        bpf, prog_fds = programs.compile_and_load(bpffs, programs.sizes_of_pins(bpffs, sizes))
        pinned = maps.open_pinned(bpffs, maps.layouts_of(bpf))
        _warn_on_size_change(pinned, sizes)
        egress = programs.OnDemand(programs.EGRESS, cgroup_path=cgroup, bpffs=bpffs,
                                   prog_fd=prog_fds[programs.EGRESS.program])
        datapath = cls(bpf=bpf, pinned=pinned, egress=egress, pod_links=programs.PodLinks(bpffs, prog_fds))

        def attach() -> None:
            programs.attach(cgroup, bpffs, prog_fds)
            programs.remove_legacy_maps(bpffs)

        adopted = len(datapath.reconciler.programmed.frontends)
        if adopted or not programs.attachments(bpffs):
            attach()
        else:
            datapath._pending_attach = attach
        log.info("datapath_ready", bpffs=str(bpffs), cgroup=str(cgroup), adopted_frontends=adopted,
                 attached=datapath._pending_attach is None)
        return datapath

    def apply(self, state: desired.DesiredState, *,
              hint: Collection[desired.ServicePortName] | None = None) -> reconcile.Outcome:
        """Programs `state`; `hint` names the service ports that may have changed, if known."""
        outcome = self.reconciler.apply(state, hint=hint)
        if self._pending_attach is not None:
            self._pending_attach()
            self._pending_attach = None
            log.info("programs_swapped_in", after="first apply")
        return outcome

    def release_unused(self) -> None:
        """Detaches the egress program when no programmed frontend drops any more. `apply`
        attaches it before it is needed but leaves it attached, so that the caller can first
        end the sockets still sent to the drop address (their packets would otherwise leave)."""
        if self.egress is not None and not self.reconciler.needs_egress():
            self.egress.release()

    def close(self) -> None:
        """Releases this process's handles; programs and pins stay (restarts drop nothing)."""
        for pinned in self.pinned.values():
            pinned.close()
        cleanup = getattr(self._bpf, "cleanup", None)
        if cleanup is not None:
            cleanup()


def _warn_on_size_change(pinned: dict[str, maps.PinnedMap], sizes: programs.MapSizes) -> None:
    for name, m in pinned.items():
        wanted = sizes.map_entries(name)
        if m.max_entries != wanted:
            log.warning("map_size_unchanged", map=name, pinned=m.max_entries, configured=wanted,
                        hint="pinned maps keep their size; `ctlb uninstall` and restart to resize")
