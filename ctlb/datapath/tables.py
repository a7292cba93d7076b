"""Typed views of the load-balancing maps: Python values in, ctypes structs out.

The reconciler speaks in `desired` values (Frontend, Backend) and the small records below; the
kernel tables encode them into the bcc-generated structs of one address family each. A unit test
may hand the reconciler `MemoryTable`s instead; what the kernel does is proven in kernel tests.

Two of the kernel tables are more than a map seen through a codec (see bpf/ctlb.h for why):

- `KernelFrontendTable` keeps an open-addressed hash table in an ARRAY map, probed exactly as
  bpf/sock.c probes it, and writes each slot in the steps that let a program read it meanwhile.
- `KernelBackendTable` is an ARRAY map indexed by slot; the reconciler places each backend set
  in a contiguous range of it.
"""

from __future__ import annotations

import array
import ctypes as ct
import errno
import ipaddress
import socket
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from ctlb import desired, errors, model
from ctlb.datapath import libbpf, maps, netorder

K = TypeVar("K")
V = TypeVar("V")

PROTO_NUMBERS = {model.Protocol.TCP: socket.IPPROTO_TCP, model.Protocol.UDP: socket.IPPROTO_UDP,
                 model.Protocol.SCTP: socket.IPPROTO_SCTP}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}

# Copies of bpf/ctlb.h constants (tests/unit/test_header_copies.py compares them with the header).
LB_F_AFFINITY = 1 << 0  # enum lb_flags
LB_F_DROP = 1 << 1
LB_F_SOURCE_RANGES = 1 << 2
LB_F_SOURCE_NODE = 1 << 3
NEEDS_EGRESS = LB_F_DROP | LB_F_SOURCE_RANGES  # CTLB_NEEDS_EGRESS: flags under which ctlb_egress must be attached
DROP_ADDR4 = ipaddress.IPv4Address("192.0.0.8")  # CTLB_DROP_ADDR4: where dropped sockets are sent
DROP_ADDR6 = ipaddress.IPv6Address("100::1")  # CTLB_DROP_ADDR6_0..3
SLOT_EMPTY, SLOT_USED, SLOT_TOMB = 0, 1, 2  # enum lb_slot_state
FE_PROBES = 16  # CTLB_FE_PROBES

_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class FrontendValue:
    svc_id: int
    set_id: int
    count: int
    affinity_timeout: int = 0
    flags: int = 0
    start: int = 0  # the set's first slot in the backend table


@dataclass(frozen=True, slots=True)
class BackendSlot:
    """One slot of the backend table: a backend of the set `set_id`."""

    set_id: int
    backend: desired.Backend


@dataclass(frozen=True, slots=True, order=True)
class MemberKey:
    svc_id: int
    backend: desired.Backend


@dataclass(frozen=True, slots=True)
class SourceRangeKey:
    """A loadBalancerSourceRanges entry of the service port `svc_id`."""

    svc_id: int
    network: desired.SourceRange


class Table(Protocol[K, V]):
    name: str
    max_entries: int

    def get(self, key: K) -> V | None: ...
    def put(self, key: K, value: V) -> None: ...
    def delete(self, key: K) -> bool: ...
    def items(self) -> Iterator[tuple[K, V]]: ...

    def put_many(self, items: Sequence[tuple[K, V]]) -> int:
        """Writes `items` in order, in as few syscalls as the map allows, and stops at the first
        that fails; returns how many were written. The caller learns why one failed by putting
        it alone (so a full map raises MapFull there, naming whose entry it was)."""
        ...


class FrontendTable(Table[desired.Frontend, FrontendValue], Protocol):
    def room_for(self, frontends: Iterable[desired.Frontend]) -> bool:
        """Whether all of `frontends` not in the table yet (nor waiting to be) can be added."""
        ...

    def put_later(self, fe: desired.Frontend, value: FrontendValue) -> None:
        """Adds a frontend that is not in the table: its slot is chosen now (MapFull if there is
        none), its writes wait for `flush`."""
        ...

    def cancel(self, fe: desired.Frontend) -> bool:
        """Forgets a frontend `put_later` added and `flush` has not written."""
        ...

    def flush(self) -> None:
        """Writes what `put_later` added, readers-safe (see KernelFrontendTable.flush)."""
        ...


