"""kube-proxy's health servers, served by the real agent and asked by curl: a LoadBalancer Service's
healthCheckNodePort follows where its endpoints are, and /healthz follows the node."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from typing import Any

import pytest

from tests.kernel import objects
from tests.kernel.conftest import NODE_NAME, Cluster

pytestmark = pytest.mark.kernel

SLICE_HTTP = [{"name": "http", "port": 8080}]


def _free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int | None, dict[str, Any]]:
    """The status and JSON body curl gets; None when it cannot connect."""
    out = subprocess.run(["curl", "-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}", url],
                         capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        return None, {}
    body, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(body)


def _node(*taints: str) -> dict[str, Any]:
    node = objects.node(NODE_NAME, addresses=["172.18.0.3"])
    if taints:
        node["spec"]["taints"] = [{"key": key, "effect": "NoSchedule"} for key in taints]
    return node


def _serve(cluster: Cluster, name: str, *, hc_port: int, nodes: list[str], policy: str = "Local",
           synced: int | None = None) -> None:
    """A LoadBalancer Service ("web" or "shop", apart in every frontend) with one endpoint on each of `nodes`."""
    n = {"web": 10, "shop": 11}[name]
    endpoints = [objects.endpoint(f"10.244.{n}.{i + 2}", node=node) for i, node in enumerate(nodes)]
    ports = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30000 + n}]
    cluster.write(name, [
        objects.service(name, cluster_ips=[f"10.96.0.{n}"], ports=ports, type="LoadBalancer",
                        lb_ips=[f"198.51.100.{n}"], external_policy=policy, health_check_node_port=hc_port),
        objects.slice_of(name, endpoints, ports=SLICE_HTTP),
    ])
    if synced is not None:
        cluster.wait_synced(after=synced)


def test_health_check_answers_200_only_while_an_endpoint_is_on_this_node(cluster: Cluster) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    cluster.write("node", [_node()])
    _serve(cluster, "web", hc_port=port, nodes=[NODE_NAME, "other"])
    cluster.start_agent()
    here = _get(url)

    _serve(cluster, "web", hc_port=port, nodes=["other", "other"], synced=cluster.state().syncs)
    gone = _get(url)

    assert here == (200, {"service": {"namespace": "default", "name": "web"}, "localEndpoints": 1,
                          "serviceProxyHealthy": True})
    assert gone == (503, {"service": {"namespace": "default", "name": "web"}, "localEndpoints": 0,
                          "serviceProxyHealthy": True})


def test_health_check_goes_away_with_external_traffic_policy_local(cluster: Cluster) -> None:
    port = _free_port()
    cluster.write("node", [_node()])
    _serve(cluster, "web", hc_port=port, nodes=[NODE_NAME])
    cluster.start_agent()
    before = _get(f"http://127.0.0.1:{port}/")[0]

    _serve(cluster, "web", hc_port=port, nodes=[NODE_NAME], policy="Cluster", synced=cluster.state().syncs)

    assert (before, _get(f"http://127.0.0.1:{port}/")[0]) == (200, None)
    assert cluster.state().health["checks"] == []


def test_health_check_moves_with_its_port(cluster: Cluster) -> None:
    old, new = _free_port(), _free_port()
    cluster.write("node", [_node()])
    _serve(cluster, "web", hc_port=old, nodes=[NODE_NAME])
    cluster.start_agent()

    _serve(cluster, "web", hc_port=new, nodes=[NODE_NAME], synced=cluster.state().syncs)

    assert (_get(f"http://127.0.0.1:{old}/")[0], _get(f"http://127.0.0.1:{new}/")[0]) == (None, 200)


def test_a_port_in_use_is_reported_naming_the_service_and_the_others_are_served(cluster: Cluster) -> None:
    busy, fine = _free_port(), _free_port()
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", busy))
    holder.listen()
    try:
        cluster.write("node", [_node()])
        _serve(cluster, "web", hc_port=busy, nodes=[NODE_NAME])
        _serve(cluster, "shop", hc_port=fine, nodes=[NODE_NAME])
        cluster.start_agent()
        status = json.loads(cluster.ctlb("status", "--json").stdout)
        served = _get(f"http://127.0.0.1:{fine}/")[0]
    finally:
        holder.close()
    # Tried again every few seconds: the port is served once it is free.
    deadline = time.monotonic() + 30
    while cluster.state().problems and time.monotonic() < deadline:
        time.sleep(0.2)

    assert [(p["object"], f"healthCheckNodePort {busy}" in p["reason"], "Address already in use" in p["reason"])
            for p in status["problems"]] == [("Service default/web", True, True)]
    assert served == 200
    assert (cluster.state().problems, _get(f"http://127.0.0.1:{busy}/")[0]) == ([], 200)


def test_healthz_is_served_and_fails_when_the_autoscaler_will_delete_the_node(cluster: Cluster) -> None:
    cluster.write("node", [_node()])
    cluster.start_agent("--healthz-bind-address", "127.0.0.1:0")
    address = cluster.state().health["healthz"]["address"]
    healthz, livez = _get(f"http://{address}/healthz"), _get(f"http://{address}/livez")

    cluster.write("node", [_node("ToBeDeletedByClusterAutoscaler")])
    cluster.wait_synced(after=cluster.state().syncs)
    draining, still_live = _get(f"http://{address}/healthz"), _get(f"http://{address}/livez")

    assert (healthz[0], healthz[1]["nodeEligible"], healthz[1]["healthy"]) == (200, True, True)
    assert (livez[0], "nodeEligible" in livez[1]) == (200, False)
    assert (draining[0], draining[1]["nodeEligible"], still_live[0]) == (503, False, 200)
    assert "Healthz:     http://" in cluster.ctlb("status").stdout
