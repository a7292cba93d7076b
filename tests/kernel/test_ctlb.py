"""Connect-time load balancing, observed from real clients in lab pods with the real agent."""

from __future__ import annotations

import collections
import errno
import ipaddress
import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from ctlb import desired
from ctlb.datapath import inspect, maps, tables
from ctlb.lab import servers
from tests.kernel import objects
from tests.kernel.clients import http_requests, udp_exchange
from tests.kernel.conftest import Cluster

pytestmark = pytest.mark.kernel

CLUSTER_IP = "10.96.0.10"
CLUSTER_IP6 = "fd00:10:96::10"
HTTP = [{"name": "http", "port": 80, "targetPort": "web"}]
SLICE_HTTP = [{"name": "http", "port": 8080}]


def web_backends(cluster: Cluster, count: int = 3, *, ipv6: bool = False) -> list:
    pods = []
    for i in range(count):
        pod = cluster.lab.add_pod(f"web{i}", ipv4=True, ipv6=ipv6)
        servers.start_http(pod, name=f"web{i}", port=8080)
        pods.append(pod)
    return pods


def web_service(pods: list, *, cluster_ips: tuple[str, ...] = (CLUSTER_IP,), **kw) -> list[dict]:
    objs = [objects.service("web", cluster_ips=list(cluster_ips), ports=HTTP, **kw)]
    families = {":" in ip for ip in cluster_ips}
    if False in families:
        objs.append(objects.endpoint_slice("web", addresses=[str(p.ipv4) for p in pods], ports=SLICE_HTTP))
    if True in families:
        objs.append(objects.endpoint_slice("web", suffix="v6xyz", addresses=[str(p.ipv6) for p in pods],
                                           ports=SLICE_HTTP))
    return objs


# --- TCP ----------------------------------------------------------------------------------------


def test_tcp_to_cluster_ip_reaches_every_backend_roughly_evenly(cluster: Cluster) -> None:
    pods = web_backends(cluster)
    client = cluster.lab.add_pod("client")
    cluster.write("web", web_service(pods))
    cluster.start_agent()

    answers = http_requests(client, CLUSTER_IP, 80, count=300)

    counts = collections.Counter(a.get("backend") for a in answers)
    assert set(counts) == {"web0", "web1", "web2"}, counts
    assert min(counts.values()) >= 60, f"uneven spread over 300 connections: {counts}"


def test_backend_sees_the_client_pods_own_address(cluster: Cluster) -> None:
    pods = web_backends(cluster, 1)
    client = cluster.lab.add_pod("client")
    cluster.write("web", web_service(pods))
    cluster.start_agent()

    (answer,) = http_requests(client, CLUSTER_IP, 80)

    assert answer["peer"] == str(client.ipv4), "no SNAT: the backend sees the client pod"


def test_getpeername_returns_the_service_address(cluster: Cluster) -> None:
    pods = web_backends(cluster, 1)
    client = cluster.lab.add_pod("client")
    cluster.write("web", web_service(pods))
    cluster.start_agent()

    (answer,) = http_requests(client, CLUSTER_IP, 80)

    assert answer["getpeername"] == [CLUSTER_IP, 80]
    assert answer["local"] == str(pods[0].ipv4), "yet the connection went to the backend"


def test_curl_through_the_cluster_ip(cluster: Cluster) -> None:
    pods = web_backends(cluster, 2)
    client = cluster.lab.add_pod("client")
    cluster.write("web", web_service(pods))
    cluster.start_agent()

    out = client.run(["curl", "--noproxy", "*", "-sS", "--max-time", "5", f"http://{CLUSTER_IP}/"], check=True)

    assert json.loads(out.stdout)["backend"] in {"web0", "web1"}


def test_service_without_endpoints_refuses_with_econnrefused(cluster: Cluster) -> None:
    client = cluster.lab.add_pod("client")
    cluster.write("web", [objects.service("web", cluster_ips=[CLUSTER_IP], ports=HTTP),
                          objects.endpoint_slice("web", addresses=[], ports=SLICE_HTTP)])
    cluster.start_agent()

    (answer,) = http_requests(client, CLUSTER_IP, 80)

    assert answer.get("errno") == errno.ECONNREFUSED, answer


def test_not_ready_endpoints_get_no_connections(cluster: Cluster) -> None:
    pods = web_backends(cluster, 2)
    client = cluster.lab.add_pod("client")
    objs = web_service(pods)
    objs[1] = objects.endpoint_slice("web", addresses=[str(p.ipv4) for p in pods], ports=SLICE_HTTP,
                                     not_ready=[str(pods[1].ipv4)])
    cluster.write("web", objs)
    cluster.start_agent()

    answers = http_requests(client, CLUSTER_IP, 80, count=30)

    assert {a["backend"] for a in answers} == {"web0"}


