"""kube-proxy's endpoint rules, observed from a client pod: which backends answer when endpoints
terminate, carry topology hints, sit on other nodes, or share a port number across protocols."""

from __future__ import annotations

import collections
import json

import pytest

from ctlb.lab import servers
from tests.kernel import objects
from tests.kernel.clients import http_requests, udp_exchange
from tests.kernel.conftest import NODE_NAME, Cluster

pytestmark = pytest.mark.kernel

CLUSTER_IP = "10.96.0.10"
HTTP = [{"name": "http", "port": 80, "targetPort": 8080}]
SLICE_HTTP = [{"name": "http", "port": 8080}]


def _web_pods(cluster: Cluster, count: int) -> list:
    pods = []
    for i in range(count):
        pod = cluster.lab.add_pod(f"web{i}")
        servers.start_http(pod, name=f"web{i}", port=8080)
        pods.append(pod)
    return pods


def _answers(cluster: Cluster, client, count: int = 40) -> collections.Counter:
    return collections.Counter(a.get("backend", f"errno {a.get('errno')}")
                               for a in http_requests(client, CLUSTER_IP, 80, count=count))


def _serve(cluster: Cluster, endpoints: list[dict], *, synced: int | None = None, **service_kw) -> None:
    cluster.write("web", [objects.service("web", cluster_ips=[CLUSTER_IP], ports=HTTP, **service_kw),
                          objects.slice_of("web", endpoints, ports=SLICE_HTTP)])
    if synced is not None:
        cluster.wait_synced(after=synced)


def test_terminating_endpoints_serve_only_while_nothing_is_ready(cluster: Cluster) -> None:
    pods = _web_pods(cluster, 3)
    client = cluster.lab.add_pod("client")
    e = objects.endpoint
    # web0 is draining but still serving; web1 is draining and no longer serving.
    draining = [e(str(pods[0].ipv4), ready=False, serving=True, terminating=True),
                e(str(pods[1].ipv4), ready=False, serving=False, terminating=True)]
    _serve(cluster, draining)
    cluster.start_agent()
    assert _answers(cluster, client) == {"web0": 40}

    _serve(cluster, [*draining, e(str(pods[2].ipv4))], synced=cluster.state().syncs)
    assert _answers(cluster, client) == {"web2": 40}, "a ready endpoint ends the fallback"


def test_unset_conditions_count_as_ready(cluster: Cluster) -> None:
    pods = _web_pods(cluster, 2)
    client = cluster.lab.add_pod("client")
    _serve(cluster, [objects.endpoint(str(p.ipv4), ready=None) for p in pods])
    cluster.start_agent()
    assert set(_answers(cluster, client)) == {"web0", "web1"}


def test_zone_hints_keep_traffic_in_this_nodes_zone_until_an_endpoint_lacks_a_hint(cluster: Cluster) -> None:
    pods = _web_pods(cluster, 3)
    client = cluster.lab.add_pod("client")
    cluster.write("node", [objects.node(NODE_NAME, addresses=["172.18.0.3"],
                                        labels={"topology.kubernetes.io/zone": "zone-a"})])
    e = objects.endpoint
    hinted = [e(str(pods[0].ipv4), zone="zone-a", hint_zones=["zone-a"]),
              e(str(pods[1].ipv4), node="other", zone="zone-b", hint_zones=["zone-b"])]
    _serve(cluster, hinted)
    cluster.start_agent()
    assert _answers(cluster, client) == {"web0": 40}

    # kube-proxy ignores every hint when one ready endpoint has none.
    _serve(cluster, [*hinted, e(str(pods[2].ipv4), node="other", zone="zone-b")], synced=cluster.state().syncs)
    assert set(_answers(cluster, client, 60)) == {"web0", "web1", "web2"}


def test_internal_traffic_policy_local_uses_only_this_nodes_endpoints(cluster: Cluster) -> None:
    pods = _web_pods(cluster, 2)
    client = cluster.lab.add_pod("client")
    e = objects.endpoint
    _serve(cluster, [e(str(pods[0].ipv4), node=NODE_NAME), e(str(pods[1].ipv4), node="other")],
           internal_policy="Local")
    cluster.start_agent()
    assert _answers(cluster, client) == {"web0": 40}


