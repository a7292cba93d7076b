"""Read-only look at an installed datapath, for `ctlb status` and `ctlb services`.

Opens the pins without creating anything: layouts come from a layout-only compile.
"""

from __future__ import annotations

import errno
import pathlib
from dataclasses import dataclass

from ctlb.datapath import libbpf, maps, programs, reconcile, tables


@dataclass(frozen=True, slots=True)
class MapFill:
    name: str
    entries: int
    max_entries: int


@dataclass(frozen=True, slots=True)
class Inspection:
    attachments: list[programs.Attachment]
    programmed: reconcile.Programmed
    fill: list[MapFill]

    def view(self) -> dict[str, object]:
        return reconcile.datapath_view(self.programmed.frontends, self.programmed.sets)


def inspect(bpffs: pathlib.Path) -> Inspection | None:
    """What is attached and programmed under `bpffs`; None when nothing is installed there."""
    if not (bpffs / maps.FRONTENDS[4]).exists():
        return None
    try:
        pinned = maps.open_pinned(bpffs, maps.compile_layouts())
    except libbpf.BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    try:
        fill = [MapFill(name, sum(1 for _ in m.keys()), m.max_entries) for name, m in pinned.items()]
        programmed = reconcile.read_programmed(tables.kernel_tables(pinned))
    finally:
        for m in pinned.values():
            m.close()
    return Inspection(attachments=programs.attachments(bpffs), programmed=programmed, fill=fill)
