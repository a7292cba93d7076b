"""The Kubernetes API source: list, watch, resume, relist and outages, through the real client.

Every test drives `KubeApiSource` (and so the official `kubernetes` client) against the fake API
server in `tests/apiserver.py` over real HTTP, and waits for conditions with a deadline.
"""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
import random
import time
from collections.abc import Callable, Iterator

import pytest
import structlog

from ctlb import model
from ctlb.sources import backoff, kubeapi
from ctlb.sources.store import ObjectStore
from tests import apiserver
from tests.apiserver import FakeApiServer, wait_for

NODE = "node-1"

StartSource = Callable[..., tuple[kubeapi.KubeApiSource, ObjectStore]]


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[FakeApiServer]:
    with FakeApiServer(gone_as_status=getattr(request, "param", False)) as fake:
        yield fake


@pytest.fixture
def start_source(server: FakeApiServer) -> Iterator[StartSource]:
    """Starts sources on the fake server with quick backoff; closes them (and checks for crashes)."""
    started: list[kubeapi.KubeApiSource] = []

    def start(**kwargs: object) -> tuple[kubeapi.KubeApiSource, ObjectStore]:
        store = ObjectStore()
        options: dict[str, object] = {"node_name": NODE, "backoff_base": 0.02, "backoff_cap": 0.3, **kwargs}
        source = kubeapi.KubeApiSource(store, client=server.api_client(), **options)  # type: ignore[arg-type]
        started.append(source)
        source.start()
        return source, store

    yield start
    for source in started:
        source.close()
    for source in started:
        source.check()


def _cluster_ip(i: int) -> str:
    return str(ipaddress.IPv4Address("10.96.0.0") + 1 + i)


def _names(store: ObjectStore, kind: str) -> set[str]:
    return {name for _, _, name in store.keys(kind)}


def _service(store: ObjectStore, namespace: str, name: str) -> model.Service:
    obj = store.get(("Service", namespace, name))
    assert isinstance(obj, model.Service), f"Service {namespace}/{name} is not in the store"
    return obj


def _all_watching(server: FakeApiServer) -> Callable[[], bool]:
    return lambda: all(server.open_watches(plural) == 1 for plural in apiserver.RESOURCES)


def _synced_and_watching(server: FakeApiServer, source: kubeapi.KubeApiSource) -> None:
    wait_for(source.synced, what="the first list of every resource")
    wait_for(_all_watching(server), what="a watch open on every resource")


def _seed_web(server: FakeApiServer) -> None:
    server.create(apiserver.namespace("shop"))
    server.create(apiserver.service("shop", "web", cluster_ip="10.96.0.10"))
    server.create(apiserver.endpoint_slice("shop", "web-abc", service_name="web", addresses=["10.244.0.2"]))
    server.create(apiserver.node(NODE))


# --- list ------------------------------------------------------------------------------------


def test_paginated_initial_list_lands_in_the_store_completely(server: FakeApiServer,
                                                              start_source: StartSource) -> None:
    server.create_many([apiserver.service(f"ns-{i % 7}", f"svc-{i}", cluster_ip=_cluster_ip(i)) for i in range(1234)])

    source, store = start_source(page_size=100)

    wait_for(source.synced, what="synced")
    assert store.count("Service") == 1234
    lists = server.requests("services", "list")
    assert len(lists) == 13  # ceil(1234 / 100) pages, each asked with the limit
    assert {request.params["limit"] for request in lists} == {"100"}
    assert "continue" not in lists[0].params and all("continue" in request.params for request in lists[1:])


def test_expired_continue_token_restarts_the_list(server: FakeApiServer, start_source: StartSource) -> None:
    server.create_many([apiserver.service("shop", f"svc-{i}", cluster_ip=_cluster_ip(i)) for i in range(250)])
    server.expire_continues(1)

    source, store = start_source(page_size=100)

    wait_for(source.synced, what="synced")
    assert store.count("Service") == 250
    lists = server.requests("services", "list")
    assert [("continue" in request.params) for request in lists] == [False, True, False, True, True]


