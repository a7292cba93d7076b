"""The per-namespace mesh switch, observed from pods: meshed pods' connections reach their sidecar
with the Service address recoverable through SO_ORIGINAL_DST; other pods keep connect-time load
balancing; the switch, the exclusions and the sidecar's own traffic behave as Istio's capture."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from ctlb.datapath import cgroup, programs
from ctlb.lab import servers
from tests.kernel import objects, sidecar
from tests.kernel.clients import http_requests
from tests.kernel.conftest import Cluster

pytestmark = pytest.mark.kernel

CLUSTER_IP = "10.96.0.10"
CLUSTER_IP6 = "fd00:10:96::10"
HTTP = [{"name": "http", "port": 80, "targetPort": 8080}]
SLICE_HTTP = [{"name": "http", "port": 8080}]
MESH = {"ctlb.io/mesh": "enabled"}


def _backends(cluster: Cluster, count: int = 2, *, ipv6: bool = False) -> list:
    pods = []
    for i in range(count):
        pod = cluster.lab.add_pod(f"web{i}", ipv6=ipv6)
        servers.start_http(pod, name=f"web{i}", port=8080)
        pods.append(pod)
    return pods


def _web(backends: list, *, ipv6: bool = False) -> list[dict]:
    ips = [CLUSTER_IP6] if ipv6 else [CLUSTER_IP]
    addresses = [str(p.ipv6 if ipv6 else p.ipv4) for p in backends]
    return [objects.service("web", cluster_ips=ips, ports=HTTP),
            objects.endpoint_slice("web", addresses=addresses, ports=SLICE_HTTP)]


def _pod_object(pod, *, annotations: dict[str, str] | None = None) -> dict:
    ips = [str(a) for a in pod.addresses]
    return objects.pod(pod.name, uid=pod.uid, ips=ips, namespace=pod.namespace, annotations=annotations)


def _meshed_app(cluster: Cluster) -> object:
    """Two web backends behind the Service, and pod `app` with its sidecar in a meshed
    namespace, served by a started agent."""
    backends = _backends(cluster)
    app = cluster.lab.add_pod("app", namespace="shop")
    sidecar.start(app)
    cluster.write("web", _web(backends))
    cluster.write("pods", [objects.namespace("shop", labels=MESH), _pod_object(app)])
    cluster.start_agent()
    return app


def _one(cluster: Cluster, client, host: str = CLUSTER_IP, port: int = 80) -> dict:
    return http_requests(client, host, port)[0]


def _wait_for(predicate, *, timeout: float = 5.0) -> float:
    """Seconds until predicate() held; fails after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s")


def test_meshed_pod_reaches_its_sidecar_which_sees_the_service_address(cluster: Cluster) -> None:
    backends = _backends(cluster)
    app = cluster.lab.add_pod("app", namespace="shop")
    plain = cluster.lab.add_pod("plain", namespace="tools")
    sidecar.start(app)
    cluster.write("web", _web(backends))
    cluster.write("pods", [objects.namespace("shop", labels=MESH), objects.namespace("tools"),
                           _pod_object(app), _pod_object(plain)])
    cluster.start_agent()

    answers = http_requests(app, CLUSTER_IP, 80, count=20)
    for a in answers:
        assert a.get("via") == "sidecar", a
        assert a["original_dst"] == [CLUSTER_IP, 80]
        # The sidecar's own connection to the Service address was balanced, not captured again.
        assert a["backend"] in {"web0", "web1"}
        assert a["peer"] == str(app.ipv4), "the backend sees the meshed pod's address (the sidecar's)"
        assert a["getpeername"] == [CLUSTER_IP, 80], "the application still sees the Service address"
    assert len({a["backend"] for a in answers}) == 2

    # An IPv6 socket dialling the IPv4 Service address in mapped form: captured all the same.
    mapped = http_requests(app, "::ffff:" + CLUSTER_IP, 80, family="AF_INET6")[0]
    assert mapped.get("via") == "sidecar", mapped
    assert mapped["original_dst"] == [CLUSTER_IP, 80]
    assert mapped["getpeername"][:2] == ["::ffff:" + CLUSTER_IP, 80]

    # The same Service from a pod of a namespace without the label: connect-time load balancing.
    direct = http_requests(plain, CLUSTER_IP, 80, count=20)
    assert all("via" not in a and a["backend"] in {"web0", "web1"} for a in direct), direct
    assert all(a["peer"] == str(plain.ipv4) for a in direct)
    assert cluster.state().mesh == {"pods": 2, "meshed": 1, "waiting": []}


