"""Drop, not refuse: internalTrafficPolicy Local with endpoints only on other nodes, seen from a
client pod. kube-proxy DROPs such traffic: a TCP connect times out after retransmitting its SYN,
a UDP send succeeds and nothing arrives anywhere. With no endpoints anywhere it still refuses.

A sniffer on the node sees every packet a pod sends (they all cross the node's bridge), so
"nothing arrives anywhere" is checked where it would show: no TCP or UDP packet of the client's
leaves its pod, neither to the Service address, nor to the backend, nor to the drop address.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from ctlb import lab as ctlb_lab
from ctlb.datapath import programs
from ctlb.lab import servers
from tests.kernel import objects
from tests.kernel.clients import TCP_PROBE, http_requests, sniffing, tcp_probe, udp_exchange, udp_probe
from tests.kernel.conftest import NODE_NAME, Cluster

pytestmark = pytest.mark.kernel

CLUSTER_IP = {4: "10.96.0.10", 6: "fd00:10:96::10"}
PORTS = [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]
SLICE_PORTS = [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]
EGRESS = programs.EGRESS.name


def _pods(cluster: Cluster, names: list[str], *, ipv6: bool = False) -> list[ctlb_lab.Pod]:
    pods = []
    for name in names:
        pod = cluster.lab.add_pod(name, ipv4=not ipv6, ipv6=ipv6)
        servers.start_http(pod, name=name, port=8080)
        servers.start_udp(pod, name=name, port=5353)
        pods.append(pod)
    return pods


def _serve(cluster: Cluster, endpoints: list[tuple[ctlb_lab.Pod, str]], *, family: int = 4,
           policy: str = "Local", synced: int | None = None) -> None:
    """The Service `local` (TCP 80 and UDP 53) with `endpoints` as (pod, node) pairs."""
    address = (lambda p: str(p.ipv6)) if family == 6 else (lambda p: str(p.ipv4))
    cluster.write("local", [
        objects.service("local", cluster_ips=[CLUSTER_IP[family]], ports=PORTS, internal_policy=policy),
        objects.slice_of("local", [objects.endpoint(address(p), node=node) for p, node in endpoints],
                         ports=SLICE_PORTS, family=f"IPv{family}"),
    ])
    if synced is not None:
        cluster.wait_synced(after=synced)


def _status(cluster: Cluster) -> dict[str, Any]:
    return json.loads(cluster.ctlb("status", "--json", check=False).stdout)


def _attached(cluster: Cluster) -> set[str]:
    return {a["hook"] for a in _status(cluster)["attached"]}


def _dropped(cluster: Cluster) -> dict[str, bool]:
    """`ctlb services`: whether each frontend drops."""
    return {r["frontend"]: r["drop"] for r in json.loads(cluster.ctlb("services", "--json").stdout)}


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_tcp_connect_times_out_when_only_other_nodes_have_endpoints(cluster: Cluster, family: int) -> None:
    (remote,) = _pods(cluster, ["web1"], ipv6=family == 6)
    client = cluster.lab.add_pod("client", ipv4=family == 4, ipv6=family == 6)
    _serve(cluster, [(remote, "other")], family=family)
    cluster.start_agent()

    with sniffing(cluster.lab, client) as sent:
        answer = tcp_probe(client, CLUSTER_IP[family], 80)

    assert answer.get("errno") != errno.ECONNREFUSED, "dropped, not refused"
    assert answer.get("error") == "timed out" and answer["state"] == 2, answer  # still SYN-SENT
    assert answer["retransmits"] >= 1, f"the SYN was not retransmitted as a lost one would be: {answer}"
    assert sent == [], "a packet of the dropped connection left the pod"


def test_tcp_connect_from_an_ipv6_socket_to_an_ipv4_service_times_out(cluster: Cluster) -> None:
    (remote,) = _pods(cluster, ["web1"])
    client = cluster.lab.add_pod("client")
    _serve(cluster, [(remote, "other")])
    cluster.start_agent()

    with sniffing(cluster.lab, client) as sent:
        answer = tcp_probe(client, f"::ffff:{CLUSTER_IP[4]}", 80)

    assert answer.get("error") == "timed out" and answer["retransmits"] >= 1, answer
    assert sent == []


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_udp_send_succeeds_and_nothing_arrives_when_only_other_nodes_have_endpoints(
        cluster: Cluster, family: int) -> None:
    (remote,) = _pods(cluster, ["web1"], ipv6=family == 6)
    client = cluster.lab.add_pod("client", ipv4=family == 4, ipv6=family == 6)
    _serve(cluster, [(remote, "other")], family=family)
    cluster.start_agent()

    with sniffing(cluster.lab, client) as sent:
        answer = udp_probe(client, CLUSTER_IP[family], 53)

    assert answer == {"unconnected_sent": 5, "unconnected_error": "timeout",
                      "connected_sent": 5, "connected_error": "timeout",
                      "getpeername": [CLUSTER_IP[family], 53]}, answer
    assert sent == [], "a datagram of the dropped flow left the pod"


def test_local_policy_with_no_endpoints_anywhere_still_refuses(cluster: Cluster) -> None:
    client = cluster.lab.add_pod("client")
    _serve(cluster, [])
    cluster.start_agent()

    assert tcp_probe(client, CLUSTER_IP[4], 80).get("errno") == errno.ECONNREFUSED
    assert udp_probe(client, CLUSTER_IP[4], 53)["unconnected_error"] == errno.ECONNREFUSED
    assert EGRESS not in _attached(cluster), "nothing drops: the egress program is not attached"


_LONG_LIVED_UDP = textwrap.dedent("""
    import json, socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    s.connect(({host!r}, {port}))
    print("ready", flush=True)
    for _ in sys.stdin:
        try:
            s.send(b"q")
            print(json.dumps({{"reply": s.recv(65536).decode()}}), flush=True)
        except OSError as e:
            print(json.dumps({{"errno": e.errno if e.errno is not None else "timeout"}}), flush=True)