# A backend set to write: its first slot, its id, its backends (one a slot, in order).
SetWrite = tuple[int, int, tuple[desired.Backend, ...]]


class BackendTable(Table[int, BackendSlot], Protocol):
    def put_sets(self, sets: Sequence[SetWrite]) -> int:
        """Writes every slot of `sets`, set after set, as `put_many` would write them as
        (index, BackendSlot) items, and returns how many slots were written as it does."""
        ...


class ArrayMap(Protocol):
    """An ARRAY map as `maps.PinnedMap` exposes it (a unit test may pass a stand-in)."""

    name: str
    max_entries: int
    layout: maps.Layout

    def get(self, key: ct.Structure | ct._SimpleCData) -> ct.Structure | None: ...
    def put(self, key: ct.Structure | ct._SimpleCData, leaf: ct.Structure) -> None: ...
    def put_batch(self, keys: ct.Array, leaves: ct.Array, count: int) -> tuple[int, libbpf.BpfError | None]: ...
    def read_all(self) -> ct.Array: ...


def mix64(x: int) -> int:
    """ctlb_mix64 in bpf/sock.c (murmur3's finaliser)."""
    x &= _U64
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _U64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _U64
    x ^= x >> 33
    return x


def scale32(hash_: int, n: int) -> int:
    """scale32 in bpf/sock.c: 32 bits of a hash onto [0, n)."""
    return ((hash_ & 0xFFFFFFFF) * n) >> 32


def key_hash(key_bytes: bytes) -> int:
    """The hash bpf/sock.c computes from a frontend key's bytes (state USED)."""
    if len(key_bytes) == 8:
        return mix64(int.from_bytes(key_bytes, "little"))
    w0 = int.from_bytes(key_bytes[0:8], "little")
    w1 = int.from_bytes(key_bytes[8:16], "little")
    w2 = int.from_bytes(key_bytes[16:20], "little")
    return mix64(w0 ^ (((w1 << 32) | (w1 >> 32)) & _U64) ^ (w2 << 16))  # fe6_hash


def _u32_array(values: Iterable[int]) -> ct.Array:
    """A __u32 array of `values` (a batch's keys): converted in C by the array module, ten
    times faster than a ctypes array's constructor at 40k values."""
    words = array.array("I", values)
    if words.itemsize != ct.sizeof(ct.c_uint32):
        return (ct.c_uint32 * len(words))(*words)
    return (ct.c_uint32 * len(words)).from_buffer(words)


def _map_full(table: str, max_entries: int, exc: libbpf.BpfError) -> errors.MapFull | libbpf.BpfError:
    # E2BIG: a hash at max_entries, or an index past an array's end; ENOMEM: no memory left.
    return errors.MapFull(table, max_entries) if exc.errno in (errno.E2BIG, errno.ENOMEM) else exc


class KernelTable(Generic[K, V]):
    """A PinnedMap (a hash) of one family seen through an encoder/decoder pair."""

    def __init__(self, pinned: maps.PinnedMap, *, encode_key: Callable[[K, ct.Structure], None],
                 decode_key: Callable[[ct.Structure], K], encode_value: Callable[[V, ct.Structure], None],
                 decode_value: Callable[[ct.Structure], V]) -> None:
        self.pinned = pinned
        self.name = pinned.name
        self.max_entries = pinned.max_entries
        self._encode_key = encode_key
        self._decode_key = decode_key
        self._encode_value = encode_value
        self._decode_value = decode_value

    def _key(self, key: K) -> ct.Structure:
        raw = self.pinned.layout.key()
        self._encode_key(key, raw)
        return raw

    def get(self, key: K) -> V | None:
        raw = self.pinned.get(self._key(key))
        return None if raw is None else self._decode_value(raw)

    def put(self, key: K, value: V) -> None:
        raw = self.pinned.layout.leaf()
        self._encode_value(value, raw)
        try:
            self.pinned.put(self._key(key), raw)
        except libbpf.BpfError as exc:
            raise _map_full(self.name, self.max_entries, exc) from exc

    def delete(self, key: K) -> bool:
        return self.pinned.delete(self._key(key))

    def put_many(self, items: Sequence[tuple[K, V]]) -> int:
        keys = (self.pinned.layout.key * len(items))()
        leaves = (self.pinned.layout.leaf * len(items))()
        key_size, leaf_size = ct.sizeof(self.pinned.layout.key), ct.sizeof(self.pinned.layout.leaf)
        for i, (key, value) in enumerate(items):
            # Encoded apart and copied in: an array of a simple type (a __u8 leaf) hands out
            # ints, not views its encoder could write into.
            raw_key = self._key(key)
            ct.memmove(ct.addressof(keys) + i * key_size, ct.addressof(raw_key), key_size)
            raw = self.pinned.layout.leaf()
            self._encode_value(value, raw)
            ct.memmove(ct.addressof(leaves) + i * leaf_size, ct.addressof(raw), leaf_size)
        done, _ = self.pinned.put_batch(keys, leaves, len(items))  # why it stopped: see Table.put_many
        return done

    def items(self) -> Iterator[tuple[K, V]]:
        for raw_key, raw_value in self.pinned.items():
            yield self._decode_key(raw_key), self._decode_value(raw_value)