def test_synced_waits_for_every_resource(server: FakeApiServer, start_source: StartSource) -> None:
    server.fail_requests(503)
    source, _ = start_source()

    wait_for(lambda: server.count("pods", "list") >= 2, what="retries of the failing lists")
    assert not source.synced()
    assert source.status().last_error == "HTTP 503: injected failure"

    server.fail_requests(None)
    wait_for(source.synced, what="synced once the server answers")
    assert source.status().connected


# --- watch -----------------------------------------------------------------------------------


def test_watch_events_reach_the_store(server: FakeApiServer, start_source: StartSource) -> None:
    _seed_web(server)
    source, store = start_source()
    _synced_and_watching(server, source)

    server.create(apiserver.service("shop", "cart", cluster_ip="10.96.0.20"))
    wait_for(lambda: "cart" in _names(store, "Service"), what="ADDED")

    server.update(apiserver.service("shop", "cart", cluster_ip="10.96.0.20", ports=[("http", 8080, 8080)]))
    wait_for(lambda: _service(store, "shop", "cart").ports[0].port == 8080, what="MODIFIED")

    server.delete("Service", "shop", "cart")
    wait_for(lambda: "cart" not in _names(store, "Service"), what="DELETED")

    server.create(apiserver.namespace("mesh", labels={"mesh": "on"}))
    wait_for(lambda: "mesh" in _names(store, "Namespace"), what="a Namespace ADDED")
    assert _names(store, "Service") == {"web"}


def test_endpoint_slice_moving_between_services_is_just_put(server: FakeApiServer,
                                                            start_source: StartSource) -> None:
    _seed_web(server)
    server.create(apiserver.service("shop", "cart", cluster_ip="10.96.0.20"))
    source, store = start_source()
    _synced_and_watching(server, source)
    assert [s.name for s in store.slices_of("shop", "web")] == ["web-abc"]

    server.update(apiserver.endpoint_slice("shop", "web-abc", service_name="cart", addresses=["10.244.0.2"]))

    wait_for(lambda: [s.name for s in store.slices_of("shop", "cart")] == ["web-abc"], what="the slice moved")
    assert store.slices_of("shop", "web") == []


def test_dropped_watch_resumes_from_the_last_version_without_relisting(server: FakeApiServer,
                                                                       start_source: StartSource) -> None:
    _seed_web(server)
    source, store = start_source()
    _synced_and_watching(server, source)
    added = server.create(apiserver.service("shop", "cart", cluster_ip="10.96.0.20"))
    wait_for(lambda: "cart" in _names(store, "Service"), what="cart")

    server.drop_watches()

    wait_for(lambda: server.count("services", "watch") == 2, what="the watch resumed")
    resumed = server.requests("services", "watch")[-1]
    assert resumed.params["resourceVersion"] == added["metadata"]["resourceVersion"]
    assert all(server.count(plural, "list") == 1 for plural in apiserver.RESOURCES)
    server.create(apiserver.service("shop", "late", cluster_ip="10.96.0.30"))
    wait_for(lambda: "late" in _names(store, "Service"), what="an event on the resumed watch")


def test_bookmarks_move_the_resume_point(server: FakeApiServer, start_source: StartSource) -> None:
    _seed_web(server)
    source, _ = start_source()
    _synced_and_watching(server, source)
    server.advance(25)  # writes to objects nobody here watches
    bookmarked = str(server.bookmark("services"))
    wait_for(lambda: ("BOOKMARK", bookmarked) in server.sent("services"), what="the bookmark sent")
    first = server.requests("services", "watch")[0]
    assert first.params["allowWatchBookmarks"] == "true"

    server.drop_watches()

    wait_for(lambda: server.count("services", "watch") == 2, what="the watch resumed")
    assert server.requests("services", "watch")[-1].params["resourceVersion"] == bookmarked
    assert server.count("services", "list") == 1


@pytest.mark.parametrize("server", [False, True], ids=["gone-as-error-event", "gone-as-http-status"],
                         indirect=True)
