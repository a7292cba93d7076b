"""The value classes of `model` and `desired`: what being msgspec Structs must not change.

Frontend and ServicePortName cache their hash (msgspec's cache_hash); the cache is no field: it
is not compared, not shown, not passed, and a replaced value hashes as a fresh one.
"""

from __future__ import annotations

import ipaddress

import msgspec
import pytest

from ctlb import desired, model

TCP, UDP = model.Protocol.TCP, model.Protocol.UDP
IPv4 = model.IPFamily.IPv4

FRONTEND = desired.Frontend(ipaddress.ip_address("10.96.0.1"), 80, TCP)
NAME = desired.ServicePortName("shop", "web", "http", TCP, IPv4)

CACHED = [
    pytest.param(FRONTEND, {"port": 81}, id="frontend"),
    pytest.param(NAME, {"protocol": UDP}, id="service-port-name"),
]


@pytest.mark.parametrize(("value", "change"), CACHED)
def test_a_replaced_value_hashes_as_a_fresh_one(value: msgspec.Struct, change: dict[str, object]) -> None:
    hash(value)  # fills the cache, which replace must not carry over
    replaced = msgspec.structs.replace(value, **change)
    fresh = type(value)(**{**msgspec.structs.asdict(value), **change})
    assert replaced == fresh
    assert hash(replaced) == hash(fresh)


@pytest.mark.parametrize(("value", "change"), CACHED)
def test_the_cached_hash_is_no_field(value: msgspec.Struct, change: dict[str, object]) -> None:
    names = [f.name for f in msgspec.structs.fields(value)]
    assert list(msgspec.structs.asdict(value)) == names
    assert repr(value) == f"{type(value).__name__}(" + ", ".join(
        f"{name}={getattr(value, name)!r}" for name in names) + ")"
    with pytest.raises(TypeError):
        type(value)(**msgspec.structs.asdict(value), _hash=0)


def test_service_port_names_order_field_by_field() -> None:
    names = [desired.ServicePortName(ns, name, port, protocol, family)
             for ns in ("a", "b") for name in ("api", "web") for port in ("", "http")
             for protocol in (UDP, TCP) for family in (model.IPFamily.IPv6, IPv4)]
    assert sorted(names) == sorted(names, key=msgspec.structs.astuple)


@pytest.mark.parametrize("value", [
    pytest.param(FRONTEND, id="frontend"),
    pytest.param(model.Endpoint((ipaddress.ip_address("10.244.0.2"),)), id="endpoint"),
    pytest.param(desired.DesiredState(), id="desired-state"),
])
def test_values_are_immutable(value: msgspec.Struct) -> None:
    name = msgspec.structs.fields(value)[0].name
    with pytest.raises(AttributeError):
        setattr(value, name, getattr(value, name))


def test_a_desired_state_gets_a_mapping_of_its_own() -> None:
    assert desired.DesiredState().service_ports is not desired.DesiredState().service_ports