class MemoryTable(Generic[K, V]):
    """A dict with a capacity, standing in for a map in unit tests of the reconciler."""

    def __init__(self, name: str, max_entries: int) -> None:
        self.name = name
        self.max_entries = max_entries
        self.data: dict[K, V] = {}
        self.pending: dict[K, V] = {}  # what `put_later` added, until `flush`

    def get(self, key: K) -> V | None:
        return self.data.get(key)

    def put(self, key: K, value: V) -> None:
        if key not in self.data and len(self.data) + len(self.pending) >= self.max_entries:
            raise errors.MapFull(self.name, self.max_entries)
        self.data[key] = value

    def delete(self, key: K) -> bool:
        return self.data.pop(key, None) is not None

    def items(self) -> Iterator[tuple[K, V]]:
        return iter(list(self.data.items()))

    def put_many(self, items: Sequence[tuple[K, V]]) -> int:
        for done, (key, value) in enumerate(items):
            try:
                self.put(key, value)
            except errors.MapFull:
                return done
        return len(items)

    def put_sets(self: MemoryTable[int, BackendSlot], sets: Sequence[SetWrite]) -> int:
        """BackendTable.put_sets, for a table of backend slots."""
        return self.put_many([(start + i, BackendSlot(set_id, backend))
                              for start, set_id, backends in sets for i, backend in enumerate(backends)])

    def room_for(self, keys: Iterable[K]) -> bool:
        new = {k for k in keys if k not in self.data and k not in self.pending}
        return len(self.data) + len(self.pending) + len(new) <= self.max_entries

    def put_later(self, key: K, value: V) -> None:
        if key not in self.pending and len(self.data) + len(self.pending) >= self.max_entries:
            raise errors.MapFull(self.name, self.max_entries)
        self.pending[key] = value

    def cancel(self, key: K) -> bool:
        return self.pending.pop(key, None) is not None

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for key, value in pending.items():
            self.put(key, value)


@dataclass(slots=True)
class FamilyTables:
    """The three tables the reconciler writes, for one address family."""

    frontends: FrontendTable
    backends: BackendTable  # slot index -> the set it belongs to and its backend
    members: Table[MemberKey, bool]
    source_ranges: Table[SourceRangeKey, bool]


def memory_tables(*, frontends_max: int = 1 << 16, backends_max: int = 1 << 19) -> dict[int, FamilyTables]:
    return {
        fam: FamilyTables(
            frontends=MemoryTable(maps.FRONTENDS[fam], frontends_max),
            backends=MemoryTable(maps.BACKENDS[fam], backends_max),
            members=MemoryTable(maps.MEMBERS[fam], backends_max),
            source_ranges=MemoryTable(maps.SOURCE_RANGES[fam], frontends_max),
        )
        for fam in (4, 6)
    }


# --- frontends: an open-addressed table in an array ----------------------------------------------


def _encode_fe_key(raw: ct.Structure, fe: desired.Frontend, state: int) -> None:
    netorder.put_addr(raw, fe.address)
    raw.port = netorder.be16(fe.port)
    raw.proto = PROTO_NUMBERS[fe.protocol]
    raw.state = state


