"""Typed views of the load-balancing maps: Python values in, ctypes structs out.

The reconciler speaks in `desired` values (Frontend, Backend) and the small records below; the
kernel tables encode them into the bcc-generated structs of one address family each. A unit test
may hand the reconciler `MemoryTable`s instead; what the kernel does is proven in kernel tests.
"""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from ctlb import desired, errors, model
from ctlb.datapath import libbpf, maps

K = TypeVar("K")
V = TypeVar("V")

PROTO_NUMBERS = {model.Protocol.TCP: socket.IPPROTO_TCP, model.Protocol.UDP: socket.IPPROTO_UDP,
                 model.Protocol.SCTP: socket.IPPROTO_SCTP}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}

# enum lb_flags in bpf/ctlb.h
LB_F_AFFINITY = 1 << 0


@dataclass(frozen=True, slots=True)
class FrontendValue:
    svc_id: int
    set_id: int
    count: int
    affinity_timeout: int = 0
    flags: int = 0


@dataclass(frozen=True, slots=True, order=True)
class SlotKey:
    family: int  # 4 or 6: which backend map holds the slot
    set_id: int
    slot: int


@dataclass(frozen=True, slots=True, order=True)
class MemberKey:
    svc_id: int
    backend: desired.Backend


class Table(Protocol[K, V]):
    name: str
    max_entries: int

    def get(self, key: K) -> V | None: ...
    def put(self, key: K, value: V) -> None: ...
    def delete(self, key: K) -> bool: ...
    def items(self) -> Iterator[tuple[K, V]]: ...


def _be32(packed: bytes) -> int:
    """Network-order bytes as the native integer a __be32 field holds."""
    return int.from_bytes(packed, sys.byteorder)


def _be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


def _from_be16(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, sys.byteorder), "big")


def _put_addr(struct: ct.Structure, address: model.IPAddress) -> None:
    if address.version == 4:
        struct.addr = _be32(address.packed)
    else:
        for i in range(4):
            struct.addr[i] = _be32(address.packed[4 * i:4 * i + 4])


def _get_addr(struct: ct.Structure, family: int) -> model.IPAddress:
    if family == 4:
        return ipaddress.IPv4Address(int(struct.addr).to_bytes(4, sys.byteorder))
    raw = b"".join(int(struct.addr[i]).to_bytes(4, sys.byteorder) for i in range(4))
    return ipaddress.IPv6Address(raw)


class KernelTable(Generic[K, V]):
    """A PinnedMap of one family seen through an encoder/decoder pair."""

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
            if exc.errno in (errno.E2BIG, errno.ENOMEM):  # the map is at max_entries
                raise errors.MapFull(self.name, self.max_entries) from exc
            raise

    def delete(self, key: K) -> bool:
        return self.pinned.delete(self._key(key))

    def items(self) -> Iterator[tuple[K, V]]:
        for raw_key, raw_value in self.pinned.items():
            yield self._decode_key(raw_key), self._decode_value(raw_value)


class MemoryTable(Generic[K, V]):
    """A dict with a capacity, standing in for a map in unit tests of the reconciler."""

    def __init__(self, name: str, max_entries: int) -> None:
        self.name = name
        self.max_entries = max_entries
        self.data: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self.data.get(key)

    def put(self, key: K, value: V) -> None:
        if key not in self.data and len(self.data) >= self.max_entries:
            raise errors.MapFull(self.name, self.max_entries)
        self.data[key] = value

    def delete(self, key: K) -> bool:
        return self.data.pop(key, None) is not None

    def items(self) -> Iterator[tuple[K, V]]:
        return iter(list(self.data.items()))


@dataclass(slots=True)
class FamilyTables:
    """The three tables the reconciler writes, for one address family."""

    frontends: Table[desired.Frontend, FrontendValue]
    backends: Table[SlotKey, desired.Backend]
    members: Table[MemberKey, bool]


def memory_tables(*, frontends_max: int = 1 << 16, backends_max: int = 1 << 19) -> dict[int, FamilyTables]:
    return {
        fam: FamilyTables(
            frontends=MemoryTable(maps.FRONTENDS[fam], frontends_max),
            backends=MemoryTable(maps.BACKENDS[fam], backends_max),
            members=MemoryTable(maps.MEMBERS[fam], backends_max),
        )
        for fam in (4, 6)
    }


def _frontend_codec(family: int) -> dict[str, Callable]:
    def encode_key(fe: desired.Frontend, raw: ct.Structure) -> None:
        _put_addr(raw, fe.address)
        raw.port = _be16(fe.port)
        raw.proto = PROTO_NUMBERS[fe.protocol]

    def decode_key(raw: ct.Structure) -> desired.Frontend:
        return desired.Frontend(_get_addr(raw, family), _from_be16(raw.port), PROTO_NAMES[raw.proto])

    def encode_value(v: FrontendValue, raw: ct.Structure) -> None:
        raw.svc_id, raw.set_id, raw.count = v.svc_id, v.set_id, v.count
        raw.affinity_timeout, raw.flags = v.affinity_timeout, v.flags

    def decode_value(raw: ct.Structure) -> FrontendValue:
        return FrontendValue(raw.svc_id, raw.set_id, raw.count, raw.affinity_timeout, raw.flags)

    return dict(encode_key=encode_key, decode_key=decode_key, encode_value=encode_value,
                decode_value=decode_value)


def _backend_codec(family: int) -> dict[str, Callable]:
    def encode_key(key: SlotKey, raw: ct.Structure) -> None:
        raw.set_id, raw.slot = key.set_id, key.slot

    def decode_key(raw: ct.Structure) -> SlotKey:
        return SlotKey(family, raw.set_id, raw.slot)

    def encode_value(be: desired.Backend, raw: ct.Structure) -> None:
        _put_addr(raw, be.address)
        raw.port = _be16(be.port)

    def decode_value(raw: ct.Structure) -> desired.Backend:
        return desired.Backend(_get_addr(raw, family), _from_be16(raw.port))

    return dict(encode_key=encode_key, decode_key=decode_key, encode_value=encode_value,
                decode_value=decode_value)


def _member_codec(family: int) -> dict[str, Callable]:
    def encode_key(key: MemberKey, raw: ct.Structure) -> None:
        raw.svc_id = key.svc_id
        _put_addr(raw, key.backend.address)
        raw.port = _be16(key.backend.port)

    def decode_key(raw: ct.Structure) -> MemberKey:
        return MemberKey(raw.svc_id, desired.Backend(_get_addr(raw, family), _from_be16(raw.port)))

    def encode_value(_: bool, raw: ct.c_uint8) -> None:
        raw.value = 1

    def decode_value(_: ct.c_uint8) -> bool:
        return True

    return dict(encode_key=encode_key, decode_key=decode_key, encode_value=encode_value,
                decode_value=decode_value)


def kernel_tables(pinned: dict[str, maps.PinnedMap]) -> dict[int, FamilyTables]:
    return {
        fam: FamilyTables(
            frontends=KernelTable(pinned[maps.FRONTENDS[fam]], **_frontend_codec(fam)),
            backends=KernelTable(pinned[maps.BACKENDS[fam]], **_backend_codec(fam)),
            members=KernelTable(pinned[maps.MEMBERS[fam]], **_member_codec(fam)),
        )
        for fam in (4, 6)
    }