def test_gone_relists_and_removes_what_was_deleted_meanwhile(server: FakeApiServer,
                                                             start_source: StartSource) -> None:
    _seed_web(server)
    server.create(apiserver.service("shop", "old", cluster_ip="10.96.0.40"))
    source, store = start_source()
    _synced_and_watching(server, source)

    server.stop()
    server.delete("Service", "shop", "old")
    server.create(apiserver.service("shop", "new", cluster_ip="10.96.0.50"))
    server.compact()  # the watch cannot resume: 410 Gone
    server.start()

    wait_for(lambda: _names(store, "Service") == {"web", "new"}, what="the relist's view")
    assert server.count("services", "list") == 2
    wait_for(lambda: source.status().connected, what="connected")
    assert source.synced()


# --- outages ---------------------------------------------------------------------------------


def test_unreachable_at_start_backs_off_then_syncs(start_source: StartSource, server: FakeApiServer) -> None:
    _seed_web(server)
    server.stop()
    with structlog.testing.capture_logs() as logs:
        source, store = start_source()
        wait_for(lambda: source.status().stale_since is not None, what="stale_since")
        wait_for(lambda: sum(e["event"] == "api_unreachable" and e["resource"] == "services" for e in logs) >= 3,
                 what="retries")
        assert not source.synced()
        assert not source.status().connected
        assert "Connection refused" in (source.status().last_error or "")

        server.start()
        wait_for(source.synced, what="synced after the server came up")
    waits = [e["retry_in"] for e in logs if e["event"] == "api_unreachable"]
    assert all(0.02 <= wait <= 0.3 for wait in waits)
    assert _names(store, "Service") == {"web"} and _names(store, "Node") == {NODE}
    wait_for(lambda: source.status().connected, what="connected")
    assert source.status().stale_since is None


def test_server_lost_later_keeps_the_store_and_says_since_when(server: FakeApiServer,
                                                              start_source: StartSource) -> None:
    _seed_web(server)
    server.create(apiserver.service("shop", "cart", cluster_ip="10.96.0.20"))
    source, store = start_source()
    _synced_and_watching(server, source)
    before = store.snapshot()
    lost = datetime.datetime.now(datetime.timezone.utc)

    with structlog.testing.capture_logs() as logs:
        server.stop()
        wait_for(lambda: sum(e["event"] == "api_unreachable" for e in logs) >= 10, what="failed retries")
    status = source.status()
    assert not status.connected and status.synced
    assert status.stale_since is not None
    assert lost <= datetime.datetime.fromisoformat(status.stale_since) <= datetime.datetime.now(datetime.timezone.utc)
    assert store.snapshot() == before  # nothing withdrawn while the server is away

    server.delete("Service", "shop", "cart")
    server.update(apiserver.service("shop", "web", cluster_ip="10.96.0.10", ports=[("http", 81, 8080)]))
    server.start()

    wait_for(lambda: _names(store, "Service") == {"web"} and _service(store, "shop", "web").ports[0].port == 81,
             what="converged")
    wait_for(lambda: source.status().connected, what="connected")
    assert source.status().stale_since is None
    assert server.count("services", "list") == 1  # resumed from history, no relist needed


def test_close_stops_every_thread_promptly(server: FakeApiServer, start_source: StartSource) -> None:
    source, _ = start_source()
    _synced_and_watching(server, source)

    started = time.monotonic()
    source.close()

    assert time.monotonic() - started < 1.0
    wait_for(lambda: all(server.open_watches(plural) == 0 for plural in apiserver.RESOURCES), what="watches closed")


# --- invalid objects -------------------------------------------------------------------------


def test_invalid_version_keeps_the_last_valid_one_and_reports_it(server: FakeApiServer,
                                                                 start_source: StartSource) -> None:
    _seed_web(server)
    source, store = start_source()
    _synced_and_watching(server, source)

    server.update(apiserver.service("shop", "web", cluster_ip="10.96.0.10", ports=[("http", 70000, 8080)]))

    wait_for(lambda: bool(store.problems()), what="the problem reported")
    assert store.problems() == [model.Problem("Service shop/web", "spec.ports[0].port 70000 is out of range 1..65535")]
    assert _service(store, "shop", "web").ports[0].port == 80

    server.update(apiserver.service("shop", "web", cluster_ip="10.96.0.10", ports=[("http", 81, 8080)]))
    wait_for(lambda: _service(store, "shop", "web").ports[0].port == 81, what="the fixed version")
    assert store.problems() == []


