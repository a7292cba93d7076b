"""Read-only look at an installed datapath, for `ctlb status` and `ctlb services`.

Opens the pins without creating anything: layouts come from a layout-only compile.
"""

from __future__ import annotations

import ctypes as ct
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
    pod_attachments: list[programs.Attachment]  # the mesh's programs, on meshed pods' cgroups
    programmed: reconcile.Programmed
    fill: list[MapFill]

    def view(self) -> dict[str, object]:
        return reconcile.datapath_view(self.programmed.frontends, self.programmed.sets,
                                       self.programmed.source_ranges)


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
        fill = [_fill(m) for m in pinned.values()]
        programmed = reconcile.read_programmed(tables.kernel_tables(pinned))
    finally:
        for m in pinned.values():
            m.close()
    return Inspection(attachments=programs.attachments(bpffs), pod_attachments=programs.pod_attachments(bpffs),
                      programmed=programmed, fill=fill)


def _fill(m: maps.PinnedMap) -> MapFill:
    """Entries in use. An ARRAY map has every index: what counts there is a USED frontend slot
    (out of half the slots, the table's capacity), or a slot whose in-use field is set (a backend
    slot with a set, a socket slot with a cookie, an affinity or original-destination slot ever
    written: maps.ARRAY_IN_USE)."""
    if m.name in maps.FRONTENDS.values():
        values = _field_values(m, ("key", "state"))
        return MapFill(m.name, sum(1 for v in values if v == tables.SLOT_USED), m.max_entries // 2)
    if m.name in maps.ARRAY_IN_USE:
        return MapFill(m.name, sum(1 for v in _field_values(m, maps.ARRAY_IN_USE[m.name]) if v), m.max_entries)
    return MapFill(m.name, sum(1 for _ in m.keys()), m.max_entries)


def _field_values(m: maps.PinnedMap, path: tuple[str, ...]) -> memoryview:
    """One field of every element of an ARRAY map, as a strided view."""
    leaf = m.layout.leaf
    offset, size = tables.field_bytes(leaf, *path)
    fmt = {1: "B", 4: "I", 8: "Q"}[size]
    stride = ct.sizeof(leaf)
    assert offset % size == 0 and stride % size == 0
    return memoryview(m.read_all()).cast("B").cast(fmt)[offset // size::stride // size]