def _fe_key_packer(key_type: type) -> struct.Struct:
    """A packer of (address bytes, port bytes, protocol, state) into a frontend key: the bytes
    `_encode_fe_key` writes."""
    return _packer(key_type, {"addr": "s", "port": "s", "proto": "B", "state": "B"})


def _fe_value_packer(value_type: type) -> struct.Struct:
    """A packer of a frontend value's fields, in the header's order: the bytes `_encode_fe_value`
    writes."""
    return _packer(value_type, dict.fromkeys(("svc_id", "set_id", "set_start", "count", "affinity_timeout", "flags"),
                                              "I"))


def _decode_fe_key(raw: ct.Structure, family: int) -> desired.Frontend:
    return desired.Frontend(netorder.get_addr(raw, family), netorder.from_be16(raw.port), PROTO_NAMES[raw.proto])


def _encode_fe_value(v: FrontendValue, raw: ct.Structure) -> None:
    raw.svc_id, raw.set_id, raw.set_start, raw.count = v.svc_id, v.set_id, v.start, v.count
    raw.affinity_timeout, raw.flags = v.affinity_timeout, v.flags


def _decode_fe_value(raw: ct.Structure) -> FrontendValue:
    return FrontendValue(raw.svc_id, raw.set_id, raw.count, raw.affinity_timeout, raw.flags, raw.set_start)


def _copy(raw: ct.Structure) -> ct.Structure:
    return type(raw).from_buffer_copy(raw)


def field_bytes(leaf: type, *path: str) -> tuple[int, int]:
    """Offset and size of a (nested) field in a ctypes structure type."""
    offset, typ = 0, leaf
    for name in path:
        field = getattr(typ, name)
        offset += field.offset
        typ = dict(typ._fields_)[name]
    return offset, ct.sizeof(typ)


def _packer(ctype: type, codes: dict[str, str]) -> struct.Struct:
    """A `struct.Struct` that packs the fields of `ctype` named in `codes`, given in the order the
    type declares them, at the offsets and sizes bcc's type gives (a layout the header defines);
    any other byte is zero. Code "s" takes bytes of the field's size (a network-order field,
    an address array); any other code a native integer of the field's size.

    Raises:
        ValueError: the type has fields `codes` does not name, in another order, or a field whose
            size the code does not fit.
    """
    names = [name for name, _ in ctype._fields_ if not name.startswith("pad")]
    if names != list(codes):
        raise ValueError(f"layout {ctype.__name__} has fields {names}, the packer knows {list(codes)}")
    fmt, at = "=", 0
    for name, code in codes.items():
        offset, size = field_bytes(ctype, name)
        if offset < at or (code != "s" and struct.calcsize("=" + code) != size):
            raise ValueError(f"layout {ctype.__name__}: field {name} does not pack as {code}")
        fmt += f"{offset - at}x" if offset > at else ""
        fmt += f"{size}s" if code == "s" else code
        at = offset + size
    fmt += f"{ct.sizeof(ctype) - at}x" if ct.sizeof(ctype) > at else ""
    packed = struct.Struct(fmt)
    if packed.size != ct.sizeof(ctype):
        raise ValueError(f"layout {ctype.__name__} does not pack as {fmt}")
    return packed