def test_ipv6_destinations_keep_their_original_address(cluster: Cluster) -> None:
    backends = _backends(cluster, ipv6=True)
    app = cluster.lab.add_pod("app", namespace="shop", ipv6=True)
    sidecar.start(app)
    cluster.write("web", _web(backends, ipv6=True))
    cluster.write("pods", [objects.namespace("shop", labels=MESH), _pod_object(app)])
    cluster.start_agent()

    a = _one(cluster, app, CLUSTER_IP6)
    assert a.get("via") == "sidecar", a
    assert a["original_dst"] == [CLUSTER_IP6, 80]
    assert a["sidecar_peer"][0] == "::1"
    assert a["getpeername"][:2] == [CLUSTER_IP6, 80]
    assert a["backend"] in {"web0", "web1"}
    assert a["peer"] == str(app.ipv6)


def test_relabelling_the_namespace_flips_new_connections_within_a_second(cluster: Cluster) -> None:
    backends = _backends(cluster)
    app = cluster.lab.add_pod("app", namespace="shop")
    sidecar.start(app)
    cluster.write("web", _web(backends))
    cluster.write("pods", [objects.namespace("shop"), _pod_object(app)])
    cluster.start_agent()
    assert "via" not in _one(cluster, app)

    cluster.write("pods", [objects.namespace("shop", labels=MESH), _pod_object(app)])
    assert _wait_for(lambda: _one(cluster, app).get("via") == "sidecar") < 1.0

    cluster.write("pods", [objects.namespace("shop", labels={"istio-injection": "enabled"}), _pod_object(app)])
    time.sleep(0.3)
    assert _one(cluster, app).get("via") == "sidecar", "istio-injection=enabled is honoured"

    cluster.write("pods", [objects.namespace("shop", labels=MESH),
                           _pod_object(app, annotations={"sidecar.istio.io/inject": "false"})])
    assert _wait_for(lambda: "via" not in _one(cluster, app)) < 1.0


POD_PROGRAMS = {"ctlb_meshconn4", "ctlb_meshconn6", "ctlb_sockops", "ctlb_getsockopt"}


def _status(cluster: Cluster) -> dict:
    return json.loads(cluster.ctlb("status", "--json", check=False).stdout)


def _attached(cluster: Cluster) -> set[str]:
    return {a["hook"] for a in _status(cluster)["attached"]}


def _on_cgroup(pod) -> set[str]:
    """The programs attached to a pod's own cgroup (not inherited from above)."""
    return _on_cgroup_path(pod.pod_cgroup)


def _on_cgroup_path(path) -> set[str]:
    out = subprocess.run(["bpftool", "cgroup", "show", str(path), "-j"],
                         capture_output=True, text=True, check=True).stdout
    return {p["name"] for p in json.loads(out.strip() or "[]")}


def _pod_pins(cluster: Cluster) -> list[str]:
    return sorted(e.name for e in cluster.bpffs.iterdir() if e.name.startswith("link_pod_"))


