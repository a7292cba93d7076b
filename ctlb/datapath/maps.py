"""The pinned BPF maps: their names, their layouts (from bcc) and raw access by file descriptor.

Layouts come from compiling `bpf/ctlb.h` with bcc, which generates a ctypes type per map key and
value; nothing here declares a layout a second time.
"""

from __future__ import annotations

import ctypes as ct
import errno
import mmap
import os
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

from ctlb.datapath import libbpf

FRONTENDS = {4: "ctlb_fe4_v2", 6: "ctlb_fe6_v2"}  # ARRAY: open-addressed frontend table
BACKENDS = {4: "ctlb_be4_v2", 6: "ctlb_be6_v2"}  # ARRAY: backend sets as contiguous ranges
MEMBERS = {4: "ctlb_member4", 6: "ctlb_member6"}
SOCKETS = {4: "ctlb_sock4", 6: "ctlb_sock6"}  # ARRAY: per-socket reverse NAT, written by the programs
REVNAT = {4: "ctlb_revnat4", 6: "ctlb_revnat6"}  # LRU: per-socket reverse NAT that spilled
AFFINITY = {4: "ctlb_aff4_v3", 6: "ctlb_aff6_v3"}  # sets of slots: ClientIP session affinity
SOURCE_RANGES = {4: "ctlb_lb_src4", 6: "ctlb_lb_src6"}  # LPM: loadBalancerSourceRanges by svc_id
SETTINGS = "ctlb_settings_v2"  # ARRAY of one: node-wide settings
PODS = "ctlb_pods"  # this node's pods by pod cgroup id
MESH_RANGES = {4: "ctlb_mesh_range4", 6: "ctlb_mesh_range6"}  # LPM: include/exclude ranges
MESH_PORTS = "ctlb_mesh_ports"
MESH_CONNS = {4: "ctlb_mesh_conn4_v2", 6: "ctlb_mesh_conn6_v2"}  # original destinations (4-way tables)
TRACE_CTL = "ctlb_trace_ctl"  # ARRAY of one: whether socket-trace listens, and who
TRACE_RING = "ctlb_trace"  # RINGBUF: socket-trace's events (no key or value type)
TRACE_EVENT = "ctlb_trace_event"  # the layout compile's stand-in that carries struct trace_event

ALL_MAPS: tuple[str, ...] = (
    *FRONTENDS.values(), *BACKENDS.values(), *MEMBERS.values(), *SOCKETS.values(), *REVNAT.values(),
    *AFFINITY.values(), *SOURCE_RANGES.values(), SETTINGS, PODS, *MESH_RANGES.values(), MESH_PORTS, *MESH_CONNS.values(),
    TRACE_CTL,
)
# Every pin ctlb makes: the maps above and the ring buffer, which has no layout to open it by.
ALL_PINS: tuple[str, ...] = (*ALL_MAPS, TRACE_RING)
# ARRAY maps have every index: the field of a slot that is non-zero while the slot is in use
# (frontend slots are told by their state instead: see inspect).
ARRAY_IN_USE: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(BACKENDS.values(), ("set_id",)),
    **dict.fromkeys(SOCKETS.values(), ("cookie",)),
    **dict.fromkeys(AFFINITY.values(), ("last_used",)),
    **dict.fromkeys(MESH_CONNS.values(), ("born",)),
}
ARRAYS = frozenset((*FRONTENDS.values(), *ARRAY_IN_USE))

# Pins of earlier layouts. No program of this version reads them: they are removed once this
# version's programs are attached, and by uninstall.
LEGACY_MAPS: tuple[str, ...] = ("ctlb_fe4", "ctlb_fe6", "ctlb_be4", "ctlb_be6", "ctlb_settings", "ctlb_aff4", "ctlb_aff6",
                                 "ctlb_mesh_conn4", "ctlb_mesh_conn6", "ctlb_aff4_v2", "ctlb_aff6_v2")


def bpf_source_dir() -> pathlib.Path:
    """Where the C sources are: `$CTLB_BPF_DIR`, else `bpf/` beside the package."""
    override = os.environ.get("CTLB_BPF_DIR")
    if override:
        return pathlib.Path(override)
    return pathlib.Path(__file__).resolve().parents[2] / "bpf"


@dataclass(frozen=True, slots=True)
class Layout:
    key: type
    leaf: type


