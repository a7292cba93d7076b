"""socket-trace's user side: decoding the programs' events with the header's layout, naming them,
filtering and printing."""

from __future__ import annotations

import ctypes as ct
import datetime
import ipaddress
import json
import os
import pathlib
import socket
import sys

import pytest

from ctlb import trace
from ctlb.datapath import maps

SERVICE = "shop/cart:http/TCP/IPv4"


@pytest.fixture(scope="module")
def layouts() -> dict[str, maps.Layout]:
    pytest.importorskip("bcc")
    return maps.compile_layouts()


@pytest.fixture(scope="module")
def event_type(layouts: dict[str, maps.Layout]) -> type:
    return layouts[maps.TRACE_EVENT].leaf


@pytest.fixture
def names(tmp_path: pathlib.Path, layouts: dict[str, maps.Layout]) -> trace.Names:
    (tmp_path / "names.json").write_text(json.dumps({"services": {"7": SERVICE}, "pods": {"3": "shop/client-1"}}))
    # No frontend tables in a folder without pins: addresses find no service.
    return trace.Names(tmp_path, tmp_path / "no-bpffs", layouts)


def _be32(address: str) -> int:
    return int.from_bytes(ipaddress.IPv4Address(address).packed, sys.byteorder)


def _be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


def _event(event_type: type, *, verdict: int, hook: int = 1, svc_id: int = 7, pod_id: int = 3,
           to: tuple[str, int] = ("10.0.1.5", 8080)) -> bytes:
    ev = event_type()
    ev.ktime_ns, ev.cookie, ev.cgroup_id, ev.tgid = 5, 99, 1234, 4321
    ev.pod_id, ev.svc_id, ev.hook, ev.verdict = pod_id, svc_id, hook, verdict
    ev.proto, ev.family = socket.IPPROTO_TCP, trace.AF_INET
    ev.from_addr[0], ev.from_port = _be32("10.96.0.10"), _be16(80)
    ev.to_addr[0], ev.to_port = _be32(to[0]), _be16(to[1])
    ev.comm = b"curl"
    return bytes(ev)


def test_a_balanced_connect_is_named_and_printed(event_type: type, names: trace.Names) -> None:
    d = trace.Decoder(event_type, names).decode(_event(event_type, verdict=1))
    assert (d.hook, d.protocol, d.verdict, d.errno) == ("connect4", "TCP", "balanced", None)
    assert (d.asked, d.got, d.service, d.pod, d.comm, d.pid) == (
        "10.96.0.10:80", "10.0.1.5:8080", SERVICE, "shop/client-1", "curl", 4321)
    assert "shop/client-1 curl[4321] 10.96.0.10:80 -> 10.0.1.5:8080 shop/cart:http/TCP/IPv4 balanced" in d.line()
    assert json.loads(json.dumps(d.as_json()))["to"] == "10.0.1.5:8080"


def test_a_refusal_has_an_errno_and_no_destination(event_type: type, names: trace.Names) -> None:
    d = trace.Decoder(event_type, names).decode(_event(event_type, verdict=4, to=("0.0.0.0", 0)))
    assert (d.verdict, d.errno, d.got) == ("refused", "ECONNREFUSED", None)
    assert "10.96.0.10:80 -> ECONNREFUSED" in d.line()


def test_unknown_ids_stay_unnamed(event_type: type, names: trace.Names) -> None:
    d = trace.Decoder(event_type, names).decode(_event(event_type, verdict=7, svc_id=0, pod_id=0))
    assert (d.verdict, d.service, d.pod) == ("mesh", None, None)
    assert " node curl[4321] " in d.line()


def test_the_names_file_is_read_again_when_it_changes(tmp_path: pathlib.Path,
                                                       layouts: dict[str, maps.Layout]) -> None:
    (tmp_path / "names.json").write_text(json.dumps({"services": {"7": SERVICE}}))
    names = trace.Names(tmp_path, tmp_path / "no-bpffs", layouts, refresh_s=0.0)
    assert names.service(8) is None
    path = tmp_path / "names.json"
    path.write_text(json.dumps({"services": {"8": "shop/new:80/TCP/IPv4"}}))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert names.service(8) == "shop/new:80/TCP/IPv4"


def _decision(pod: str | None, service: str | None) -> trace.Decision:
    return trace.Decision(time=datetime.datetime.now(), hook="connect4", protocol="TCP", verdict="balanced",
                          reason="", errno=None, asked="10.96.0.10:80", got="10.0.1.5:8080", service=service,
                          svc_id=7, pod=pod, pid=1, comm="curl", cgroup_id=1, cookie=1)


@pytest.mark.parametrize(("wanted", "pod", "service", "admitted"), [
    (trace.Filter(), None, None, True),
    (trace.Filter(namespace="shop"), "shop/client-1", None, True),
    (trace.Filter(namespace="shop"), "other/client-1", SERVICE, False),
    (trace.Filter(namespace="shop"), None, SERVICE, False),  # the node is in no namespace
    (trace.Filter(pod="client-1"), "shop/client-1", None, True),
    (trace.Filter(pod="shop/client-1"), "other/client-1", None, False),
    (trace.Filter(pod="client"), "shop/client-1", None, False),
    (trace.Filter(service="shop/cart"), None, SERVICE, True),
    (trace.Filter(service="shop/cart"), None, "shop/cart/UDP/IPv4", True),  # an unnamed port
    (trace.Filter(service="shop/car"), None, SERVICE, False),
    (trace.Filter(service="shop/cart"), None, None, False),
])
def test_filters(wanted: trace.Filter, pod: str | None, service: str | None, admitted: bool) -> None:
    assert wanted.admits(_decision(pod, service)) is admitted


def test_event_layout_is_the_headers(event_type: type) -> None:
    names = [name for name, _ in event_type._fields_]
    assert names[:4] == ["ktime_ns", "cookie", "cgroup_id", "tgid"]
    assert ct.sizeof(event_type) % 8 == 0