def test_the_mesh_programs_are_attached_only_where_and_while_a_pod_is_meshed(cluster: Cluster) -> None:
    backends = _backends(cluster)
    app = cluster.lab.add_pod("app", namespace="shop")
    plain = cluster.lab.add_pod("plain", namespace="tools")
    sidecar.start(app)
    cluster.write("web", _web(backends))
    pods = [objects.namespace("tools"), _pod_object(app), _pod_object(plain)]
    cluster.write("pods", [objects.namespace("shop"), *pods])
    cluster.start_agent()
    assert "via" not in _one(cluster, app)
    assert not {"sockops", "getsockopt"} & _attached(cluster), "the node-wide cgroup never carries them"
    assert _on_cgroup(app) == _on_cgroup(plain) == set()
    assert _status(cluster)["in_sync"], _status(cluster)["reasons"]

    cluster.write("pods", [objects.namespace("shop", labels=MESH), *pods])
    _wait_for(lambda: _one(cluster, app).get("via") == "sidecar")
    assert _on_cgroup(app) == POD_PROGRAMS, "the mesh's programs hang on the meshed pod"
    assert _on_cgroup(plain) == set(), "a pod outside the mesh runs no mesh program"
    on_pods = _status(cluster)["attached_to_pods"]
    assert {a["program"] for a in on_pods} == POD_PROGRAMS, "ctlb status shows them"
    assert {a["cgroup_id"] for a in on_pods} == {app.pod_cgroup.stat().st_ino}
    answers = http_requests(app, CLUSTER_IP, 80, count=10)
    assert all(a["original_dst"] == [CLUSTER_IP, 80] for a in answers), answers
    assert all("via" not in a for a in http_requests(plain, CLUSTER_IP, 80, count=5))
    assert _status(cluster)["in_sync"], _status(cluster)["reasons"]

    cluster.write("pods", [objects.namespace("shop"), *pods])
    _wait_for(lambda: "via" not in _one(cluster, app))
    _wait_for(lambda: _on_cgroup(app) == set(), timeout=5.0)
    assert _pod_pins(cluster) == []
    assert _status(cluster)["in_sync"], _status(cluster)["reasons"]
    assert {a["backend"] for a in http_requests(app, CLUSTER_IP, 80, count=10)} <= {"web0", "web1"}

    # Meshed again, and the agent restarted while it is: the new agent keeps the programs.
    cluster.write("pods", [objects.namespace("shop", labels=MESH), *pods])
    _wait_for(lambda: _one(cluster, app).get("via") == "sidecar")
    cluster.kill_agent()
    assert _one(cluster, app).get("via") == "sidecar", "the pinned links keep capturing without the agent"
    cluster.start_agent()
    assert _on_cgroup(app) == POD_PROGRAMS
    assert _one(cluster, app)["original_dst"] == [CLUSTER_IP, 80]

    # The pod goes away: its links go with it; uninstall leaves no pod link behind.
    cluster.write("pods", [objects.namespace("shop", labels=MESH), objects.namespace("tools"), _pod_object(plain)])
    _wait_for(lambda: _pod_pins(cluster) == [])
    assert _on_cgroup(app) == set()
    cluster.write("pods", [objects.namespace("shop", labels=MESH), *pods])
    _wait_for(lambda: len(_pod_pins(cluster)) == len(POD_PROGRAMS))
    cluster.kill_agent()
    cluster.ctlb("uninstall")
    assert _on_cgroup(app) == set()
    assert not cluster.bpffs.exists() or _pod_pins(cluster) == []


def test_an_upgrade_detaches_the_node_wide_sock_ops_of_earlier_versions(cluster: Cluster) -> None:
    app = _meshed_app(cluster)
    cluster.kill_agent()
    # What an earlier version left: sock_ops and getsockopt linked on the node-wide cgroup.
    bpf, fds = programs.compile_and_load(cluster.bpffs, programs.MapSizes())
    root = cluster.lab.cgroup_root
    cg_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for hook in programs.POD_HOOKS[2:]:
            programs._attach_one(hook, cg_fd, cgroup.cgroup_id(root), cluster.bpffs / f"link_{hook.name}",
                                 fds[hook.program])
    finally:
        os.close(cg_fd)
        bpf.cleanup()
    assert {"ctlb_sockops", "ctlb_getsockopt"} <= _on_cgroup_path(root)

    cluster.start_agent()
    assert not {"ctlb_sockops", "ctlb_getsockopt"} & _on_cgroup_path(root)
    assert not (cluster.bpffs / "link_sockops").exists() and not (cluster.bpffs / "link_getsockopt").exists()
    assert _one(cluster, app)["original_dst"] == [CLUSTER_IP, 80]


def test_excluded_ports_and_ranges_bypass_the_sidecar(cluster: Cluster) -> None:
    backends = _backends(cluster)
    app = cluster.lab.add_pod("app", namespace="shop")
    sidecar.start(app)
    cluster.write("web", _web(backends))
    ns = objects.namespace("shop", labels=MESH)

    def annotate(annotations: dict[str, str]) -> None:
        syncs = cluster.state().syncs if cluster.agent else 0
        cluster.write("pods", [ns, _pod_object(app, annotations=annotations)])
        if cluster.agent:
            cluster.wait_synced(after=syncs)
        else:
            cluster.start_agent()

    annotate({"traffic.sidecar.istio.io/excludeOutboundPorts": "5432, 80"})
    assert "via" not in _one(cluster, app), "an excluded port is balanced directly"

    annotate({"traffic.sidecar.istio.io/excludeOutboundIPRanges": "192.0.2.0/24,10.96.0.0/16"})
    assert "via" not in _one(cluster, app), "an excluded range is balanced directly"

    annotate({"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.100.0.0/16"})
    assert "via" not in _one(cluster, app), "outside the included ranges"

    annotate({"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.96.0.0/12",
              "traffic.sidecar.istio.io/excludeOutboundPorts": "not-a-port"})
    assert _one(cluster, app).get("via") == "sidecar", "inside the included ranges"
    problems = {p["object"]: p["reason"] for p in cluster.state().problems}
    assert "'not-a-port' is not a port" in problems["Pod shop/app"]

    # Loopback is never captured: the sidecar, dialled directly, has no original destination.
    assert _one(cluster, app, "127.0.0.1", 15001)["sidecar_error"].startswith("[Errno 2]")
    # Nor is the sidecar's port: the pod's own address there is not sent onto the sidecar.
    assert _one(cluster, app, str(app.ipv4), 15001).get("errno") == errno.ECONNREFUSED


