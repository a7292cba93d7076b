"""The ADS server over real gRPC, with an in-process client speaking the protocol by hand."""

from __future__ import annotations

import ipaddress
import os
import pathlib
import socket
import stat
import threading
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from ctlb import desired, model, planner
from meshredirect.xds import XdsError, XdsServer, addresses, snapshot
from tests.unit.adsclient import AdsClient

CDS, EDS, LDS, RDS = (snapshot.TypeUrl.CLUSTER, snapshot.TypeUrl.ENDPOINT, snapshot.TypeUrl.LISTENER,
                      snapshot.TypeUrl.ROUTE)
WEB4, WEB6 = "outbound|80|v4|web.shop", "outbound|80|v6|web.shop"
QUIET_S = 0.3


def _objects(*backends: str, port: int = 80) -> tuple[dict[desired.ServicePortName, desired.ServicePortState],
                                                      list[model.Service]]:
    service = model.Service(namespace="shop", name="web", type=model.ServiceType.CLUSTER_IP,
                            ports=(model.ServicePort("http", model.Protocol.TCP, port, 8080),),
                            cluster_ips=(ipaddress.ip_address("10.96.0.10"), ipaddress.ip_address("fd00:96::a")),
                            ip_families=(model.IPFamily.IPv4, model.IPFamily.IPv6))
    endpoints = tuple(model.Endpoint(addresses=(ipaddress.ip_address(b),), ready=True) for b in backends)
    slices = [model.EndpointSlice(namespace="shop", name="web-1", service_name="web", address_type="IPv4",
                                  endpoints=endpoints, ports=(model.EndpointPort("http", model.Protocol.TCP, 8080),))]
    state = planner.desired_state(services=[service], endpoint_slices=slices, node=None)
    return dict(state.service_ports), [service]


@pytest.fixture
def socket_path(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "run" / "xds.sock"


@pytest.fixture
def server(socket_path: pathlib.Path) -> Iterator[XdsServer]:
    xds = XdsServer([f"unix:{socket_path}"])
    xds.start()
    try:
        yield xds
    finally:
        xds.stop(grace=0)


@pytest.fixture
def clients() -> Iterator[list[AdsClient]]:
    made: list[AdsClient] = []
    try:
        yield made
    finally:
        for client in made:
            client.close()


def _connect(server: XdsServer, clients: list[AdsClient], **kwargs: str) -> AdsClient:
    client = AdsClient(server.addresses[0], **kwargs)
    clients.append(client)
    return client


def _subscribe_all(client: AdsClient) -> dict[snapshot.TypeUrl, str]:
    """Subscribes as Envoy does (CDS, then EDS for the clusters, LDS, then RDS); returns the
    acknowledged version of each type."""
    versions = {}
    for type_url, names in ((CDS, ()), (EDS, (WEB4, WEB6)), (LDS, ()), (RDS, (WEB4, WEB6))):
        client.send(type_url, *names)
        response = client.receive()
        assert response.type_url == type_url.value
        client.ack(response, *names)
        versions[type_url] = response.version_info
    return versions


# --- listening ----------------------------------------------------------------------------------------


def test_serves_on_a_unix_socket_and_a_tcp_port(tmp_path: pathlib.Path, clients: list[AdsClient]) -> None:
    path = tmp_path / "xds.sock"
    with XdsServer([f"unix:{path}", "127.0.0.1:0"]) as xds:
        xds.publish(*_objects("10.244.0.5"))
        unix_address, tcp_address = xds.addresses
        assert unix_address == f"unix:{path}"
        assert tcp_address.startswith("127.0.0.1:") and not tcp_address.endswith(":0")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666, "sidecars run as another UID"
        for address in xds.addresses:
            client = AdsClient(address)
            clients.append(client)
            client.send(CDS)
            assert client.receive().version_info == xds.current.version(CDS)
    assert not path.exists(), "the socket goes with the server"


@pytest.mark.parametrize(("address", "target"), [
    ("unix:/run/ctlb/xds.sock", "unix:/run/ctlb/xds.sock"),
    ("unix:///run/ctlb/xds.sock", "unix:/run/ctlb/xds.sock"),
    ("10.0.0.5:15010", "10.0.0.5:15010"),
    ("[fd00::5]:15010", "[fd00::5]:15010"),
    ("localhost:0", "localhost:0"),
])
def test_listen_address_forms(address: str, target: str) -> None:
    assert addresses.parse(address).grpc_target == target


@pytest.mark.parametrize("address", ["", "web", "unix:relative.sock", "127.0.0.1:70000", ":15010",
                                     "unix:/" + "x" * 120])
def test_malformed_listen_address_is_refused(address: str) -> None:
    with pytest.raises(XdsError, match="xDS listen address"):
        XdsServer([address])


def test_stale_socket_of_a_crashed_server_is_replaced(socket_path: pathlib.Path) -> None:
    socket_path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(socket_path))
    stale.close()  # a socket file nobody accepts on
    with XdsServer([f"unix:{socket_path}"]) as xds:
        assert xds.addresses == (f"unix:{socket_path}",)


def test_socket_of_a_live_server_is_not_taken_over(server: XdsServer, socket_path: pathlib.Path) -> None:
    with pytest.raises(XdsError, match="in use"):
        XdsServer([f"unix:{socket_path}"]).start()
    assert socket_path.exists(), "the live server keeps its socket"


