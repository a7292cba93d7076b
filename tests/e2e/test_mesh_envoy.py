"""The whole mesh path with the real agent and a real Envoy: the agent's BPF redirect sends a meshed
pod's connections to its sidecar, the agent's own xDS server configures that sidecar, and a pod of
another namespace is balanced by CTLB at the same time."""

from __future__ import annotations

import json
import pathlib
import time

import pytest

from ctlb import lab as ctlb_lab
from ctlb.lab import envoy, servers
from tests.kernel import objects
from tests.kernel.conftest import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("require_envoy")]

CLUSTER_IP = "10.96.0.10"
HTTP = [{"name": "http", "port": 80, "targetPort": 8080}]
SLICE_HTTP = [{"name": "http", "port": 8080}]
WEB = "outbound|80|v4|web.default"
MESH = {"ctlb.io/mesh": "enabled"}


def _pod(pod: ctlb_lab.Pod) -> dict:
    return objects.pod(pod.name, uid=pod.uid, ips=[str(pod.ipv4)], namespace=pod.namespace)


def _web(*pods: ctlb_lab.Pod) -> list[dict]:
    return [objects.service("web", cluster_ips=[CLUSTER_IP], ports=HTTP),
            objects.endpoint_slice("web", addresses=[str(p.ipv4) for p in pods], ports=SLICE_HTTP)]


def _curl(pod: ctlb_lab.Pod, url: str) -> dict:
    done = pod.run(["curl", "-sS", "--fail", "--max-time", "5", url], timeout=10)
    assert done.returncode == 0, f"curl {url} in {pod.name}: {done.stderr.strip()}"
    return json.loads(done.stdout)


def _served_by_sidecar(sidecar: envoy.Sidecar) -> int:
    return sidecar.stats(f"cluster.{WEB}.").get(f"cluster.{WEB}.upstream_rq_completed", 0)


def test_meshed_pod_goes_through_envoy_while_another_namespace_gets_ctlb(
        cluster: Cluster, socket_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    web = [cluster.lab.add_pod(f"web{i}") for i in range(3)]
    for pod in web:
        servers.start_http(pod, name=pod.name, port=8080)
    app = cluster.lab.add_pod("app", namespace="shop")
    plain = cluster.lab.add_pod("plain", namespace="tools")
    cluster.write("web", _web(*web[:2]))
    cluster.write("pods", [objects.namespace("shop", labels=MESH), objects.namespace("tools"),
                           _pod(app), _pod(plain)])
    xds = f"unix:{socket_dir / 'xds.sock'}"
    cluster.start_agent("--xds-listen", xds)
    sidecar = envoy.start_sidecar(app, xds_address=xds, log_dir=tmp_path, node_id="sidecar~app.shop")
    sidecar.wait_live()
    sidecar.wait_for("web's endpoints", lambda: len(sidecar.clusters().get(WEB, [])) == 2 or None)

    # The app dials the Service address; Envoy matched the original destination to web's cluster.
    seen = {_curl(app, f"http://{CLUSTER_IP}/")["backend"] for _ in range(6)}
    assert seen <= {"web0", "web1"}
    assert _served_by_sidecar(sidecar) == 6

    # A pod of a namespace without the label, at the same time: CTLB, no Envoy involved.
    answer = _curl(plain, f"http://{CLUSTER_IP}/")
    assert answer["backend"] in {"web0", "web1"} and answer["peer"] == str(plain.ipv4)
    assert _served_by_sidecar(sidecar) == 6

    # An endpoint change reaches Envoy through the agent's xDS server within a second.
    written = time.monotonic()
    cluster.write("web", _web(web[2]))
    sidecar.wait_for("the new endpoint", lambda: sidecar.clusters().get(WEB) == [f"{web[2].ipv4}:8080"] or None,
                     timeout=5)
    assert time.monotonic() - written < 1.0
    assert _curl(app, f"http://{CLUSTER_IP}/")["backend"] == "web2"
    assert _served_by_sidecar(sidecar) == 7

    # Relabelling the namespace takes the pod out of the mesh: its next connection skips Envoy.
    cluster.write("pods", [objects.namespace("shop"), objects.namespace("tools"), _pod(app), _pod(plain)])
    deadline = time.monotonic() + 1.0
    while cluster.state().mesh.get("meshed") != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _curl(app, f"http://{CLUSTER_IP}/")["backend"] == "web2"
    assert _served_by_sidecar(sidecar) == 7