def test_no_sidecar_listening_fails_fast_and_the_next_connection_succeeds_once_it_is(cluster: Cluster) -> None:
    backends = _backends(cluster)
    app = cluster.lab.add_pod("app", namespace="shop")
    cluster.write("web", _web(backends))
    cluster.write("pods", [objects.namespace("shop", labels=MESH), _pod_object(app)])
    cluster.start_agent()

    started = time.monotonic()
    assert _one(cluster, app).get("errno") == errno.ECONNREFUSED
    assert time.monotonic() - started < 2.5  # includes the client's interpreter start-up

    sidecar.start(app)
    assert _one(cluster, app).get("via") == "sidecar", "no cached 'not in the mesh'"


def test_a_pod_created_after_the_agent_started_is_meshed_once_its_cgroup_exists(cluster: Cluster) -> None:
    backends = _backends(cluster)
    cluster.write("web", _web(backends))
    cluster.write("pods", [objects.namespace("shop", labels=MESH)])
    cluster.start_agent()

    app = cluster.lab.add_pod("app", namespace="shop")
    sidecar.start(app)
    written = time.monotonic()
    cluster.write("pods", [objects.namespace("shop", labels=MESH), _pod_object(app)])
    _wait_for(lambda: _one(cluster, app).get("via") == "sidecar", timeout=5)
    assert time.monotonic() - written < 2.0  # 1 s, plus the client's start-up per try


_BOUND_CLIENT = textwrap.dedent("""
    import json, socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 40000))
    s.settimeout(5)
    s.connect(({host!r}, 80))
    s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    print(data.split(b"\\r\\n\\r\\n", 1)[1].decode())
""")