def layouts_of(bpf: object) -> dict[str, Layout]:
    """The ctypes key/value type of every ctlb map, as bcc generated them for `bpf`."""
    out: dict[str, Layout] = {}
    for name in ALL_MAPS:
        table = bpf[name.encode()]  # type: ignore[index]
        out[name] = Layout(key=table.Key, leaf=table.Leaf)
    return out


def compile_layouts() -> dict[str, Layout]:
    """Layouts without creating or touching any pin (for read-only commands)."""
    from bcc import BPF  # Debian's python3-bpfcc; imported late so pure modules never need it

    src = bpf_source_dir()
    bpf = BPF(text=b'#include "ctlb.h"\n', cflags=[f"-I{src}", "-DCTLB_LAYOUT_ONLY", "-w"])
    try:
        layouts = layouts_of(bpf)
        event = bpf[TRACE_EVENT.encode()]
        layouts[TRACE_EVENT] = Layout(key=event.Key, leaf=event.Leaf)
        return layouts
    finally:
        bpf.cleanup()


class PinnedMap:
    """One pinned map opened by path, read and written with its bcc-generated types."""

    def __init__(self, path: pathlib.Path, layout: Layout) -> None:
        self.path = path
        self.name = path.name
        self.layout = layout
        self.fd = libbpf.obj_get(str(path))
        info = libbpf.map_info(self.fd)
        if info.key_size != ct.sizeof(layout.key) or info.value_size != ct.sizeof(layout.leaf):
            os.close(self.fd)
            raise libbpf.BpfError(
                errno.EINVAL,
                f"pinned map {path} has key/value sizes {info.key_size}/{info.value_size}, "
                f"this ctlb expects {ct.sizeof(layout.key)}/{ct.sizeof(layout.leaf)}: "
                "run `ctlb uninstall` to remove the old datapath",
            )
        self.max_entries = info.max_entries
        self.map_flags = info.map_flags

    def get(self, key: ct.Structure) -> ct.Structure | None:
        leaf = self.layout.leaf()
        return leaf if libbpf.map_lookup(self.fd, key, leaf) else None

    def put(self, key: ct.Structure, leaf: ct.Structure) -> None:
        libbpf.map_update(self.fd, key, leaf)

    def put_batch(self, keys: ct.Array, leaves: ct.Array, count: int) -> tuple[int, libbpf.BpfError | None]:
        """Writes the first `count` keys and leaves in order, in one syscall; returns how many
        were written and, if not all, the error that stopped the kernel (see
        `libbpf.map_update_batch`)."""
        return libbpf.map_update_batch(self.fd, keys, leaves, count)

    def delete(self, key: ct.Structure) -> bool:
        return libbpf.map_delete(self.fd, key)

    def keys(self) -> Iterator[ct.Structure]:
        key: ct.Structure | None = None
        while True:
            nxt = self.layout.key()
            if not libbpf.map_next_key(self.fd, key, nxt):
                return
            yield nxt
            key = nxt

    def items(self) -> Iterator[tuple[ct.Structure, ct.Structure]]:
        for key in list(self.keys()):
            leaf = self.get(key)
            if leaf is not None:  # deleted by a program meanwhile (LRU eviction)
                yield key, leaf

    def read_all(self) -> ct.Array:
        """Every element of an ARRAY map, in index order: one copy of an mmap-able array's
        values, else BPF_MAP_LOOKUP_BATCH."""
        leaf = self.layout.leaf
        size = ct.sizeof(leaf) * self.max_entries
        # An mmap-able array's values start page-aligned, each value_size rounded up to 8.
        if self.map_flags & libbpf.BPF_F_MMAPABLE and ct.sizeof(leaf) % 8 == 0:
            length = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
            with mmap.mmap(self.fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mapped:
                return (leaf * self.max_entries).from_buffer_copy(mapped)
        return libbpf.array_read_all(self.fd, leaf, self.max_entries)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_pinned(bpffs: pathlib.Path, layouts: dict[str, Layout]) -> dict[str, PinnedMap]:
    """Opens every ctlb map pinned in `bpffs`; raises BpfError(ENOENT) if one is missing."""
    opened: dict[str, PinnedMap] = {}
    try:
        for name in ALL_MAPS:
            opened[name] = PinnedMap(bpffs / name, layouts[name])
    except OSError:
        for m in opened.values():
            m.close()
        raise
    return opened