def test_invalid_listed_object_is_reported_and_its_deletion_clears_it(server: FakeApiServer,
                                                                      start_source: StartSource) -> None:
    _seed_web(server)
    server.create(apiserver.service("shop", "bad", cluster_ip="10.96.0.300"))
    source, store = start_source()
    _synced_and_watching(server, source)
    reason = 'spec.clusterIPs[0] "10.96.0.300" is not an IP address'
    assert store.problems() == [model.Problem("Service shop/bad", reason)]
    assert _names(store, "Service") == {"web"}

    server.delete("Service", "shop", "bad")

    wait_for(lambda: store.problems() == [], what="the problem cleared")


def test_unnamed_object_is_reported_under_its_watch_until_a_relist(server: FakeApiServer,
                                                                  start_source: StartSource) -> None:
    _seed_web(server)
    source, store = start_source()
    _synced_and_watching(server, source)

    server.inject("services", "ADDED", {"kind": "Service", "apiVersion": "v1",
                                        "metadata": {"namespace": "shop", "resourceVersion": "1"}, "spec": {}})
    wait_for(lambda: bool(store.problems()), what="the problem reported")
    assert store.problems() == [model.Problem("watch Service", "an object without metadata.name")]
    assert _names(store, "Service") == {"web"}

    server.advance()
    server.compact()
    server.drop_watches()
    wait_for(lambda: server.count("services", "list") == 2 and store.problems() == [], what="cleared by the relist")


# --- this node only --------------------------------------------------------------------------


def test_nodes_and_pods_are_selected_by_this_node(server: FakeApiServer, start_source: StartSource) -> None:
    server.create(apiserver.node(NODE, internal_ip="192.168.0.10"))
    server.create(apiserver.node("node-2", internal_ip="192.168.0.11"))
    server.create(apiserver.pod("shop", "here", node_name=NODE, ip="10.244.0.5"))
    server.create(apiserver.pod("shop", "there", node_name="node-2", ip="10.244.1.5"))
    source, store = start_source()
    _synced_and_watching(server, source)

    server.create(apiserver.pod("shop", "here-too", node_name=NODE, ip="10.244.0.6"))
    server.create(apiserver.pod("shop", "there-too", node_name="node-2", ip="10.244.1.6"))
    wait_for(lambda: "here-too" in _names(store, "Pod"), what="this node's new pod")

    assert _names(store, "Node") == {NODE}
    assert _names(store, "Pod") == {"here", "here-too"}
    assert {r.params.get("fieldSelector") for r in server.requests("nodes")} == {f"metadata.name={NODE}"}
    assert {r.params.get("fieldSelector") for r in server.requests("pods")} == {f"spec.nodeName={NODE}"}


# --- configuration ---------------------------------------------------------------------------


def test_api_client_from_a_kubeconfig_reaches_its_server_with_its_credentials(server: FakeApiServer,
                                                                              tmp_path: pathlib.Path) -> None:
    client = kubeapi.api_client(server.write_kubeconfig(tmp_path / "kubeconfig"))
    source = kubeapi.KubeApiSource(ObjectStore(), client=client, node_name=NODE)
    assert source.describe() == f"kubernetes:{server.url}"

    source.start()
    try:
        wait_for(source.synced, what="synced")
    finally:
        source.close()
    assert {request.authorization for request in server.requests()} == {"Bearer fake-token"}


@pytest.mark.parametrize("kubeconfig", [None, pathlib.Path("/nonexistent/kubeconfig")],
                         ids=["in-cluster", "missing-file"])
def test_api_client_without_a_configuration_says_why(kubeconfig: pathlib.Path | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    with pytest.raises(kubeapi.ApiConfigError):
        kubeapi.api_client(kubeconfig)


# --- backoff ---------------------------------------------------------------------------------


def test_backoff_grows_within_its_bounds_and_resets() -> None:
    waits = backoff.Backoff(base=0.2, cap=30.0, rng=random.Random(7))

    first = [waits.next() for _ in range(40)]
    waits.reset()

    assert all(0.2 <= wait <= 30.0 for wait in first)
    assert max(first[-10:]) > 10  # repeated failures reach toward the cap
    assert waits.next() <= 0.6  # after a success, back to short waits