""")


def _ask(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("q\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def test_an_endpoint_appearing_on_this_node_ends_the_drop_and_the_sockets_it_held(cluster: Cluster) -> None:
    """kube-proxy lets the next SYN or datagram through once a local endpoint exists. Here the
    sockets sent to the drop address meanwhile are ended (a pending connect fails at once with
    ECONNABORTED, a connected UDP socket is disconnected), new ones reach the local endpoint,
    and the egress program, needed no more, is detached."""
    local, remote = _pods(cluster, ["web0", "web1"])
    client = cluster.lab.add_pod("client")
    _serve(cluster, [(remote, "other")])
    cluster.start_agent()
    assert EGRESS in _attached(cluster)
    assert _status(cluster)["in_sync"], _status(cluster)["reasons"]
    assert _dropped(cluster) == {f"{CLUSTER_IP[4]}:80/TCP": True, f"{CLUSTER_IP[4]}:53/UDP": True}
    pending = client.popen([sys.executable, "-c", TCP_PROBE.format(host=CLUSTER_IP[4], port=80, timeout=30)],
                           stdout=subprocess.PIPE, text=True)
    resolver = client.popen([sys.executable, "-c", _LONG_LIVED_UDP.format(host=CLUSTER_IP[4], port=53)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert resolver.stdout is not None and resolver.stdout.readline().strip() == "ready"
    assert _ask(resolver) == {"errno": "timeout"}

    _serve(cluster, [(local, NODE_NAME), (remote, "other")], synced=cluster.state().syncs)

    out, _ = pending.communicate(timeout=10)
    assert json.loads(out).get("errno") == errno.ECONNABORTED, out
    assert _ask(resolver).get("errno") in (errno.EDESTADDRREQ, errno.ECONNABORTED)
    assert {a.get("backend") for a in http_requests(client, CLUSTER_IP[4], 80, count=10)} == {"web0"}
    assert udp_exchange(client, CLUSTER_IP[4], 53, connected=True).get("backend") == "web0"
    assert EGRESS not in _attached(cluster)
    assert _status(cluster)["in_sync"], _status(cluster)["reasons"]
    assert _dropped(cluster) == {f"{CLUSTER_IP[4]}:80/TCP": False, f"{CLUSTER_IP[4]}:53/UDP": False}


def test_a_restarted_agent_keeps_dropping_and_uninstall_removes_the_egress_program(cluster: Cluster) -> None:
    (remote,) = _pods(cluster, ["web1"])
    client = cluster.lab.add_pod("client")
    _serve(cluster, [(remote, "other")])
    cluster.start_agent()
    cluster.kill_agent()
    cluster.start_agent()
    assert EGRESS in _attached(cluster)
    assert tcp_probe(client, CLUSTER_IP[4], 80).get("error") == "timed out"

    cluster.kill_agent()
    cluster.ctlb("uninstall")
    assert not cluster.bpffs.exists()
    attached = subprocess.run(["bpftool", "cgroup", "show", str(cluster.lab.cgroup_root)],
                              capture_output=True, text=True, check=True).stdout
    assert attached.strip() == "", f"programs left on the cgroup:\n{attached}"