class KernelFrontendTable:
    """Frontends in an ARRAY map laid out as an open-addressed hash table (bpf/ctlb.h).

    A frontend sits in the first non-USED slot at most FE_PROBES slots after its home slot, so
    a lookup that meets an EMPTY slot or has probed FE_PROBES slots can stop. The table holds at
    most half as many frontends as it has slots. Every slot is written in the steps the header
    describes; this class keeps the image of each slot it wrote, so an update rewrites the bytes
    it does not mean to change with what they already hold.
    """

    def __init__(self, array: ArrayMap, family: int) -> None:
        self.array = array
        self.name = array.name
        self.family = family
        self.slots = array.max_entries
        self.max_entries = self.slots // 2
        self._leaf = array.layout.leaf
        self._key_type: type = dict(self._leaf._fields_)["key"]
        # Keys and values packed by `struct`, at the offsets of bcc's types (`_fe_key_packer`,
        # `_fe_value_packer`): a start from empty encodes 10k of each, which setting ctypes
        # fields one by one made several times slower.
        self._pack_key = _fe_key_packer(self._key_type).pack
        self._pack_value = _fe_value_packer(dict(self._leaf._fields_)["val"]._type_).pack
        self._image: dict[int, ct.Structure] = {}  # every slot that is not EMPTY
        self._where: dict[desired.Frontend, int] = {}
        self._state = bytearray(self.slots)
        # Frontends `put_later` added, with their chosen slot and key bytes (state USED), until
        # `flush` writes them.
        self._pending: dict[desired.Frontend, tuple[int, FrontendValue, bytes]] = {}
        self._pending_slots: set[int] = set()
        self._load()

    def _load(self) -> None:
        everything = self.array.read_all()
        size = ct.sizeof(self._leaf)
        state_at, _ = field_bytes(self._leaf, "key", "state")
        states = memoryview(everything).cast("B")[state_at::size]
        for idx, state in enumerate(states):
            if state == SLOT_EMPTY:
                continue
            raw = self._leaf.from_buffer_copy(everything, idx * size)
            self._state[idx] = state
            self._image[idx] = raw
            if state == SLOT_USED:
                self._where[_decode_fe_key(raw.key, self.family)] = idx

    # --- probing ------------------------------------------------------------------------------

    def home(self, fe: desired.Frontend) -> int:
        return self._home_of(self._used_key(fe))

    def _used_key(self, fe: desired.Frontend) -> bytes:
        """The key's bytes in state USED: what bpf/sock.c hashes and compares."""
        return self._pack_key(fe.address.packed, fe.port.to_bytes(2, "big"), PROTO_NUMBERS[fe.protocol], SLOT_USED)

    def _home_of(self, key: bytes) -> int:
        return scale32(key_hash(key), self.slots)

    def _free_slot(self, fe: desired.Frontend, taken: Collection[int] = (), *, home: int | None = None) -> int | None:
        home = self.home(fe) if home is None else home
        for i in range(min(FE_PROBES, self.slots)):  # the probe window, as bpf/sock.c walks it
            idx = (home + i) % self.slots
            if self._state[idx] != SLOT_USED and idx not in taken and idx not in self._pending_slots:
                return idx
        return None

    def _count(self) -> int:
        return len(self._where) + len(self._pending)

    def room_for(self, frontends: Iterable[desired.Frontend]) -> bool:
        new = [fe for fe in dict.fromkeys(frontends) if fe not in self._where and fe not in self._pending]
        if self._count() + len(new) > self.max_entries:
            return False
        taken: set[int] = set()
        for fe in new:
            idx = self._free_slot(fe, taken)
            if idx is None:
                return False
            taken.add(idx)
        return True

    def slot_of(self, fe: desired.Frontend) -> int | None:
        return self._where.get(fe)

    # --- the table API ----------------------------------------------------------------------

    def get(self, fe: desired.Frontend) -> FrontendValue | None:
        idx = self._where.get(fe)
        if idx is None:
            return None
        raw = self._image[idx]
        return _decode_fe_value(raw.val[raw.gen & 1])

    def put(self, fe: desired.Frontend, value: FrontendValue) -> None:
        self._not_pending(fe)
        idx = self._where.get(fe)
        if idx is not None:
            self._update(idx, value)
            return
        self._insert(self._slot_for(fe), fe, value)

    def _slot_for(self, fe: desired.Frontend, *, home: int | None = None) -> int:
        """A free slot for a new frontend; MapFull if the table holds its most, or if the
        FE_PROBES slots from its home are all taken."""
        if self._count() >= self.max_entries:
            raise errors.MapFull(self.name, self.max_entries)
        idx = self._free_slot(fe, home=home)
        if idx is None:
            raise errors.MapFull(self.name, self.max_entries)
        return idx

    def _not_pending(self, fe: desired.Frontend) -> None:
        if fe in self._pending:
            raise RuntimeError(f"frontend {fe} waits for flush: only put_later and cancel apply to it")

    def put_later(self, fe: desired.Frontend, value: FrontendValue) -> None:
        if fe in self._where:
            raise RuntimeError(f"put_later adds frontends: {fe} is in the table already")
        held = self._pending.get(fe)
        if held is not None:
            self._pending[fe] = (held[0], value, held[2])
            return
        key = self._used_key(fe)  # encoded once: for the home slot now, for the slot at flush
        idx = self._slot_for(fe, home=self._home_of(key))
        self._pending[fe] = (idx, value, key)
        self._pending_slots.add(idx)

    def cancel(self, fe: desired.Frontend) -> bool:
        held = self._pending.pop(fe, None)
        if held is None:
            return False
        self._pending_slots.discard(held[0])
        return True

    def flush(self) -> None:
        """Writes every frontend `put_later` added, in `_insert`'s two steps, each step for all
        of them in one batch: first each slot's key and both values under state TOMB, then each
        slot's state USED (the second batch rewrites every other byte with what it holds).

        Why readers stay safe: while the first batch runs, a slot reads as it was (EMPTY, or
        TOMB with some other key) or TOMB with the new key, and no lookup matches TOMB; a
        reader that probes past it finds what it would have found before. The second batch
        starts once the first has returned, so when a frontend turns USED its key and values
        are complete, and every slot between its home and it is USED or TOMB (a slot chosen
        for another pending frontend is TOMB by then): no probe for it can stop early at an
        EMPTY slot. One slot at a time gives the same two steps per slot; batching only puts
        other slots' first steps between them. Nothing here deletes or trims, and the slots
        are fresh ones, so no value a reader might be copying is rewritten.
        """
        if not self._pending:
            return
        order = sorted(self._pending.items(), key=lambda item: item[1][0])
        keys = _u32_array([idx for _, (idx, _, _) in order])
        tomb = self._tomb_slots([held for _, held in order])
        self._write_many(keys, (self._leaf * len(order)).from_buffer(tomb), SLOT_TOMB)
        used = bytearray(tomb)
        state_at, _ = field_bytes(self._leaf, "key", "state")
        used[state_at::ct.sizeof(self._leaf)] = bytes((SLOT_USED,)) * len(order)
        self._write_many(keys, (self._leaf * len(order)).from_buffer(used), SLOT_USED)
        for fe, (idx, _, _) in order:
            self._where[fe] = idx
        self._pending.clear()
        self._pending_slots.clear()

    def _tomb_slots(self, pending: Sequence[tuple[int, FrontendValue, bytes]]) -> bytearray:
        """The first step of `flush` for each pending frontend, slot after slot: the slot as it
        is (a TOMB slot reused keeps its gen, as `_insert` does), with the key under state TOMB
        and the value in both copies."""
        size = ct.sizeof(self._leaf)
        key_at, key_size = field_bytes(self._leaf, "key")
        state_at, _ = field_bytes(self._leaf, "key", "state")
        val_at, val_size = field_bytes(self._leaf, "val")
        copies = dict(self._leaf._fields_)["val"]._length_  # both copies: readers use either
        out = bytearray(size * len(pending))
        for i, (idx, value, key) in enumerate(pending):
            at = i * size
            image = self._image.get(idx)
            if image is not None:
                out[at:at + size] = bytes(image)
            out[at + key_at:at + key_at + key_size] = key
            out[at + state_at] = SLOT_TOMB
            packed = self._pack_value(value.svc_id, value.set_id, value.start, value.count,
                                      value.affinity_timeout, value.flags)
            out[at + val_at:at + val_at + val_size] = packed * copies
        return out

    def _write_many(self, keys: ct.Array, leaves: ct.Array, state: int) -> None:
        """`_write` for every slot (each in `state`), in one batch; should the kernel stop part
        way, the rest go one at a time, so the slot that fails raises its own error."""
        done, _ = self.array.put_batch(keys, leaves, len(keys))
        for idx, raw in zip(keys[:done], leaves[:done]):  # slices: one C call each, not 2 x 10k
            self._state[idx] = state
            self._image[idx] = raw
        for i in range(done, len(keys)):
            self._write(keys[i], leaves[i])

    def delete(self, fe: desired.Frontend) -> bool:
        self._not_pending(fe)
        idx = self._where.pop(fe, None)
        if idx is None:
            return False
        raw = _copy(self._image[idx])
        raw.key.state = SLOT_TOMB
        self._write(idx, raw)
        self._trim(idx)
        return True

    def items(self) -> Iterator[tuple[desired.Frontend, FrontendValue]]:
        for fe, idx in list(self._where.items()):
            raw = self._image[idx]
            yield fe, _decode_fe_value(raw.val[raw.gen & 1])

    # --- the write steps (bpf/ctlb.h, struct lb4_fe_slot) -----------------------------------

    def _insert(self, idx: int, fe: desired.Frontend, value: FrontendValue) -> None:
        """Key and both values under state TOMB, which no lookup matches; then state USED."""
        raw = _copy(self._image[idx]) if idx in self._image else self._leaf()
        _encode_fe_key(raw.key, fe, SLOT_TOMB)
        _encode_fe_value(value, raw.val[0])
        _encode_fe_value(value, raw.val[1])
        self._write(idx, raw)
        raw = _copy(raw)
        raw.key.state = SLOT_USED
        self._write(idx, raw)
        self._where[fe] = idx

    def _update(self, idx: int, value: FrontendValue) -> None:
        """The new value into the copy readers do not use, then the flip."""
        raw = _copy(self._image[idx])
        if _decode_fe_value(raw.val[raw.gen & 1]) == value:
            return
        _encode_fe_value(value, raw.val[(raw.gen + 1) & 1])
        self._write(idx, raw)
        raw = _copy(raw)
        raw.gen = (raw.gen + 1) & 0xFFFFFFFF
        self._write(idx, raw)

    def _trim(self, idx: int) -> None:
        """Tombstones that end a chain become EMPTY again, so misses stay short: no key lies
        beyond an EMPTY slot in its probe sequence, so none lies beyond these either."""
        if self._state[(idx + 1) % self.slots] != SLOT_EMPTY:
            return
        for _ in range(self.slots):
            if self._state[idx] != SLOT_TOMB:
                return
            raw = _copy(self._image[idx])
            raw.key.state = SLOT_EMPTY
            self._write(idx, raw)
            idx = (idx - 1) % self.slots

    def _write(self, idx: int, raw: ct.Structure) -> None:
        try:
            self.array.put(ct.c_uint32(idx), raw)
        except libbpf.BpfError as exc:
            raise _map_full(self.name, self.max_entries, exc) from exc
        state = raw.key.state
        self._state[idx] = state
        if state == SLOT_EMPTY:
            self._image.pop(idx, None)
        else:
            self._image[idx] = raw


