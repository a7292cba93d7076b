"""kube-proxy's health servers as ctlb serves them: real sockets on loopback, asked by real curl."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from structlog.testing import capture_logs

from ctlb import healthcheck, model, semantics
from ctlb.sources import store

IPv4, IPv6 = model.IPFamily.IPv4, model.IPFamily.IPv6
GO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int | None  # None: the connection failed
    headers: dict[str, str]
    body: str


@pytest.fixture(autouse=True)
def _curl(unavailable) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("curl") is None:
        unavailable("needs curl")


def curl(url: str, *args: str) -> Answer:
    out = subprocess.run(["curl", "-sS", "-i", "--max-time", "5", *args, url], capture_output=True, timeout=10)
    if out.returncode != 0:
        return Answer(None, {}, out.stderr.decode())
    head, _, body = out.stdout.decode().partition("\r\n\r\n")
    status_line, *lines = head.split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
    return Answer(int(status_line.split()[1]), headers, body)


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return int(s.getsockname()[1])


def check(port: int, *, v4: int = 1, v6: int | None = None, name: str = "web") -> semantics.HealthCheck:
    counts = ((IPv4, v4),) if v6 is None else ((IPv4, v4), (IPv6, v6))
    return semantics.HealthCheck(namespace="shop", name=name, port=port, local_endpoints=counts)


def synced_health(*, pending: float | None = None, timeout: float = 60.0) -> healthcheck.ProxyHealth:
    health = healthcheck.ProxyHealth(timeout=timeout, pending=lambda: pending)
    health.updated()
    health.set_node_eligible(True)
    return health


@pytest.fixture
def servers() -> Iterator[healthcheck.ServiceHealthServers]:
    s = healthcheck.ServiceHealthServers(health=synced_health())
    try:
        yield s
    finally:
        s.close()


# --- a Service's health check -----------------------------------------------------------------


def test_a_local_endpoint_answers_200_with_kube_proxys_body_and_headers(
        servers: healthcheck.ServiceHealthServers) -> None:
    port = free_port()
    servers.update({("shop", "web"): check(port, v4=2)})

    answer = curl(f"http://127.0.0.1:{port}/")

    assert answer.status == 200
    assert answer.body == ('{\n\t"service": {\n\t\t"namespace": "shop",\n\t\t"name": "web"\n\t},\n'
                           '\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}')
    assert (answer.headers["content-type"], answer.headers["x-content-type-options"],
            answer.headers["x-load-balancing-endpoint-weight"]) == ("application/json", "nosniff", "2")


def test_no_local_endpoint_answers_503(servers: healthcheck.ServiceHealthServers) -> None:
    port = free_port()
    servers.update({("shop", "web"): check(port, v4=0)})

    answer = curl(f"http://127.0.0.1:{port}/")

    assert (answer.status, json.loads(answer.body)["localEndpoints"]) == (503, 0)


def test_an_unhealthy_proxy_answers_503_even_with_local_endpoints() -> None:
    stale = healthcheck.ServiceHealthServers(health=synced_health(pending=time.monotonic() - 120, timeout=60))
    port = free_port()
    try:
        stale.update({("shop", "web"): check(port, v4=1)})
        answer = curl(f"http://127.0.0.1:{port}/")
    finally:
        stale.close()

    body = json.loads(answer.body)
    assert (answer.status, body["localEndpoints"], body["serviceProxyHealthy"]) == (503, 1, False)


@pytest.mark.parametrize("args", [(), ("-X", "POST", "--data", "x=1"), ("-I",)], ids=["get", "post", "head"])
def test_any_path_and_method_gets_the_answer(servers: healthcheck.ServiceHealthServers, args: tuple[str, ...]) -> None:
    port = free_port()
    servers.update({("shop", "web"): check(port, v4=1)})

    answer = curl(f"http://127.0.0.1:{port}/anything/at/all?x=1", *args)

    assert (answer.status, answer.headers["content-type"]) == (200, "application/json")


def test_a_new_count_is_answered_on_the_same_listener(servers: healthcheck.ServiceHealthServers) -> None:
    port = free_port()
    servers.update({("shop", "web"): check(port, v4=1)})
    first = curl(f"http://127.0.0.1:{port}/")

    servers.update({("shop", "web"): check(port, v4=0)})

    assert (first.status, curl(f"http://127.0.0.1:{port}/").status) == (200, 503)


def test_a_port_change_moves_the_listener(servers: healthcheck.ServiceHealthServers) -> None:
    old, new = free_port(), free_port()
    servers.update({("shop", "web"): check(old)})

    servers.update({("shop", "web"): check(new)})

    assert (curl(f"http://127.0.0.1:{old}/").status, curl(f"http://127.0.0.1:{new}/").status) == (None, 200)


def test_a_removed_check_stops_listening(servers: healthcheck.ServiceHealthServers) -> None:
    port = free_port()
    servers.update({("shop", "web"): check(port)})

    servers.update({})

    assert curl(f"http://127.0.0.1:{port}/").status is None
    assert servers.status() == []


def test_two_services_may_swap_ports_in_one_update(servers: healthcheck.ServiceHealthServers) -> None:
    a, b = free_port(), free_port()
    servers.update({("shop", "one"): check(a, v4=1, name="one"), ("shop", "two"): check(b, v4=0, name="two")})

    servers.update({("shop", "one"): check(b, v4=1, name="one"), ("shop", "two"): check(a, v4=0, name="two")})

    assert (curl(f"http://127.0.0.1:{a}/").status, curl(f"http://127.0.0.1:{b}/").status) == (503, 200)
    assert servers.problems() == []


def test_a_port_in_use_is_reported_for_its_service_and_the_others_keep_serving(
        servers: healthcheck.ServiceHealthServers, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(healthcheck, "RETRY_INTERVAL", 0.0)
    busy, fine = free_port(), free_port()
    holder = healthcheck.listen(healthcheck.BindAddress("", busy))
    try:
        with capture_logs() as logs:
            servers.update({("shop", "busy"): check(busy, name="busy"), ("shop", "web"): check(fine)})
            servers.retry()  # still in use: not logged a second time
        problems = servers.problems()
        serving = curl(f"http://127.0.0.1:{fine}/").status
    finally:
        holder.close()

    assert [p.ref for p in problems] == ["Service shop/busy"]
    assert f"healthCheckNodePort {busy}" in problems[0].reason and "Address already in use" in problems[0].reason
    assert [e["service"] for e in logs if e["event"] == "health_check_listen_failed"] == ["shop/busy"]
    assert serving == 200
    assert (servers.retry(), servers.problems(), curl(f"http://127.0.0.1:{busy}/").status) == (True, [], 200)


def test_a_check_over_ipv6_is_answered_with_the_ipv6_count(servers: healthcheck.ServiceHealthServers) -> None:
    port = free_port()
    servers.update({("shop", "web"): check(port, v4=2, v6=0)})

    v4, v6 = curl(f"http://127.0.0.1:{port}/"), curl(f"http://[::1]:{port}/")

    assert (v4.status, json.loads(v4.body)["localEndpoints"]) == (200, 2)
    assert (v6.status, json.loads(v6.body)["localEndpoints"]) == (503, 0)


def test_status_lists_each_check() -> None:
    servers = healthcheck.ServiceHealthServers(health=synced_health(), host="127.0.0.1")
    port = free_port()
    try:
        servers.update({("shop", "web"): check(port, v4=1, v6=0)})
        status = servers.status()
    finally:
        servers.close()

    assert status == [{"service": "shop/web", "port": port, "listening": True, "address": f"127.0.0.1:{port}",
                       "local_endpoints": {"IPv4": 1, "IPv6": 0}, "error": None}]


# --- the proxy's own server -------------------------------------------------------------------


def _healthz(health: healthcheck.ProxyHealth) -> Iterator[str]:
    server = healthcheck.ProxyHealthServer(healthcheck.BindAddress("127.0.0.1", 0), health=health)
    try:
        status = server.status()
        assert status["listening"] is True
        yield f"http://{status['address']}"
    finally:
        server.close()


@pytest.fixture
def healthz() -> Iterator[str]:
    yield from _healthz(synced_health())


def test_healthz_answers_200_with_kube_proxys_fields(healthz: str) -> None:
    answer = curl(f"{healthz}/healthz")

    body = json.loads(answer.body)
    assert (answer.status, answer.headers["content-type"], answer.headers["x-content-type-options"]) == (
        200, "application/json", "nosniff")
    assert list(body) == ["lastUpdated", "currentTime", "nodeEligible", "healthy", "status"]
    assert (body["nodeEligible"], body["healthy"]) == (True, True)
    assert body["status"] == {"IPv4": {"lastUpdated": body["status"]["IPv4"]["lastUpdated"], "healthy": True},
                              "IPv6": {"lastUpdated": body["status"]["IPv4"]["lastUpdated"], "healthy": True}}
    assert all(GO_TIME.match(t) for t in (body["lastUpdated"], body["currentTime"],
                                           body["status"]["IPv4"]["lastUpdated"]))


def test_livez_leaves_the_node_out(healthz: str) -> None:
    answer = curl(f"{healthz}/livez")

    assert (answer.status, list(json.loads(answer.body))) == (200, ["lastUpdated", "currentTime", "healthy", "status"])


def test_other_paths_are_not_found(healthz: str) -> None:
    answer = curl(f"{healthz}/metrics")

    assert (answer.status, answer.body) == (404, "404 page not found\n")


def test_a_node_going_away_fails_healthz_but_not_livez() -> None:
    health = synced_health()
    health.set_node_eligible(False)
    for url in _healthz(health):
        healthz, livez = curl(f"{url}/healthz"), curl(f"{url}/livez")

        assert (healthz.status, json.loads(healthz.body)["nodeEligible"], livez.status) == (503, False, 200)


def test_a_change_waiting_past_the_timeout_fails_both() -> None:
    for url in _healthz(synced_health(pending=time.monotonic() - 120, timeout=60)):
        healthz, livez = curl(f"{url}/healthz"), curl(f"{url}/livez")

        assert (healthz.status, livez.status) == (503, 503)
        assert json.loads(livez.body)["healthy"] is False


def test_before_the_first_sync_the_proxy_is_live_and_has_no_status() -> None:
    health = healthcheck.ProxyHealth(timeout=60, pending=lambda: time.monotonic() - 120)
    for url in _healthz(health):
        healthz, livez = curl(f"{url}/healthz"), curl(f"{url}/livez")

        # The node is not known yet: /healthz says so, with Go's zero time as the last update.
        assert (healthz.status, json.loads(healthz.body)["lastUpdated"]) == (503, "0001-01-01T00:00:00Z")
        assert (livez.status, "status" in json.loads(livez.body)) == (200, False)


def test_a_sync_taking_changes_counts_as_pending_until_it_is_done() -> None:
    health = synced_health(timeout=60)
    health.queued(time.monotonic() - 120)  # a sync took a change that came two minutes ago
    during = health.report().healthy
    health.updated()

    assert (during, health.report().healthy) == (False, True)


def test_a_change_no_sync_has_taken_yet_counts_as_pending() -> None:
    objects = store.ObjectStore()
    health = healthcheck.ProxyHealth(timeout=0.0, pending=objects.pending_since)  # any wait is too long
    health.updated()
    idle = health.report().healthy
    objects.put(model.Namespace("shop"))
    waiting = health.report().healthy
    objects.take()

    assert (idle, waiting, health.report().healthy) == (True, False, True)


def test_healthz_on_a_port_in_use_is_reported_and_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(healthcheck, "RETRY_INTERVAL", 0.0)
    port = free_port()
    holder = healthcheck.listen(healthcheck.BindAddress("", port))
    server = healthcheck.ProxyHealthServer(healthcheck.BindAddress("0.0.0.0", port), health=synced_health())
    try:
        failed = server.status()
        holder.close()
        retried = server.retry()
        answer = curl(f"http://127.0.0.1:{port}/healthz")
    finally:
        holder.close()
        server.close()

    assert (failed["listening"], "Address already in use" in str(failed["error"])) == (False, True)
    assert (retried, server.error, answer.status) == (True, None, 200)


# --- addresses --------------------------------------------------------------------------------

ADDRESSES = [
    ("0.0.0.0:10256", healthcheck.BindAddress("0.0.0.0", 10256)),
    ("[::]:10256", healthcheck.BindAddress("::", 10256)),
    ("127.0.0.1:0", healthcheck.BindAddress("127.0.0.1", 0)),
    (":9000", healthcheck.BindAddress("", 9000)),
    ("192.0.2.7", healthcheck.BindAddress("192.0.2.7", 10256)),
    ("fd00::7", healthcheck.BindAddress("fd00::7", 10256)),
    ("[fd00::7]", healthcheck.BindAddress("fd00::7", 10256)),
    ("", None),
    ("none", None),
]


@pytest.mark.parametrize(("text", "expected"), ADDRESSES, ids=[a[0] or "empty" for a in ADDRESSES])
def test_bind_address_forms(text: str, expected: healthcheck.BindAddress | None) -> None:
    assert healthcheck.BindAddress.parse(text) == expected


@pytest.mark.parametrize("text", ["localhost:10256", "1.2.3.4:65536", "1.2.3.4:port", "[::1]10256", "[::1"])
def test_bad_bind_address_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        healthcheck.BindAddress.parse(text)
