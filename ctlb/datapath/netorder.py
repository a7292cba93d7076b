"""Network-order fields of the BPF structs, as the native integers bcc's ctypes types hold."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import sys

from ctlb import model


def be32(packed: bytes) -> int:
    """Network-order bytes as the native integer a __be32 field holds."""
    return int.from_bytes(packed, sys.byteorder)


def be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


def from_be16(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, sys.byteorder), "big")


def put_addr(struct: ct.Structure, address: model.IPAddress, field: str = "addr") -> None:
    """Writes `address` into `struct.<field>`: a __be32, or a __be32[4] for IPv6."""
    if address.version == 4:
        setattr(struct, field, be32(address.packed))
    else:
        words = getattr(struct, field)
        for i in range(4):
            words[i] = be32(address.packed[4 * i:4 * i + 4])


def get_addr(struct: ct.Structure, family: int, field: str = "addr") -> model.IPAddress:
    value = getattr(struct, field)
    if family == 4:
        return ipaddress.IPv4Address(int(value).to_bytes(4, sys.byteorder))
    raw = b"".join(int(value[i]).to_bytes(4, sys.byteorder) for i in range(4))
    return ipaddress.IPv6Address(raw)