def test_same_port_number_over_tcp_and_udp_reaches_each_protocols_backend(cluster: Cluster) -> None:
    web = cluster.lab.add_pod("web0")
    servers.start_http(web, name="web0", port=8053)
    echo = cluster.lab.add_pod("echo0")
    servers.start_udp(echo, name="echo0", port=5353)
    client = cluster.lab.add_pod("client")
    ports = [{"name": "t", "port": 53, "protocol": "TCP", "targetPort": 8053},
             {"name": "u", "port": 53, "protocol": "UDP", "targetPort": 5353}]
    cluster.write("svc", [
        objects.service("both", cluster_ips=[CLUSTER_IP], ports=ports),
        objects.slice_of("both", [objects.endpoint(str(web.ipv4))], suffix="tcp",
                         ports=[{"name": "t", "port": 8053, "protocol": "TCP"}]),
        objects.slice_of("both", [objects.endpoint(str(echo.ipv4))], suffix="udp",
                         ports=[{"name": "u", "port": 5353, "protocol": "UDP"}]),
    ])
    cluster.start_agent()

    (tcp,) = http_requests(client, CLUSTER_IP, 53)
    udp = udp_exchange(client, CLUSTER_IP, 53, connected=False)
    assert (tcp.get("backend"), udp.get("backend")) == ("web0", "echo0"), json.dumps([tcp, udp])


def test_an_sctp_port_is_programmed_apart_from_tcp_and_udp_on_the_same_number(cluster: Cluster) -> None:
    """This kernel has no SCTP (CONFIG_IP_SCTP is off: no SCTP socket can be made), so the SCTP
    port is checked in the maps the programs read, and by TCP and UDP clients not reaching it."""
    web = cluster.lab.add_pod("web0")
    servers.start_http(web, name="web0", port=8053)
    echo = cluster.lab.add_pod("echo0")
    servers.start_udp(echo, name="echo0", port=5353)
    sig = cluster.lab.add_pod("sig0")
    client = cluster.lab.add_pod("client")
    ports = [{"name": "t", "port": 53, "protocol": "TCP", "targetPort": 8053},
             {"name": "u", "port": 53, "protocol": "UDP", "targetPort": 5353},
             {"name": "s", "port": 53, "protocol": "SCTP", "targetPort": 3868}]
    cluster.write("svc", [
        objects.service("all", cluster_ips=[CLUSTER_IP], ports=ports),
        *(objects.slice_of("all", [objects.endpoint(str(pod.ipv4))], suffix=name,
                           ports=[{"name": name, "port": target, "protocol": proto}])
          for pod, name, proto, target in ((web, "t", "TCP", 8053), (echo, "u", "UDP", 5353),
                                           (sig, "s", "SCTP", 3868))),
    ])
    cluster.start_agent()

    rows = {r["frontend"]: r["backends"] for r in json.loads(cluster.ctlb("services", "--json").stdout)}
    assert rows == {f"{CLUSTER_IP}:53/TCP": [f"{web.ipv4}:8053"], f"{CLUSTER_IP}:53/UDP": [f"{echo.ipv4}:5353"],
                    f"{CLUSTER_IP}:53/SCTP": [f"{sig.ipv4}:3868"]}
    (tcp,) = http_requests(client, CLUSTER_IP, 53)
    udp = udp_exchange(client, CLUSTER_IP, 53, connected=True)
    assert (tcp.get("backend"), udp.get("backend")) == ("web0", "echo0"), json.dumps([tcp, udp])


def test_external_ip_gets_the_cluster_wide_set_under_internal_traffic_policy_local(cluster: Cluster) -> None:
    """kube-proxy's short-circuit: a socket on the node reaching an external address of the
    Service is balanced over every endpoint, whatever the internal (or external) policy."""
    pods = _web_pods(cluster, 2)
    client = cluster.lab.add_pod("client")
    e = objects.endpoint
    _serve(cluster, [e(str(pods[0].ipv4), node=NODE_NAME), e(str(pods[1].ipv4), node="other")],
           internal_policy="Local", external_ips=["203.0.113.10"])
    cluster.start_agent()

    assert _answers(cluster, client) == {"web0": 40}
    external = collections.Counter(a.get("backend") for a in http_requests(client, "203.0.113.10", 80, count=60))
    assert set(external) == {"web0", "web1"}, external