def test_two_pods_with_the_same_loopback_tuple_each_get_their_own_destination(cluster: Cluster) -> None:
    backends = _backends(cluster)
    other = cluster.lab.add_pod("api0")
    servers.start_http(other, name="api0", port=8080)
    pods = [cluster.lab.add_pod(f"app{i}", namespace="shop") for i in range(2)]
    for pod in pods:
        # Both sidecars ask for the original destination only once both connections are up.
        sidecar.start(pod, delay=0.5)
    api_ip = "10.96.0.20"
    cluster.write("web", [*_web(backends), objects.service("api", cluster_ips=[api_ip], ports=HTTP),
                          objects.endpoint_slice("api", addresses=[str(other.ipv4)], ports=SLICE_HTTP)])
    cluster.write("pods", [objects.namespace("shop", labels=MESH), *(_pod_object(p) for p in pods)])
    cluster.start_agent()

    clients = [pod.popen([sys.executable, "-c", _BOUND_CLIENT.format(host=host)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
               for pod, host in zip(pods, (CLUSTER_IP, api_ip))]
    answers = [json.loads(c.communicate(timeout=15)[0]) for c in clients]
    # Same client tuple 127.0.0.1:40000 -> 127.0.0.1:15001 in both pods, at the same time.
    assert [a["sidecar_peer"] for a in answers] == [["127.0.0.1", 40000]] * 2
    assert answers[0]["original_dst"] == [CLUSTER_IP, 80]
    assert answers[1]["original_dst"] == [api_ip, 80]
    assert answers[1]["backend"] == "api0"


_HELD_CLIENT = textwrap.dedent("""
    import json, os, socket
    conns = []
    for i, host in enumerate({hosts!r}):  # one after another: each socket is newer than the last
        # From CPU to CPU: socket cookies come from per-CPU batches, so they do not tell age.
        os.sched_setaffinity(0, {{i % os.cpu_count()}})
        s = socket.create_connection((host, 80), timeout=5)
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        conns.append(s)
    answers = []
    for s in conns:
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        answers.append(json.loads(data.split(b"\\r\\n\\r\\n", 1)[1]))
    print(json.dumps(answers))
""")


def test_the_original_destination_table_keeps_the_newest_connections_of_a_set(cluster: Cluster) -> None:
    """With a table of one set (4 slots), four connections waiting for their sidecar each get
    their own destination; a fifth takes the oldest one's slot; a reused tuple gets its new one."""
    backends = _backends(cluster)
    other = cluster.lab.add_pod("api0")
    servers.start_http(other, name="api0", port=8080)
    app = cluster.lab.add_pod("app", namespace="shop")
    sidecar.start(app, delay=1.0)  # asks only once every connection is recorded
    api_ip = "10.96.0.20"
    cluster.write("web", [*_web(backends), objects.service("api", cluster_ips=[api_ip], ports=HTTP),
                          objects.endpoint_slice("api", addresses=[str(other.ipv4)], ports=SLICE_HTTP)])
    cluster.write("pods", [objects.namespace("shop", labels=MESH), _pod_object(app)])
    cluster.start_agent("--max-mesh-conns", "4")

    def held(hosts: list[str]) -> list[dict]:
        run = app.run([sys.executable, "-c", _HELD_CLIENT.format(hosts=hosts)], timeout=30, check=True)
        return json.loads(run.stdout)

    hosts = [CLUSTER_IP, api_ip, CLUSTER_IP, api_ip]
    assert [a.get("original_dst") for a in held(hosts)] == [[h, 80] for h in hosts]

    answers = held([*hosts, CLUSTER_IP])
    assert "original_dst" not in answers[0] and "sidecar_error" in answers[0], "the oldest gave way"
    assert [a.get("original_dst") for a in answers[1:]] == [[h, 80] for h in [*hosts[1:], CLUSTER_IP]]
    assert [a["backend"] for a in answers[1:]].count("api0") == 2

    # The same tuple twice in a row, to two Services: the second record is the one answered.
    for host in (CLUSTER_IP, api_ip):
        run = app.run([sys.executable, "-c", _BOUND_CLIENT.format(host=host)], timeout=30, check=True)
        assert json.loads(run.stdout)["original_dst"] == [host, 80]


def test_a_restarted_agent_keeps_meshed_pods_captured_and_adopts_them(cluster: Cluster) -> None:
    backends = _backends(cluster)
    app = cluster.lab.add_pod("app", namespace="shop")
    sidecar.start(app)
    cluster.write("web", _web(backends))
    annotated = _pod_object(app, annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "5432"})
    cluster.write("pods", [objects.namespace("shop", labels=MESH), annotated])
    cluster.start_agent()
    assert _one(cluster, app).get("via") == "sidecar"

    cluster.kill_agent()
    assert all(a.get("via") == "sidecar" for a in http_requests(app, CLUSTER_IP, 80, count=5)), \
        "the pinned maps keep serving without the agent"
    cluster.start_agent()
    assert any(e.get("event") == "pods_adopted" for e in cluster.log_events())
    assert _one(cluster, app).get("via") == "sidecar"

    # What the new agent adopted, it can undo: the pod leaves the mesh.
    syncs = cluster.state().syncs
    cluster.write("pods", [objects.namespace("shop"), annotated])
    cluster.wait_synced(after=syncs)
    assert "via" not in _one(cluster, app)
    assert cluster.state().mesh == {"pods": 1, "meshed": 0, "waiting": []}
    assert "Pods:        1 on this node, 0 in the mesh" in cluster.ctlb("status").stdout
    fill = {m["map"]: m["entries"] for m in json.loads(cluster.ctlb("status", "--json").stdout)["maps"]}
    assert fill["ctlb_mesh_ports"] == 0, "the adopted pod's rules went with its mesh mode"
    assert fill["ctlb_pods"] == 1


_OPEN_THEN_ASK = textwrap.dedent("""
    import json, socket, sys
    s = socket.create_connection(({host!r}, 80), timeout=5)
    print("connected", flush=True)
    sys.stdin.readline()  # the test flips the namespace meanwhile
    s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    print(data.split(b"\\r\\n\\r\\n", 1)[1].decode(), flush=True)
""")


def test_a_flip_changes_new_connections_only(cluster: Cluster) -> None:
    app = _meshed_app(cluster)

    held = app.popen([sys.executable, "-c", _OPEN_THEN_ASK.format(host=CLUSTER_IP)], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert held.stdout is not None and held.stdin is not None
    assert held.stdout.readline().strip() == "connected"
    syncs = cluster.state().syncs
    cluster.write("pods", [objects.namespace("shop"), _pod_object(app)])
    cluster.wait_synced(after=syncs)
    assert "via" not in _one(cluster, app), "a new connection is balanced by CTLB"
    out, _ = held.communicate("go\n", timeout=15)
    assert json.loads(out).get("via") == "sidecar", "the connection made before the flip stays with the sidecar"
