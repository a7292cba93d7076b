"""A real Envoy sidecar configured by the xDS server: the app's connections to Service addresses go
through it to a backend, and config changes, rejections and server restarts behave."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest
import yaml
from envoy.config.listener.v3 import listener_pb2

from ctlb import lab as ctlb_lab
from ctlb.lab import envoy
from meshredirect.xds import resources, snapshot
from tests.e2e.conftest import Mesh
from tests.kernel import objects

pytestmark = pytest.mark.e2e

WEB_IPS = ["10.96.0.10", "fd00:96::a"]
HTTP_PORTS = [{"name": "http", "port": 80, "targetPort": 8080}]
SLICE_HTTP = [{"name": "http", "port": 8080}]
WEB4 = "outbound|80|v4|web.default"
ENDPOINTS_WITHIN_S = 1.0
LDS = snapshot.TypeUrl.LISTENER
REPO = pathlib.Path(__file__).resolve().parents[2]


def _web(*pods: ctlb_lab.Pod) -> list[dict]:
    """The dual-stack HTTP Service `web` backed by `pods`."""
    return [
        objects.service("web", cluster_ips=WEB_IPS, ports=HTTP_PORTS),
        objects.endpoint_slice("web", addresses=[str(p.ipv4) for p in pods], ports=SLICE_HTTP),
        objects.endpoint_slice("web", suffix="v6", addresses=[str(p.ipv6) for p in pods], ports=SLICE_HTTP),
    ]


def _logged(sidecar: envoy.Sidecar, **fields: str) -> dict:
    """The access-log entry with these fields (Envoy writes it when the request or connection ends)."""
    def probe() -> dict | None:
        return next((e for e in sidecar.access_log() if all(e.get(k) == v for k, v in fields.items())), None)
    return sidecar.wait_for(f"access-log entry {fields}", probe, timeout=5)


@pytest.mark.parametrize(("cluster_ip", "family"), [("10.96.0.10", "v4"), ("fd00:96::a", "v6")], ids=["ipv4", "ipv6"])
def test_app_reaches_http_service_backend_through_the_sidecar(mesh: Mesh, cluster_ip: str, family: str) -> None:
    mesh.start_server()
    pods = [mesh.backend("web-1"), mesh.backend("web-2")]
    mesh.apply(*_web(*pods))
    sidecar = mesh.meshed_client()
    host = f"[{cluster_ip}]" if ":" in cluster_ip else cluster_ip

    answer = mesh.curl(f"http://{host}/")

    cluster = f"outbound|80|{family}|web.default"
    backend = {p.name: p for p in pods}[answer["backend"]]
    backend_ip = str(backend.ipv4 if family == "v4" else backend.ipv6)
    entry = _logged(sidecar, cluster=cluster)
    assert entry["original_dst"] == f"{host}:80", "Envoy saw the Service address as the original destination"
    assert entry["upstream"] == (f"[{backend_ip}]:8080" if family == "v6" else f"{backend_ip}:8080")
    assert mesh.client is not None
    assert answer["peer"] in {str(mesh.client.ipv4), str(mesh.client.ipv6)}
    assert sidecar.stat(f"cluster.{cluster}.upstream_rq_200") == 1
    assert sidecar.stat(f"http.{cluster}.downstream_rq_total") == 1


def test_tcp_service_goes_through_tcp_proxy(mesh: Mesh) -> None:
    mesh.start_server()
    pod = mesh.backend("db-1")
    mesh.apply(objects.service("db", cluster_ips=["10.96.0.20"], ports=[{"port": 9000, "targetPort": 8080}]),
               objects.endpoint_slice("db", addresses=[str(pod.ipv4)], ports=[{"port": 8080}]))
    sidecar = mesh.meshed_client()

    answer = mesh.curl("http://10.96.0.20:9000/")

    cluster = "outbound|9000|v4|db.default"
    assert answer["backend"] == "db-1"
    entry = _logged(sidecar, cluster=cluster)
    assert (entry["original_dst"], entry["upstream"]) == ("10.96.0.20:9000", f"{pod.ipv4}:8080")
    assert entry["chain"] == "10.96.0.20:9000|db.default"
    assert sidecar.stat(f"tcp.{cluster}.downstream_cx_total") == 1
    assert not sidecar.stats(f"http.{cluster}."), "no HTTP parsing for a TCP Service"


def test_destination_that_is_no_service_passes_through_to_itself(mesh: Mesh) -> None:
    mesh.start_server()
    pods = [mesh.backend("web-1")]
    mesh.apply(*_web(*pods))
    sidecar = mesh.meshed_client()

    answer = mesh.curl(f"http://{pods[0].ipv4}:8080/")

    assert answer["backend"] == "web-1"
    entry = _logged(sidecar, cluster="PassthroughCluster")
    assert entry["original_dst"] == entry["upstream"] == f"{pods[0].ipv4}:8080"


def test_endpoint_change_reaches_envoy_within_a_second(mesh: Mesh) -> None:
    mesh.start_server()
    old, new = mesh.backend("web-1"), mesh.backend("web-2")
    mesh.apply(*_web(old))
    sidecar = mesh.meshed_client()
    assert sidecar.clusters()[WEB4] == [f"{old.ipv4}:8080"]

    started = time.monotonic()
    mesh.apply(*_web(new))
    sidecar.wait_for("the new endpoint", lambda: sidecar.clusters()[WEB4] == [f"{new.ipv4}:8080"], timeout=5)
    elapsed = time.monotonic() - started

    assert elapsed < ENDPOINTS_WITHIN_S, f"EDS update took {elapsed:.2f}s"
    assert mesh.curl("http://10.96.0.10/")["backend"] == "web-2"


def _with_duplicate_chain(built: resources.Resources) -> resources.Resources:
    """The listener with its first filter chain twice: what Envoy would get if two Services ever
    shared a frontend. Envoy rejects the listener as a whole."""
    (listener,) = built.listeners
    bad = listener_pb2.Listener()
    bad.CopyFrom(listener)
    bad.filter_chains.add().CopyFrom(listener.filter_chains[0])
    bad.filter_chains[-1].name = "duplicate"
    return resources.Resources(clusters=built.clusters, endpoints=built.endpoints, listeners=(bad,),
                               routes=built.routes)


def test_bad_listener_is_nacked_once_and_good_updates_after_it_apply(mesh: Mesh) -> None:
    server = mesh.start_server()
    web, api = mesh.backend("web-1"), mesh.backend("api-1")
    mesh.apply(*_web(web))
    sidecar = mesh.meshed_client()
    good = resources.build(mesh.planner.state().service_ports, mesh.services(), options=server.options)

    rejected = server.publish_resources(_with_duplicate_chain(good))

    def nacks() -> list:
        return [n for s in server.streams() for n in s.nacks]
    (nack,) = sidecar.wait_for("a NACK", nacks, timeout=5)
    assert (nack.type_url, nack.version) == (LDS, rejected.version(LDS))
    assert "duplicate" in nack.message or "same matching rules" in nack.message, nack.message
    time.sleep(1.0)
    assert len(nacks()) == 1, "the rejected version is not sent again"
    assert sidecar.stat("listener_manager.lds.update_rejected") == 1
    assert mesh.curl("http://10.96.0.10/")["backend"] == "web-1", "the sidecar keeps its last good listener"

    mesh.apply(objects.service("api", cluster_ips=["10.96.0.30"], ports=HTTP_PORTS),
               objects.endpoint_slice("api", addresses=[str(api.ipv4)], ports=SLICE_HTTP))

    sidecar.wait_for("the good listener", lambda: sidecar.stat("listener_manager.lds.update_success") >= 2)
    assert mesh.curl("http://10.96.0.30/")["backend"] == "api-1"
    current = server.current
    assert current is not None
    sidecar.wait_for("the ACK", lambda: server.streams()[0].acked["LDS"] == current.version(LDS))


def test_sidecar_reconnecting_to_a_restarted_server_gets_the_current_snapshot(mesh: Mesh) -> None:
    mesh.start_server()
    old, new = mesh.backend("web-1"), mesh.backend("web-2")
    mesh.apply(*_web(old))
    sidecar = mesh.meshed_client()

    mesh.stop_server()
    assert mesh.curl("http://10.96.0.10/")["backend"] == "web-1", "the sidecar serves its config meanwhile"
    mesh.apply(*_web(new), publish=False)
    server = mesh.start_server()

    sidecar.wait_for("the current endpoints", lambda: sidecar.clusters()[WEB4] == [f"{new.ipv4}:8080"], timeout=10)
    assert mesh.curl("http://10.96.0.10/")["backend"] == "web-2"
    current = server.current
    assert current is not None
    sidecar.wait_for("ACKs of the current snapshot",
                     lambda: [s.acked for s in server.streams()] == [current.versions()])
    assert [s.node for s in server.streams()] == ["sidecar~client.default"]


def _standalone_server(mesh: Mesh, manifests: pathlib.Path, log_path: pathlib.Path) -> subprocess.Popen[bytes]:
    """`python -m meshredirect.xds` on the manifests, serving the mesh's socket."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def listening() -> int:
        return log_path.read_text().count('"xds_server_listening"') if log_path.exists() else 0
    before = listening()
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "meshredirect.xds", "--manifests", str(manifests),
                                 "--listen", mesh.address, "--node-name", "lab-node", "--access-log", "--log-json"],
                                stdout=log, stderr=log, env=env, cwd=REPO)
    deadline = time.monotonic() + 20
    while listening() == before:
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)
    return proc


def test_sidecar_outlives_a_killed_server_process_and_its_successor_serves_it(
    mesh: Mesh, tmp_path: pathlib.Path
) -> None:
    old, new = mesh.backend("web-1"), mesh.backend("web-2")
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "web.yaml").write_text(yaml.safe_dump_all(_web(old)))
    log_path = tmp_path / "xds.log"
    procs = [_standalone_server(mesh, folder, log_path)]
    try:
        sidecar = mesh.meshed_client()
        assert mesh.curl("http://10.96.0.10/")["backend"] == "web-1"
        procs[0].kill()  # SIGKILL: its socket file stays behind, stale
        procs[0].wait(10)
        (folder / "web.yaml").write_text(yaml.safe_dump_all(_web(new)))

        procs.append(_standalone_server(mesh, folder, log_path))

        sidecar.wait_for("the new endpoint", lambda: sidecar.clusters()[WEB4] == [f"{new.ipv4}:8080"], timeout=10)
        assert mesh.curl("http://10.96.0.10/")["backend"] == "web-2"
        (folder / "web.yaml").write_text(yaml.safe_dump_all(_web(old, new)))
        sidecar.wait_for("the file change", lambda: len(sidecar.clusters()[WEB4]) == 2, timeout=5)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