def test_destination_that_is_no_frontend_is_left_alone(cluster: Cluster) -> None:
    pods = web_backends(cluster, 2)
    client = cluster.lab.add_pod("client")
    cluster.write("web", web_service(pods))
    cluster.start_agent()

    answers = http_requests(client, str(pods[1].ipv4), 8080, count=10)

    assert {a["backend"] for a in answers} == {"web1"}
    assert {tuple(a["getpeername"]) for a in answers} == {(str(pods[1].ipv4), 8080)}


def _serve_one_node_port_backend(cluster: Cluster) -> str:
    """One backend behind a NodePort Service (ClusterIP too, node port 30080) on the node's
    address; starts the agent and returns that address."""
    pods = web_backends(cluster, 1)
    node_ip = str(cluster.lab.node.ipv4)
    svc = objects.service("web", cluster_ips=[CLUSTER_IP], type="NodePort",
                          ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}])
    cluster.write("web", [svc, objects.endpoint_slice("web", addresses=[str(pods[0].ipv4)], ports=SLICE_HTTP),
                          objects.node("lab-node", addresses=[node_ip])])
    cluster.start_agent()
    return node_ip


def test_nodeport_on_the_node_address_from_the_node(cluster: Cluster) -> None:
    node_ip = _serve_one_node_port_backend(cluster)

    (answer,) = http_requests(cluster.lab.node, node_ip, 30080)

    assert answer["backend"] == "web0"
    assert answer["getpeername"] == [node_ip, 30080]


@pytest.mark.parametrize("field", ["external_ips", "lb_ips"], ids=["externalIP", "loadBalancer-ingress"])
def test_external_and_load_balancer_addresses_are_frontends_too(cluster: Cluster, field: str) -> None:
    pods = web_backends(cluster, 1)
    client = cluster.lab.add_pod("client")
    extra = "10.97.0.10"
    kind = {"type": "LoadBalancer"} if field == "lb_ips" else {}
    objs = [objects.service("web", cluster_ips=[CLUSTER_IP], **{field: [extra]}, **kind,
                            ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30081}]),
            objects.endpoint_slice("web", addresses=[str(pods[0].ipv4)], ports=SLICE_HTTP)]
    cluster.write("web", objs)
    cluster.start_agent()

    (answer,) = http_requests(client, extra, 80)

    assert answer["backend"] == "web0"
    assert answer["getpeername"] == [extra, 80]


# --- UDP and DNS --------------------------------------------------------------------------------


def dns_service(pods: list) -> list[dict]:
    return [objects.service("dns", namespace="kube-system", cluster_ips=["10.96.0.53"],
                            ports=[{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}]),
            objects.endpoint_slice("dns", namespace="kube-system", addresses=[str(p.ipv4) for p in pods],
                                   ports=[{"name": "dns", "port": 53, "protocol": "UDP"}])]


def test_dig_at_the_cluster_ip_gets_an_answer_from_a_dnsmasq_backend(cluster: Cluster) -> None:
    pods = [cluster.lab.add_pod(f"dns{i}") for i in range(2)]
    for i, pod in enumerate(pods):
        servers.start_dnsmasq(pod, name=f"dns{i}")
    client = cluster.lab.add_pod("client")
    cluster.write("dns", dns_service(pods))
    cluster.start_agent()

    names = set()
    for _ in range(12):
        out = client.run(["dig", "@10.96.0.53", servers.DNS_WHOAMI, "TXT", "+short", "+time=2", "+tries=1"],
                         check=True)
        # dig warns ";; reply from unexpected source" when the reply is not from the Service address.
        assert "unexpected source" not in out.stdout + out.stderr
        names.add(out.stdout.strip().strip('"'))
    assert names == {"dns0", "dns1"}


@pytest.mark.parametrize("connected", [True, False], ids=["connected-udp", "unconnected-udp"])
def test_udp_reply_comes_from_the_service_address(cluster: Cluster, connected: bool) -> None:
    pod = cluster.lab.add_pod("echo0")
    servers.start_udp(pod, name="echo0", port=5353)
    client = cluster.lab.add_pod("client")
    cluster.write("echo", [
        objects.service("echo", cluster_ips=[CLUSTER_IP], ports=[{"name": "u", "port": 53, "protocol": "UDP"}]),
        objects.endpoint_slice("echo", addresses=[str(pod.ipv4)], ports=[{"name": "u", "port": 5353, "protocol": "UDP"}]),
    ])
    cluster.start_agent()

    answer = udp_exchange(client, CLUSTER_IP, 53, connected=connected)

    assert answer["backend"] == "echo0"
    assert answer["peer"] == str(client.ipv4)
    assert answer["reply_from"] == [CLUSTER_IP, 53]


# A resolver that keeps one connected UDP socket: each line on stdin is one query; each answer is
# the echo's JSON or the errno the socket gave.
_LONG_LIVED_UDP = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect(("{host}", {port}))
print("ready", flush=True)
for _ in sys.stdin:
    try:
        s.send(b"q")
        print(json.dumps(json.loads(s.recv(65536))), flush=True)
    except OSError as e:
        print(json.dumps({{"errno": e.errno}}), flush=True)