# --- backends: slots of an array ---------------------------------------------------------------


class KernelBackendTable:
    """Backend slots in an ARRAY map: index -> (set id, backend); set id 0 is a free slot."""

    def __init__(self, array: ArrayMap, family: int) -> None:
        self.array = array
        self.name = array.name
        self.family = family
        self.max_entries = array.max_entries
        self._leaf = array.layout.leaf
        self._packer = _backend_packer(self._leaf)

    def get(self, idx: int) -> BackendSlot | None:
        raw = self.array.get(ct.c_uint32(idx))
        return None if raw is None or raw.set_id == 0 else self._decode(raw)

    def put(self, idx: int, slot: BackendSlot) -> None:
        raw = self._leaf()
        _encode_backend(slot, raw)
        try:
            self.array.put(ct.c_uint32(idx), raw)
        except libbpf.BpfError as exc:
            raise _map_full(self.name, self.max_entries, exc) from exc

    def put_many(self, items: Sequence[tuple[int, BackendSlot]]) -> int:
        # Packed into one buffer (what `_encode_backend` writes, at the same offsets): at 40k
        # slots, half the time of setting each field through ctypes.
        size, pack = ct.sizeof(self._leaf), self._packer.pack_into
        buf = bytearray(size * len(items))
        for i, (_, slot) in enumerate(items):
            backend = slot.backend
            pack(buf, i * size, backend.address.packed, backend.port.to_bytes(2, "big"), slot.set_id)
        return self._put_packed([idx for idx, _ in items], buf)

    def put_sets(self, sets: Sequence[SetWrite]) -> int:
        # Packed straight from each set's backends: a start from empty writes 40k slots, and
        # making a BackendSlot for each first cost as much again as packing them.
        size, pack = ct.sizeof(self._leaf), self._packer.pack_into
        indices: list[int] = []
        for start, _, backends in sets:
            indices += range(start, start + len(backends))
        buf = bytearray(size * len(indices))
        at = 0
        for _, set_id, backends in sets:
            for backend in backends:
                pack(buf, at, backend.address.packed, backend.port.to_bytes(2, "big"), set_id)
                at += size
        return self._put_packed(indices, buf)

    def _put_packed(self, indices: Sequence[int], packed: bytearray) -> int:
        """Writes packed slots to `indices` in one batch; how many were written."""
        keys = _u32_array(indices)
        leaves = (self._leaf * len(indices)).from_buffer(packed)
        done, _ = self.array.put_batch(keys, leaves, len(indices))  # why it stopped: see Table.put_many
        return done

    def delete(self, idx: int) -> bool:
        self.array.put(ct.c_uint32(idx), self._leaf())
        return True

    def items(self) -> Iterator[tuple[int, BackendSlot]]:
        everything = self.array.read_all()
        size = ct.sizeof(self._leaf)
        at, width = field_bytes(self._leaf, "set_id")
        assert width == 4 and at % 4 == 0 and size % 4 == 0
        set_ids = memoryview(everything).cast("B").cast("I")[at // 4::size // 4]
        for idx, set_id in enumerate(set_ids):
            if set_id:
                yield idx, self._decode(everything[idx])

    def _decode(self, raw: ct.Structure) -> BackendSlot:
        return BackendSlot(raw.set_id, desired.Backend(netorder.get_addr(raw, self.family), netorder.from_be16(raw.port)))


def _backend_packer(leaf: type) -> struct.Struct:
    """A packer of (address bytes, port bytes, set id) into a backend slot. Addresses and ports
    go in as network-order bytes, which is what the __be fields hold."""
    return _packer(leaf, {"addr": "s", "port": "s", "set_id": "I"})


def _encode_backend(slot: BackendSlot, raw: ct.Structure) -> None:
    netorder.put_addr(raw, slot.backend.address)
    raw.port = netorder.be16(slot.backend.port)
    raw.set_id = slot.set_id


def _encode_present(_: bool, raw: ct.c_uint8) -> None:
    raw.value = 1


def _decode_present(_: ct.c_uint8) -> bool:
    return True


# The value codec of a map whose keys are all it says (a set): one byte, always 1.
_PRESENCE: dict[str, Callable] = dict(encode_value=_encode_present, decode_value=_decode_present)


def _member_codec(family: int) -> dict[str, Callable]:
    def encode_key(key: MemberKey, raw: ct.Structure) -> None:
        raw.svc_id = key.svc_id
        netorder.put_addr(raw, key.backend.address)
        raw.port = netorder.be16(key.backend.port)

    def decode_key(raw: ct.Structure) -> MemberKey:
        return MemberKey(raw.svc_id, desired.Backend(netorder.get_addr(raw, family), netorder.from_be16(raw.port)))

    return dict(encode_key=encode_key, decode_key=decode_key, **_PRESENCE)


_SVC_ID_BITS = 32  # svc_id precedes the address in a source-range LPM key


def _source_range_codec(family: int) -> dict[str, Callable]:
    def encode_key(key: SourceRangeKey, raw: ct.Structure) -> None:
        raw.prefixlen = _SVC_ID_BITS + key.network.prefixlen
        raw.svc_id = key.svc_id
        netorder.put_addr(raw, key.network.network_address)

    def decode_key(raw: ct.Structure) -> SourceRangeKey:
        address = netorder.get_addr(raw, family)
        return SourceRangeKey(raw.svc_id, ipaddress.ip_network((address, raw.prefixlen - _SVC_ID_BITS)))

    return dict(encode_key=encode_key, decode_key=decode_key, **_PRESENCE)


def kernel_tables(pinned: dict[str, maps.PinnedMap]) -> dict[int, FamilyTables]:
    return {
        fam: FamilyTables(
            frontends=KernelFrontendTable(pinned[maps.FRONTENDS[fam]], fam),
            backends=KernelBackendTable(pinned[maps.BACKENDS[fam]], fam),
            members=KernelTable(pinned[maps.MEMBERS[fam]], **_member_codec(fam)),
            source_ranges=KernelTable(pinned[maps.SOURCE_RANGES[fam]], **_source_range_codec(fam)),
        )
        for fam in (4, 6)
    }
