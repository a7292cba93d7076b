"""loadBalancerSourceRanges, seen from pods and from the node: a client whose address is in a range
reaches the LoadBalancer IP's backends; any other client is dropped there, as by kube-proxy's
firewall chain (a TCP connect times out, a UDP send succeeds and nothing arrives), while the same
client still reaches the Service's ClusterIP. The node's own processes pass when a range holds one
of its addresses.

The client's address is the one its pod has in the Pod object: the agent learns it with the pod's
cgroup, so each test writes the client pods' objects.
"""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest

from ctlb import lab as ctlb_lab
from ctlb.datapath import programs
from ctlb.lab import servers
from tests.kernel import objects
from tests.kernel.clients import http_requests, sniffing, tcp_probe, udp_probe
from tests.kernel.conftest import NODE_NAME, Cluster

pytestmark = pytest.mark.kernel

CLUSTER_IP = {4: "10.96.0.10", 6: "fd00:10:96::10"}
LB_IP = {4: "198.51.100.7", 6: "2001:db8:7::7"}
PORTS = [{"name": "http", "port": 80, "targetPort": 8080},
         {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]
SLICE_PORTS = [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]
EGRESS = programs.EGRESS.name


def _address(place: ctlb_lab.Place, family: int) -> str:
    return str(place.ipv6 if family == 6 else place.ipv4)


def _host_range(place: ctlb_lab.Place, family: int) -> str:
    return f"{_address(place, family)}/{128 if family == 6 else 32}"


class Scene:
    """A backend, two client pods and the Service `web`, in one family."""

    def __init__(self, cluster: Cluster, family: int) -> None:
        self.cluster = cluster
        self.family = family
        six = family == 6
        self.backend = cluster.lab.add_pod("web0", ipv4=not six, ipv6=six)
        servers.start_http(self.backend, name="web0", port=8080)
        servers.start_udp(self.backend, name="web0", port=5353)
        self.allowed = cluster.lab.add_pod("allowed", ipv4=not six, ipv6=six)
        self.denied = cluster.lab.add_pod("denied", ipv4=not six, ipv6=six)

    def write(self, ranges: list[str], *, backends: bool = True, synced: int | None = None) -> None:
        family, lab = self.family, self.cluster.lab
        endpoints = [objects.endpoint(_address(self.backend, family), node=NODE_NAME)] if backends else []
        self.cluster.write("web", [
            objects.node(NODE_NAME, addresses=[str(lab.node.ipv4), str(lab.node.ipv6)]),
            objects.service("web", cluster_ips=[CLUSTER_IP[family]], ports=PORTS, type="LoadBalancer",
                            lb_ips=[LB_IP[family]], source_ranges=ranges),
            objects.slice_of("web", endpoints, ports=SLICE_PORTS, family=f"IPv{family}"),
            *(objects.pod(p.name, uid=p.uid, ips=[str(a) for a in p.addresses]) for p in (self.allowed, self.denied)),
        ])
        if synced is not None:
            self.cluster.wait_synced(after=synced)

    def reaches(self, client: ctlb_lab.Place, host: str) -> str | None:
        """The backend that answered an HTTP request, or None."""
        return http_requests(client, host, 80)[0].get("backend")


def _status(cluster: Cluster) -> dict[str, Any]:
    return json.loads(cluster.ctlb("status", "--json", check=False).stdout)


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_a_client_outside_the_ranges_is_dropped_at_the_load_balancer_ip_only(cluster: Cluster, family: int) -> None:
    scene = Scene(cluster, family)
    scene.write([_host_range(scene.allowed, family), "203.0.113.0/24"])
    cluster.start_agent()
    cluster.wait_pods(2)

    assert scene.reaches(scene.allowed, LB_IP[family]) == "web0"
    with sniffing(cluster.lab, scene.denied) as sent:
        tcp = tcp_probe(scene.denied, LB_IP[family], 80)
        udp = udp_probe(scene.denied, LB_IP[family], 53)
    assert tcp.get("error") == "timed out" and tcp["retransmits"] >= 1, f"dropped, not refused: {tcp}"
    assert udp == {"unconnected_sent": 5, "unconnected_error": "timeout", "connected_sent": 5,
                   "connected_error": "timeout", "getpeername": [LB_IP[family], 53]}, udp
    assert sent == [], "a packet of the dropped client left its pod"
    assert scene.reaches(scene.denied, CLUSTER_IP[family]) == "web0", "the ClusterIP is never restricted"
    reply = json.loads(udp_probe(scene.allowed, LB_IP[family], 53)["connected_reply"])
    assert (reply["backend"], reply["peer"]) == ("web0", _address(scene.allowed, family))
    status = _status(cluster)
    assert status["in_sync"], status["reasons"]
    assert EGRESS in {a["hook"] for a in status["attached"]}
    rows = {r["frontend"]: r["source_ranges"] for r in json.loads(cluster.ctlb("services", "--json").stdout)}
    lb_frontend = f"[{LB_IP[6]}]:80/TCP" if family == 6 else f"{LB_IP[4]}:80/TCP"
    assert sorted(rows[lb_frontend]) == sorted([_host_range(scene.allowed, family), "203.0.113.0/24"]
                                               if family == 4 else [_host_range(scene.allowed, 6)])
    assert {fe for fe, ranges in rows.items() if ranges is not None} == {lb_frontend, lb_frontend.replace("80/TCP", "53/UDP")}
    assert "203.0.113.0/24" in cluster.ctlb("services").stdout or family == 6


def test_the_node_passes_only_when_a_range_holds_its_address(cluster: Cluster) -> None:
    scene = Scene(cluster, 4)
    scene.write([_host_range(scene.allowed, 4)])
    cluster.start_agent()
    cluster.wait_pods(2)

    node = cluster.lab.node
    # A node has a default route, which the drop address is reached by; the lab's node has none.
    node.run(["ip", "route", "add", "default", "dev", cluster.lab.node.bridge], check=True)
    assert tcp_probe(node, LB_IP[4], 80).get("error") == "timed out"

    scene.write([_host_range(scene.allowed, 4), f"{node.ipv4}/32"], synced=cluster.state().syncs)
    assert scene.reaches(node, LB_IP[4]) == "web0"
    assert tcp_probe(scene.denied, LB_IP[4], 80).get("error") == "timed out", "the node's range is not the pod's"


def test_changing_the_ranges_admits_new_connections_and_lifting_them_admits_everyone(cluster: Cluster) -> None:
    scene = Scene(cluster, 4)
    scene.write([_host_range(scene.allowed, 4)])
    cluster.start_agent()
    cluster.wait_pods(2)
    assert tcp_probe(scene.denied, LB_IP[4], 80).get("error") == "timed out"

    scene.write([_host_range(scene.denied, 4)], synced=cluster.state().syncs)
    assert scene.reaches(scene.denied, LB_IP[4]) == "web0"
    assert tcp_probe(scene.allowed, LB_IP[4], 80).get("error") == "timed out", "its range is gone"

    scene.write([], synced=cluster.state().syncs)
    assert scene.reaches(scene.allowed, LB_IP[4]) == "web0"
    assert scene.reaches(scene.denied, LB_IP[4]) == "web0"
    assert EGRESS not in {a["hook"] for a in _status(cluster)["attached"]}, "nothing may drop: detached"


def test_without_endpoints_every_client_is_refused_as_kube_proxy_does(cluster: Cluster) -> None:
    scene = Scene(cluster, 4)
    scene.write([_host_range(scene.allowed, 4)], backends=False)
    cluster.start_agent()
    cluster.wait_pods(2)

    assert tcp_probe(scene.denied, LB_IP[4], 80).get("errno") == errno.ECONNREFUSED
    assert tcp_probe(scene.allowed, LB_IP[4], 80).get("errno") == errno.ECONNREFUSED


def test_a_restarted_agent_keeps_the_gate_and_adopts_it(cluster: Cluster) -> None:
    scene = Scene(cluster, 4)
    scene.write([_host_range(scene.allowed, 4)])
    cluster.start_agent()
    cluster.wait_pods(2)
    cluster.kill_agent()

    assert tcp_probe(scene.denied, LB_IP[4], 80).get("error") == "timed out", "no agent: the maps still gate"
    assert scene.reaches(scene.allowed, LB_IP[4]) == "web0"

    cluster.start_agent()
    status = _status(cluster)
    assert status["in_sync"], status["reasons"]
    assert tcp_probe(scene.denied, LB_IP[4], 80).get("error") == "timed out"