"""


def _ask(proc) -> dict:
    proc.stdin.write("q\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def test_connected_udp_socket_to_a_backend_that_stops_serving_is_ended(cluster: Cluster) -> None:
    """The most reported socket-LB bug: a resolver's connected socket pinned to a dead DNS pod."""
    pods = [cluster.lab.add_pod(f"echo{i}") for i in range(2)]
    for i, pod in enumerate(pods):
        servers.start_udp(pod, name=f"echo{i}", port=5353)
    client = cluster.lab.add_pod("client")

    def echo_objects(members: list) -> list[dict]:
        return [objects.service("echo", cluster_ips=[CLUSTER_IP], ports=[{"name": "u", "port": 53, "protocol": "UDP"}]),
                objects.endpoint_slice("echo", addresses=[str(p.ipv4) for p in members],
                                       ports=[{"name": "u", "port": 5353, "protocol": "UDP"}])]

    cluster.write("echo", echo_objects(pods))
    cluster.start_agent()
    resolvers = [client.popen([sys.executable, "-c", _LONG_LIVED_UDP.format(host=CLUSTER_IP, port=53)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(16)]
    for r in resolvers:
        assert r.stdout.readline().strip() == "ready"
    first = [_ask(r)["backend"] for r in resolvers]
    assert set(first) == {"echo0", "echo1"}, f"16 sockets should spread over both backends (chance of not: 1 in 32768): {first}"

    synced = cluster.state().syncs
    cluster.write("echo", echo_objects(pods[1:]))  # echo0 stops serving
    cluster.wait_synced(after=synced)

    for r, before in zip(resolvers, first):
        answer = _ask(r)
        if before == "echo0":
            # Destroyed sockets are disconnected: a send fails with EDESTADDRREQ, a blocked
            # receive with ECONNABORTED; either way the application opens a new socket.
            assert answer.get("errno") in (errno.EDESTADDRREQ, errno.ECONNABORTED), \
                f"the socket pinned to echo0 was not ended: {answer}"
        else:
            assert answer.get("backend") == "echo1", "a socket on a serving backend must be left alone"
    fresh = udp_exchange(client, CLUSTER_IP, 53, connected=True)
    assert fresh["backend"] == "echo1"
    ended = [e for e in cluster.log_events() if e.get("event") == "stale_udp_flows_ended"]
    assert ended and ended[-1]["sockets"] == first.count("echo0")


def test_udp_to_a_service_without_endpoints_fails_and_sends_nothing(cluster: Cluster) -> None:
    client = cluster.lab.add_pod("client")
    # A catcher: the node owns the Service address and echoes on it, so a datagram that leaked
    # out untranslated would be answered.
    cluster.lab.node.run(["ip", "addr", "add", f"{CLUSTER_IP}/32", "dev", "lo"], check=True)
    servers.start_udp(cluster.lab.node, name="leak", port=53, bind=CLUSTER_IP)
    cluster.write("echo", [
        objects.service("echo", cluster_ips=[CLUSTER_IP], ports=[{"name": "u", "port": 53, "protocol": "UDP"}]),
    ])
    cluster.start_agent()

    unconnected = udp_exchange(client, CLUSTER_IP, 53, connected=False)
    connected = udp_exchange(client, CLUSTER_IP, 53, connected=True)

    assert unconnected.get("errno") == errno.ECONNREFUSED, unconnected
    assert connected.get("errno") == errno.ECONNREFUSED, connected


# --- reverse translation per socket: shared backends, several Services on one socket ------------

ALT_IP = "10.96.0.11"
ALT_IP6 = "fd00:10:96::11"

_UDP_ASK = textwrap.dedent("""
    import json, socket
    asks, family, batch = {asks!r}, socket.{family}, {batch}
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(2)
    out = []
    for i in range(0, len(asks), batch):
        group = asks[i:i + batch]
        for host, port in group:
            s.sendto(json.dumps([host, port]).encode(), (host, port))
        for _ in group:
            try:
                data, src = s.recvfrom(65536)
                out.append({{**json.loads(data), "reply_from": [src[0], src[1]]}})
            except OSError as e:
                out.append({{"errno": e.errno}})
    print(json.dumps(out))
""")


def udp_ask(place, asks: list[tuple[str, int]], *, batch: int = 1) -> list[dict]:
    """One unconnected UDP socket sends to each (host, port) in turn, `batch` requests in flight
    at a time; per reply, the echo's JSON and the address it came from."""
    family = "AF_INET6" if ":" in asks[0][0] else "AF_INET"
    out = place.python(_UDP_ASK.format(asks=asks, family=family, batch=batch), timeout=30, check=True)
    return json.loads(out.stdout)


def udp_service(name: str, ip: str, pods: list, *, port: int = 53) -> list[dict]:
    fam6 = ":" in ip
    return [objects.service(name, cluster_ips=[ip], ports=[{"name": "u", "port": port, "protocol": "UDP"}]),
            objects.endpoint_slice(name, addresses=[str(p.ipv6 if fam6 else p.ipv4) for p in pods],
                                   ports=[{"name": "u", "port": 5353, "protocol": "UDP"}])]


@pytest.mark.parametrize("ipv6", [False, True], ids=["IPv4", "IPv6"])
def test_backend_shared_by_two_services_each_tcp_socket_sees_the_address_it_dialled(cluster: Cluster,
                                                                                     ipv6: bool) -> None:
    (pod,) = web_backends(cluster, 1, ipv6=ipv6)
    client = cluster.lab.add_pod("client", ipv6=ipv6)
    a, b = (CLUSTER_IP6, ALT_IP6) if ipv6 else (CLUSTER_IP, ALT_IP)
    cluster.write("web", web_service([pod], cluster_ips=(a,)))
    alt = web_service([pod], cluster_ips=(b,))
    alt[0]["metadata"]["name"] = "alt"
    alt[1]["metadata"]["name"] = "alt-abcde"
    alt[1]["metadata"]["labels"]["kubernetes.io/service-name"] = "alt"
    cluster.write("alt", alt)
    cluster.start_agent()

    answers = [(host, http_requests(client, host, 80)[0]) for host in (a, b, a, b)]

    assert all("errno" not in x for _, x in answers), answers
    assert [x["getpeername"][:2] for _, x in answers] == [[host, 80] for host, _ in answers]
    assert {x["backend"] for _, x in answers} == {"web0"}


@pytest.mark.parametrize("ipv6", [False, True], ids=["IPv4", "IPv6"])
def test_one_udp_socket_asking_two_services_that_share_a_backend_gets_each_reply_from_the_one_it_asked(
        cluster: Cluster, ipv6: bool) -> None:
    pod = cluster.lab.add_pod("echo0", ipv6=ipv6)
    servers.start_udp(pod, name="echo0", port=5353)
    client = cluster.lab.add_pod("client", ipv6=ipv6)
    a, b = (CLUSTER_IP6, ALT_IP6) if ipv6 else (CLUSTER_IP, ALT_IP)
    cluster.write("a", udp_service("a", a, [pod]))
    cluster.write("b", udp_service("b", b, [pod]))
    cluster.start_agent()

    asks = [(a, 53), (b, 53), (b, 53), (a, 53), (a, 53), (b, 53)]
    replies = udp_ask(client, asks)

    assert [r.get("reply_from") for r in replies] == [[host, port] for host, port in asks]


@pytest.mark.parametrize("ipv6", [False, True], ids=["IPv4", "IPv6"])
def test_one_udp_socket_with_three_services_in_flight_gets_every_reply_from_the_address_it_asked(
        cluster: Cluster, ipv6: bool) -> None:
    """A socket's slot holds two peers; the third goes through the spill map."""
    pods = [cluster.lab.add_pod(f"echo{i}", ipv6=ipv6) for i in range(3)]
    for i, pod in enumerate(pods):
        servers.start_udp(pod, name=f"echo{i}", port=5353)
    client = cluster.lab.add_pod("client", ipv6=ipv6)
    ips = ["fd00:10:96::21", "fd00:10:96::22", "fd00:10:96::23"] if ipv6 else ["10.96.0.21", "10.96.0.22", "10.96.0.23"]
    for i, (ip, pod) in enumerate(zip(ips, pods)):
        cluster.write(f"s{i}", udp_service(f"s{i}", ip, [pod]))
    cluster.start_agent()
    served_by = {f"echo{i}": ip for i, ip in enumerate(ips)}

    asks = [(ip, 53) for _ in range(4) for ip in ips]
    replies = udp_ask(client, asks, batch=3)

    assert all("errno" not in r for r in replies), replies
    assert [r["reply_from"] for r in replies] == [[served_by[r["backend"]], 53] for r in replies]


@pytest.mark.parametrize("ipv6", [False, True], ids=["IPv4", "IPv6"])
def test_udp_reply_to_an_unconnected_socket_comes_from_the_service_address_in_both_families(
        cluster: Cluster, ipv6: bool) -> None:
    pods = [cluster.lab.add_pod(f"echo{i}", ipv6=ipv6) for i in range(2)]
    for i, pod in enumerate(pods):
        servers.start_udp(pod, name=f"echo{i}", port=5353)
    client = cluster.lab.add_pod("client", ipv6=ipv6)
    ip = CLUSTER_IP6 if ipv6 else CLUSTER_IP
    cluster.write("echo", udp_service("echo", ip, pods))
    cluster.start_agent()

    connected = udp_exchange(client, ip, 53, connected=True)
    unconnected = udp_exchange(client, ip, 53, connected=False)

    assert connected["reply_from"] == [ip, 53] and unconnected["reply_from"] == [ip, 53]


_SLOW_UDP_ECHO = textwrap.dedent("""
    import json, socket, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 5353))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(65536)
        time.sleep(1.5)
        s.sendto(json.dumps({"backend": "slow"}).encode(), peer)
""")

_ASK_TWICE = textwrap.dedent("""
    import json, socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(b"1", ({host!r}, 53))
    print("sent", flush=True)
    sys.stdin.readline()
    s.sendto(b"2", ({host!r}, 53))
    out = []
    for _ in range(2):
        data, src = s.recvfrom(65536)
        out.append({{**json.loads(data), "reply_from": [src[0], src[1]]}})
    print(json.dumps(out), flush=True)
""")


def test_reply_in_flight_from_a_backend_that_left_the_set_still_comes_from_the_service_address(
        cluster: Cluster) -> None:
    """The socket's second send goes to the new backend; the first one's late reply, from the
    backend that left, is still translated (its peer moved to the spill map)."""
    slow, fast = cluster.lab.add_pod("slow"), cluster.lab.add_pod("fast")
    server = slow.popen([sys.executable, "-c", _SLOW_UDP_ECHO], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    servers.start_udp(fast, name="fast", port=5353)
    client = cluster.lab.add_pod("client")
    cluster.write("echo", udp_service("echo", CLUSTER_IP, [slow]))
    cluster.start_agent()
    asker = client.popen([sys.executable, "-c", _ASK_TWICE.format(host=CLUSTER_IP)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert asker.stdout is not None and asker.stdin is not None
    assert asker.stdout.readline().strip() == "sent"

    st = cluster.state()
    cluster.write("echo", udp_service("echo", CLUSTER_IP, [fast]))
    cluster.wait_synced(after=st.syncs)
    asker.stdin.write("go\n")
    asker.stdin.flush()
    replies = json.loads(asker.stdout.readline())

    assert [r["backend"] for r in replies] == ["fast", "slow"]
    assert [r["reply_from"] for r in replies] == [[CLUSTER_IP, 53]] * 2


def test_unconnected_udp_socket_keeps_one_backend_while_the_set_is_unchanged(cluster: Cluster) -> None:
    """As kube-proxy's conntrack entry keeps a client port on one backend; new sockets spread."""
    pods = [cluster.lab.add_pod(f"echo{i}") for i in range(3)]
    for i, pod in enumerate(pods):
        servers.start_udp(pod, name=f"echo{i}", port=5353)
    client = cluster.lab.add_pod("client")
    cluster.write("echo", udp_service("echo", CLUSTER_IP, pods))
    cluster.start_agent()

    one_socket = udp_ask(client, [(CLUSTER_IP, 53)] * 20)
    many_sockets = [udp_exchange(client, CLUSTER_IP, 53, connected=False) for _ in range(20)]

    assert len({r["backend"] for r in one_socket}) == 1
    assert len({r["backend"] for r in many_sockets}) > 1  # all 20 alike: odds 3 * (1/3)^20
    assert {tuple(r["reply_from"]) for r in one_socket + many_sockets} == {(CLUSTER_IP, 53)}


def test_cluster_ip_and_node_port_of_one_service_each_give_back_what_was_dialled(cluster: Cluster) -> None:
    node_ip = _serve_one_node_port_backend(cluster)

    via_cluster_ip = http_requests(cluster.lab.node, CLUSTER_IP, 80, count=3)
    via_node_port = http_requests(cluster.lab.node, node_ip, 30080, count=3)

    assert {tuple(a["getpeername"]) for a in via_cluster_ip} == {(CLUSTER_IP, 80)}
    assert {tuple(a["getpeername"]) for a in via_node_port} == {(node_ip, 30080)}


# --- IPv6 and dual-stack --------------------------------------------------------------------------


def test_ipv6_service_reaches_ipv6_backends(cluster: Cluster) -> None:
    pods = web_backends(cluster, 2, ipv6=True)
    client = cluster.lab.add_pod("client", ipv6=True)
    cluster.write("web", web_service(pods, cluster_ips=(CLUSTER_IP6,)))
    cluster.start_agent()

    answers = http_requests(client, CLUSTER_IP6, 80, count=40)

    assert {a["backend"] for a in answers} == {"web0", "web1"}
    assert {a["peer"] for a in answers} == {str(client.ipv6)}
    assert {tuple(a["getpeername"][:2]) for a in answers} == {(CLUSTER_IP6, 80)}


def test_dual_stack_service_answers_on_both_families(cluster: Cluster) -> None:
    pods = web_backends(cluster, 2, ipv6=True)
    client = cluster.lab.add_pod("client", ipv6=True)
    cluster.write("web", web_service(pods, cluster_ips=(CLUSTER_IP, CLUSTER_IP6)))
    cluster.start_agent()

    v4 = http_requests(client, CLUSTER_IP, 80, count=20)
    v6 = http_requests(client, CLUSTER_IP6, 80, count=20)

    assert {a["local"] for a in v4} <= {str(p.ipv4) for p in pods}
    assert {a["local"] for a in v6} <= {str(p.ipv6) for p in pods}
    assert len(v4) == len(v6) == 20


def test_ipv4_mapped_address_on_an_ipv6_socket_is_balanced_as_ipv4(cluster: Cluster) -> None:
    pods = web_backends(cluster, 1)
    client = cluster.lab.add_pod("client", ipv6=True)
    cluster.write("web", web_service(pods))
    cluster.start_agent()

    (answer,) = http_requests(client, f"::ffff:{CLUSTER_IP}", 80, family="AF_INET6")

    assert answer["backend"] == "web0"
    assert answer["getpeername"] == [f"::ffff:{CLUSTER_IP}", 80]


# --- session affinity ---------------------------------------------------------------------------


def test_session_affinity_holds_a_client_to_one_backend(cluster: Cluster) -> None:
    pods = web_backends(cluster)
    client = cluster.lab.add_pod("client")
    cluster.write("web", web_service(pods, affinity_timeout=600))
    cluster.start_agent()

    answers = http_requests(client, CLUSTER_IP, 80, count=40)

    assert len({a["backend"] for a in answers}) == 1


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_session_affinity_survives_set_changes_that_keep_its_backend(cluster: Cluster, ipv6: bool) -> None:
    pods = web_backends(cluster, 4, ipv6=ipv6)
    client = cluster.lab.add_pod("client", ipv6=ipv6)
    ips = (CLUSTER_IP6,) if ipv6 else (CLUSTER_IP,)
    cluster.write("web", web_service(pods[:3], cluster_ips=ips, affinity_timeout=600))
    cluster.start_agent()
    held = {a["backend"] for a in http_requests(client, ips[0], 80, count=10)}
    assert len(held) == 1
    (name,) = held

    # Another backend joins: a new set, in which the held backend sits elsewhere.
    syncs = cluster.state().syncs
    cluster.write("web", web_service([pods[3], *pods[:3]], cluster_ips=ips, affinity_timeout=600))
    cluster.wait_synced(after=syncs)
    assert {a["backend"] for a in http_requests(client, ips[0], 80, count=10)} == held

    # The held backend leaves: the client is balanced afresh, then held to its new backend.
    syncs = cluster.state().syncs
    cluster.write("web", web_service([p for p in pods if p.name != name], cluster_ips=ips, affinity_timeout=600))
    cluster.wait_synced(after=syncs)
    moved = {a["backend"] for a in http_requests(client, ips[0], 80, count=10)}
    assert len(moved) == 1 and moved != held


def test_a_full_affinity_set_gives_up_its_least_recently_used_client(cluster: Cluster) -> None:
    """A table of one set of four slots (`--max-affinity 4`) and five clients: the fifth takes the
    slot of the client used longest ago, and the other four stay held. With six backends, a
    client whose entry was lost instead would be re-balanced onto another one 5 times in 6."""
    pods = web_backends(cluster, 6)
    clients = [cluster.lab.add_pod(f"client{i}") for i in range(5)]
    cluster.write("web", web_service(pods, affinity_timeout=600))
    cluster.start_agent("--max-affinity", "4")

    def backend(client) -> str:
        time.sleep(0.05)  # several jiffies apart: the set orders its entries by last use
        return http_requests(client, CLUSTER_IP, 80)[0]["backend"]

    held = {i: backend(c) for i, c in enumerate(clients[:4])}
    assert {i: backend(c) for i, c in enumerate(clients[:4])} == held, "four clients fill one set"
    for i in (1, 2, 3, 0):  # client1 is now the least recently used
        assert backend(clients[i]) == held[i]
    held[4] = backend(clients[4])

    kept = {i: {backend(clients[i]) for _ in range(3)} for i in (0, 2, 3, 4)}
    assert kept == {i: {held[i]} for i in (0, 2, 3, 4)}
    fill = {f.name: (f.entries, f.max_entries) for f in inspect.inspect(cluster.bpffs).fill}
    assert fill[maps.AFFINITY[4]] == (4, 4), "`ctlb status` counts the slots in use"


def test_session_affinity_expires_after_its_timeout(cluster: Cluster) -> None:
    pods = web_backends(cluster)
    client = cluster.lab.add_pod("client")
    cluster.write("web", web_service(pods, affinity_timeout=1))
    cluster.start_agent()

    first = http_requests(client, CLUSTER_IP, 80)[0]["backend"]
    seen = {first}
    for _ in range(10):  # each pick after expiry is fresh: all 10 equal has odds (1/3)^10
        time.sleep(1.3)
        seen.add(http_requests(client, CLUSTER_IP, 80)[0]["backend"])
        if len(seen) > 1:
            break
    assert len(seen) > 1, "affinity never expired"


# --- changes, restarts, bad input -----------------------------------------------------------------


def test_endpoint_removed_and_added_is_followed_within_a_second(cluster: Cluster) -> None:
    pods = web_backends(cluster, 3)
    client = cluster.lab.add_pod("client")
    cluster.write("web", web_service(pods[:2]))
    cluster.start_agent()
    assert {a["backend"] for a in http_requests(client, CLUSTER_IP, 80, count=30)} == {"web0", "web1"}

    for target in (pods[1:], pods[:1]):  # web0 removed, web2 added; then only web0
        written = time.monotonic()
        cluster.write("web", web_service(target))
        want = {p.name for p in target}
        while True:
            got = {a["backend"] for a in http_requests(client, CLUSTER_IP, 80, count=10)}
            if got <= want:
                break
            assert time.monotonic() - written < 1.0, f"still {got} 1 s after the change"
        assert time.monotonic() - written < 1.5


def test_agent_killed_and_restarted_drops_no_connection(cluster: Cluster) -> None:
    pods = web_backends(cluster, 2)
    client = cluster.lab.add_pod("client")
    cluster.write("web", web_service(pods))
    cluster.start_agent()
    results: list[list[dict]] = []

    def connect_loop() -> None:
        results.append(http_requests(client, CLUSTER_IP, 80, count=1500))

    loop = threading.Thread(target=connect_loop)
    loop.start()
    time.sleep(0.3)
    assert cluster.kill_agent(9) == -9
    cluster.start_agent()  # compiles, swaps programs in, adopts the maps
    loop.join(timeout=120)

    answers = results[0]
    failed = [a for a in answers if "errno" in a]
    assert not failed, f"{len(failed)} of {len(answers)} connections failed: {failed[:3]}"
    assert cluster.state().in_sync


def test_upgrade_from_an_earlier_map_layout_swaps_programs_only_once_the_new_maps_are_filled(
        cluster: Cluster) -> None:
    """An agent of an earlier layout left programs attached to maps this version does not read.
    The new agent fills its own maps first, then swaps its programs in: no connection fails, and
    the earlier layout's pins go."""
    pods = web_backends(cluster, 2)
    client = cluster.lab.add_pod("client")
    cluster.write("web", web_service(pods))
    cluster.start_agent()
    assert cluster.kill_agent(9) == -9
    # The attached programs keep their maps alive through their references, as an earlier
    # version's would: unpin this version's maps, and leave a pin of the earlier layout.
    for pin in cluster.bpffs.iterdir():
        if pin.name.startswith("ctlb_"):
            pin.unlink()
    subprocess.run(["bpftool", "map", "create", str(cluster.bpffs / "ctlb_fe4"), "type", "hash", "key", "8",
                    "value", "24", "entries", "16", "name", "ctlb_fe4"], check=True, capture_output=True)
    results: list[list[dict]] = []
    loop = threading.Thread(target=lambda: results.append(http_requests(client, CLUSTER_IP, 80, count=600)))
    loop.start()
    time.sleep(0.3)

    cluster.start_agent()
    loop.join(timeout=120)

    failed = [a for a in results[0] if "errno" in a]
    assert not failed, f"{len(failed)} of {len(results[0])} connections failed: {failed[:3]}"
    assert not (cluster.bpffs / "ctlb_fe4").exists()
    assert any(e.get("event") == "programs_swapped_in" for e in cluster.log_events())
    assert cluster.ctlb("status").returncode == 0
    assert http_requests(client, CLUSTER_IP, 80)[0]["getpeername"] == [CLUSTER_IP, 80]


def test_bad_objects_are_named_and_good_ones_served(cluster: Cluster) -> None:
    pods = web_backends(cluster, 1)
    client = cluster.lab.add_pod("client")
    bad_ip = objects.service("bad-ip", cluster_ips=["10.96.0.300"], ports=HTTP)
    bad_port = objects.service("bad-port", cluster_ips=["10.96.0.12"], ports=[{"name": "http", "port": 70000}])
    cluster.write("web", [bad_ip, *web_service(pods), bad_port, {"apiVersion": "v1", "kind": "Gizmo",
                                                                  "metadata": {"name": "g"}}])
    cluster.start_agent()

    (answer,) = http_requests(client, CLUSTER_IP, 80)
    status = json.loads(cluster.ctlb("status", "--json", check=False).stdout)

    assert answer["backend"] == "web0"
    named = {p["object"] for p in status["problems"]}
    assert {"Service default/bad-ip", "Service default/bad-port"} <= named
    assert any("Gizmo" in p["object"] or "Gizmo" in p["reason"] for p in status["problems"])
    logged = {e.get("object") for e in cluster.log_events() if e.get("event") == "object_not_served"}
    assert "Service default/bad-ip" in logged
    assert status["in_sync"], "bad objects do not make the valid state out of sync"


def test_object_turned_invalid_keeps_what_was_programmed(cluster: Cluster) -> None:
    pods = web_backends(cluster, 1)
    client = cluster.lab.add_pod("client")
    cluster.write("web", web_service(pods))
    cluster.start_agent()
    st = cluster.state()
    broken = web_service(pods)
    broken[0]["spec"]["ports"][0]["port"] = 0
    cluster.write("web", broken)
    cluster.wait_synced(after=st.syncs)

    (answer,) = http_requests(client, CLUSTER_IP, 80)

    assert answer.get("backend") == "web0"
    assert any(p["object"] == "Service default/web" for p in cluster.state().problems)


def test_full_frontend_map_is_reported_and_the_rest_served(cluster: Cluster) -> None:
    pods = web_backends(cluster, 1)
    client = cluster.lab.add_pod("client")
    objs = []
    for i in range(4):
        objs += [objects.service(f"s{i}", cluster_ips=[f"10.96.1.{i + 1}"], ports=HTTP),
                 objects.endpoint_slice(f"s{i}", addresses=[str(pods[0].ipv4)], ports=SLICE_HTTP)]
    cluster.write("many", objs)
    cluster.start_agent("--max-frontends", "3")

    served = [http_requests(client, f"10.96.1.{i + 1}", 80)[0] for i in range(3)]
    problems = cluster.state().problems

    assert all(a.get("backend") == "web0" for a in served)
    assert [p["object"] for p in problems] == ["Service default/s3"]
    assert "ctlb_fe4_v2 is full" in problems[0]["reason"]


# --- CLI and uninstall --------------------------------------------------------------------------


def test_status_is_in_sync_and_services_lists_frontends(cluster: Cluster) -> None:
    pods = web_backends(cluster, 2)
    cluster.write("web", web_service(pods))
    cluster.start_agent()

    status = cluster.ctlb("status")
    rows = json.loads(cluster.ctlb("services", "--json").stdout)

    assert status.returncode == 0 and "In sync:     yes" in status.stdout
    assert rows == [{"frontend": f"{CLUSTER_IP}:80/TCP", "kind": "ClusterIP",
                     "service": "default/web:http/TCP/IPv4", "svc_id": rows[0]["svc_id"],
                     "backends": sorted(f"{p.ipv4}:8080" for p in pods), "affinity_timeout": None, "drop": False,
                     "source_ranges": None, "source_ranges_admit_node": False}]


def test_status_fails_when_the_maps_differ_from_the_source(cluster: Cluster) -> None:
    pods = web_backends(cluster, 1)
    cluster.write("web", web_service(pods))
    cluster.start_agent()
    # The only set starts at slot 0 of the backend table: clear that slot behind the agent's back.
    be_pin = cluster.bpffs / "ctlb_be4_v2"
    subprocess.run(["bpftool", "map", "update", "pinned", str(be_pin), "key", "hex", *["00"] * 4,
                    "value", "hex", *["00"] * 16], check=True, capture_output=True)

    status = cluster.ctlb("status", check=False)

    assert status.returncode == 1
    assert "differ" in status.stdout


def test_status_fails_when_one_backend_differs_from_the_source(cluster: Cluster) -> None:
    """A complete set with one backend swapped behind the agent's back is out of sync too."""
    pods = web_backends(cluster, 2)
    cluster.write("web", web_service(pods))
    cluster.start_agent()
    assert cluster.ctlb("status").returncode == 0
    pinned = maps.open_pinned(cluster.bpffs, maps.compile_layouts())
    try:
        backends = tables.kernel_tables(pinned)[4].backends
        index, slot = max(backends.items(), key=lambda item: item[0])
        stranger = desired.Backend(ipaddress.ip_address("10.255.0.9"), slot.backend.port)
        backends.put(index, tables.BackendSlot(slot.set_id, stranger))
    finally:
        for m in pinned.values():
            m.close()

    status = cluster.ctlb("status", check=False)

    assert status.returncode == 1
    assert "differ" in status.stdout


def test_uninstall_removes_programs_and_pins_and_the_service_stops_answering(cluster: Cluster) -> None:
    pods = web_backends(cluster, 1)
    client = cluster.lab.add_pod("client")
    cluster.write("web", web_service(pods))
    cluster.start_agent()
    assert http_requests(client, CLUSTER_IP, 80)[0]["backend"] == "web0"
    assert cluster.kill_agent(15) == 0
    assert http_requests(client, CLUSTER_IP, 80)[0]["backend"] == "web0", "SIGTERM leaves the datapath"

    cluster.ctlb("uninstall")

    (answer,) = http_requests(client, CLUSTER_IP, 80)
    assert "errno" in answer, "the Service address still answers"
    assert not cluster.bpffs.exists()
    tree = subprocess.run(["bpftool", "cgroup", "show", str(cluster.lab.cgroup_root)],
                          capture_output=True, text=True, check=True)
    assert tree.stdout.strip() == "", f"programs still attached:\n{tree.stdout}"