def test_tcp_port_in_use_is_an_error(server: XdsServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(XdsError, match="cannot listen"):
            XdsServer([f"127.0.0.1:{port}"]).start()


# --- publishing ---------------------------------------------------------------------------------------


def test_nothing_is_sent_before_the_first_publish(server: XdsServer, clients: list[AdsClient]) -> None:
    client = _connect(server, clients)
    client.send(CDS)
    assert client.quiet_for(QUIET_S)
    server.publish(*_objects("10.244.0.5"))
    assert client.receive().type_url == CDS.value


def test_change_is_pushed_to_every_sidecar_cds_eds_lds_rds(server: XdsServer, clients: list[AdsClient]) -> None:
    server.publish(*_objects("10.244.0.5"))
    sidecars = [_connect(server, clients, node_id=f"sidecar-{i}") for i in range(2)]
    for client in sidecars:
        _subscribe_all(client)
    server.publish(*_objects("10.244.0.5", port=81))
    for client in sidecars:
        assert [snapshot.TypeUrl(r.type_url).short for r in client.receive_types(4)] == ["CDS", "EDS", "LDS", "RDS"]


def test_endpoint_change_pushes_endpoints_only(server: XdsServer, clients: list[AdsClient]) -> None:
    server.publish(*_objects("10.244.0.5"))
    client = _connect(server, clients)
    _subscribe_all(client)
    published = server.publish(*_objects("10.244.0.6"))
    response = client.receive()
    assert (response.type_url, response.version_info) == (EDS.value, published.version(EDS))
    assert client.quiet_for(QUIET_S)


def test_unchanged_publish_sends_nothing_and_keeps_the_snapshot(server: XdsServer, clients: list[AdsClient]) -> None:
    first = server.publish(*_objects("10.244.0.5"))
    client = _connect(server, clients)
    _subscribe_all(client)
    assert server.publish(*_objects("10.244.0.5")) is first
    assert client.quiet_for(QUIET_S)


def test_nack_is_logged_not_resent_and_next_good_snapshot_goes_out(
    server: XdsServer, clients: list[AdsClient]
) -> None:
    server.publish(*_objects("10.244.0.5"))
    client = _connect(server, clients)
    acked = _subscribe_all(client)
    bad = server.publish(*_objects("10.244.0.6"))
    response = client.receive()
    with capture_logs() as logs:
        client.nack(response, WEB4, WEB6, kept_version=acked[EDS], error="Proto constraint validation failed")
        assert client.quiet_for(QUIET_S), "the rejected version is not sent again"
    (event,) = [e for e in logs if e["event"] == "xds_nack"]
    assert (event["type"], event["rejected_version"], event["kept_version"]) == ("EDS", bad.version(EDS), acked[EDS])
    assert event["error"] == "Proto constraint validation failed"
    assert event["node"] == client.node_id
    (status,) = server.streams()
    assert [n.version for n in status.nacks] == [bad.version(EDS)]
    good = server.publish(*_objects("10.244.0.7"))
    assert client.receive().version_info == good.version(EDS)


def test_publish_from_another_thread_converges_on_the_last_snapshot(
    server: XdsServer, clients: list[AdsClient]
) -> None:
    server.publish(*_objects("10.244.0.5"))
    client = _connect(server, clients)
    _subscribe_all(client)
    publications = [_objects(f"10.244.1.{i}") for i in range(1, 30)]
    publisher = threading.Thread(target=lambda: [server.publish(*p) for p in publications])
    publisher.start()
    publisher.join()
    final = server.current
    assert final is not None
    seen = ""
    while seen != final.version(EDS):
        response = client.receive()
        client.ack(response, WEB4, WEB6)
        seen = response.version_info
    assert client.quiet_for(QUIET_S)


# --- streams ending and coming back -------------------------------------------------------------------


def test_stop_ends_streams_and_removes_the_socket(socket_path: pathlib.Path, clients: list[AdsClient]) -> None:
    xds = XdsServer([f"unix:{socket_path}"])
    xds.start()
    xds.publish(*_objects("10.244.0.5"))
    client = _connect(xds, clients)
    client.send(CDS)
    client.receive()
    xds.stop(grace=1)
    assert client.ended.wait(5)
    assert not socket_path.exists()
    xds.stop()  # twice is fine


def test_sidecar_reconnecting_to_a_restarted_server_gets_its_current_snapshot(
    socket_path: pathlib.Path, clients: list[AdsClient]
) -> None:
    before = XdsServer([f"unix:{socket_path}"])
    before.start()
    try:
        before.publish(*_objects("10.244.0.5"))
        old = _subscribe_all(_connect(before, clients))
    finally:
        before.stop(grace=0)
    with XdsServer([f"unix:{socket_path}"]) as after:
        current = after.publish(*_objects("10.244.0.6"))
        client = _connect(after, clients)
        # Envoy's first requests on the new stream carry the versions it holds.
        client.send(CDS, version=old[CDS])
        assert client.receive().version_info == current.version(CDS)
        client.send(EDS, WEB4, WEB6, version=old[EDS])
        assert client.receive().version_info == current.version(EDS) != old[EDS]


def test_streams_report_node_and_acknowledged_versions(server: XdsServer, clients: list[AdsClient]) -> None:
    current = server.publish(*_objects("10.244.0.5"))
    client = _connect(server, clients, node_id="sidecar~10.244.0.9~web-0.shop")
    _subscribe_all(client)
    client.send(CDS)  # a round trip more, so the last ACK has been read
    deadline_ok = client.quiet_for(QUIET_S)
    (status,) = server.streams()
    assert deadline_ok
    assert status.node == "sidecar~10.244.0.9~web-0.shop"
    assert status.acked == current.versions()


def test_unix_socket_folder_is_created(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "a" / "b" / "xds.sock"
    with XdsServer([f"unix://{path}"]):
        assert stat.S_ISSOCK(os.stat(path).st_mode)
