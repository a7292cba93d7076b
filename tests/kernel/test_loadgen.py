"""The benchmark load generator (`bench/loadgen`) in a lab: direct pod-to-pod, both IP families.

The clients must count what they do and what fails, so that the benchmarks built on them can be
trusted: connections and transactions go through with no errors, latency percentiles are
ordered, and a port nobody listens on shows up as ECONNREFUSED instead of as a fast result.
"""

from __future__ import annotations

import errno
import ipaddress
import pathlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from bench import loadgen
from ctlb import lab as ctlb_lab

pytestmark = pytest.mark.kernel

TCP_PORT = 8080
ECHO_PORT = 8081
UDP_PORT = 8082
CLOSED_PORT = 9
CRR_SECONDS = 1.0
RR_SECONDS = 0.5
MIN_CONNECTIONS = 1000


@dataclass(frozen=True, slots=True)
class Pair:
    """A server pod running all three loadgen servers, and a client pod."""

    server: ctlb_lab.Pod
    client: ctlb_lab.Pod

    def address(self, family: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The server pod's address of the family ("ipv4" or "ipv6")."""
        address = self.server.ipv4 if family == "ipv4" else self.server.ipv6
        assert address is not None
        return address


@pytest.fixture
def gcc(unavailable: Callable[[str], None]) -> None:
    """Skip (fail under CI=true) without gcc: the load generator is built from C."""
    if shutil.which("gcc") is None:
        unavailable("needs gcc to build bench/loadgen.c")


@pytest.fixture
def pair(lab: ctlb_lab.Lab, gcc: None) -> Pair:
    """Dual-stack server and client pods; the server pod runs the crr, echo and udp servers."""
    server = lab.add_pod("server", ipv6=True)
    client = lab.add_pod("client", ipv6=True)
    loadgen.start_tcp_server(server, port=TCP_PORT)
    loadgen.start_tcp_server(server, port=ECHO_PORT, echo=True)
    loadgen.start_udp_server(server, port=UDP_PORT)
    return Pair(server=server, client=client)


def _assert_clean(result: loadgen.Result, *, count: str, at_least: int) -> None:
    """No errors, enough operations, and latency figures in a sane order."""
    assert result["errors"] == 0, result
    assert result["first_errno"] == 0, result
    assert result[count] >= at_least, result
    assert 0 < result["min_us"] <= result["p50_us"] <= result["p90_us"], result
    assert result["p90_us"] <= result["p99_us"] <= result["max_us"], result
    assert result["min_us"] <= result["mean_us"] <= result["max_us"], result
    assert result["rate"] > 0, result


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_tcp_crr_opens_connections_without_errors(pair: Pair, family: str) -> None:
    result = loadgen.tcp_crr(
        pair.client, host=pair.address(family), port=TCP_PORT, seconds=CRR_SECONDS
    )
    _assert_clean(result, count="connections", at_least=MIN_CONNECTIONS)
    assert result["seconds"] >= CRR_SECONDS, result


def test_tcp_crr_stops_at_max_connections(pair: Pair) -> None:
    result = loadgen.tcp_crr(
        pair.client, host=pair.server.ipv4, port=TCP_PORT, seconds=5.0, max_connections=200
    )
    assert result["connections"] == 200, result
    assert result["errors"] == 0, result


def test_tcp_server_counts_what_it_accepted(lab: ctlb_lab.Lab, gcc: None) -> None:
    server, client = lab.add_pod("server"), lab.add_pod("client")
    proc = loadgen.start_tcp_server(server, port=TCP_PORT)
    result = loadgen.tcp_crr(
        client, host=server.ipv4, port=TCP_PORT, seconds=2.0, max_connections=500
    )
    counters = loadgen.stop(proc)
    assert result["connections"] == 500, result
    assert counters["accepted"] == 500, counters
    assert counters["accept_errors"] == 0, counters


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_tcp_rr_exchanges_without_errors(pair: Pair, family: str) -> None:
    result = loadgen.tcp_rr(
        pair.client, host=pair.address(family), port=ECHO_PORT, seconds=RR_SECONDS
    )
    _assert_clean(result, count="transactions", at_least=100)


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "unconnected"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_udp_rr_exchanges_without_errors(pair: Pair, family: str, connected: bool) -> None:
    result = loadgen.udp_rr(
        pair.client, host=pair.address(family), port=UDP_PORT, seconds=RR_SECONDS,
        connected=connected,
    )  # fmt: skip
    _assert_clean(result, count="transactions", at_least=100)
    assert result["source_mismatch"] == 0, result


def test_tcp_crr_counts_refused_connections(lab: ctlb_lab.Lab, gcc: None) -> None:
    server, client = lab.add_pod("server"), lab.add_pod("client")
    result = loadgen.tcp_crr(client, host=server.ipv4, port=CLOSED_PORT, seconds=0.2)
    assert result["connections"] == 0, result
    assert result["errors"] > 0, result
    assert result["first_errno"] == errno.ECONNREFUSED, result
    assert result["rate"] == 0, result


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "unconnected"])
def test_udp_rr_counts_unanswered_requests(
    lab: ctlb_lab.Lab, gcc: None, connected: bool
) -> None:
    """Connected: the ICMP port unreachable surfaces as ECONNREFUSED. Unconnected: it cannot,
    so each request times out after 1 s."""
    server, client = lab.add_pod("server"), lab.add_pod("client")
    result = loadgen.udp_rr(
        client, host=server.ipv4, port=CLOSED_PORT, seconds=0.3, connected=connected
    )
    assert result["transactions"] == 0, result
    assert result["errors"] > 0, result
    expected = errno.ECONNREFUSED if connected else errno.ETIMEDOUT
    assert result["first_errno"] == expected, result


def test_tune_sets_client_sysctls_in_the_pod_only(lab: ctlb_lab.Lab) -> None:
    pod = lab.add_pod("client")
    loadgen.tune(pod)
    done = pod.run(["sysctl", "-n", *loadgen.CLIENT_SYSCTLS], check=True)
    values = [" ".join(line.split()) for line in done.stdout.splitlines()]
    assert values == list(loadgen.CLIENT_SYSCTLS.values())


def test_build_caches_by_source(tmp_path: pathlib.Path, gcc: None) -> None:
    first = loadgen.build(cache_dir=tmp_path)
    mtime = first.stat().st_mtime_ns
    second = loadgen.build(cache_dir=tmp_path)
    assert first == second
    assert second.stat().st_mtime_ns == mtime
    assert first.parent == tmp_path


def test_build_reports_gcc_errors(
    tmp_path: pathlib.Path, gcc: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "loadgen.c"
    broken.write_text("int main(void) { return missing_symbol; }\n")
    monkeypatch.setattr(loadgen, "SOURCE", broken)
    with pytest.raises(loadgen.LoadgenError, match="missing_symbol"):
        loadgen.build(cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())
