"""`ctlb socket-trace` against the real agent: a pod's connections to Services are reported with
the pod, the process, the Service, the backend that answered and why; filters keep the rest out;
one trace runs at a time, and one that is killed is turned off by the agent."""

from __future__ import annotations

import errno
import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from ctlb import lab as ctlb_lab
from ctlb.lab import servers
from tests.kernel import objects, sidecar
from tests.kernel.clients import http_requests, tcp_probe, udp_exchange
from tests.kernel.conftest import NODE_NAME, Cluster, ctlb_command

pytestmark = pytest.mark.kernel

CLUSTER_IP = {4: "10.96.0.10", 6: "fd00:10:96::10"}
EMPTY_IP = {4: "10.96.0.20", 6: "fd00:10:96::20"}
OTHER_IP = "10.96.0.30"
PORTS = [{"name": "http", "port": 80, "targetPort": 8080},
         {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]
SLICE_PORTS = [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]


class Tracer:
    """A running `ctlb socket-trace --json`; its decisions arrive in a queue as they are printed."""

    def __init__(self, cluster: Cluster, *args: str) -> None:
        argv = ctlb_command("socket-trace", "--json", "--bpffs", str(cluster.bpffs),
                            "--run-dir", str(cluster.run_dir), *args)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.decisions: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stderr: list[str] = []
        started = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(started,), daemon=True).start()
        if not started.wait(30):
            self.stop()
            raise AssertionError(f"socket-trace did not start: {self.stderr}")

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.decisions.put(json.loads(line))

    def _read_stderr(self, started: threading.Event) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            if line.startswith("tracing"):
                started.set()
        started.set()  # exited before tracing: the caller reads why from stderr

    def next(self, matches: Callable[[dict[str, Any]], bool] = lambda d: True, *,
             timeout: float = 10.0) -> dict[str, Any]:
        """The next decision that `matches`, skipping the others."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                decision = self.decisions.get(timeout=left)
            except queue.Empty:
                break
            if matches(decision):
                return decision
        raise AssertionError(f"no matching decision within {timeout}s; stderr: {self.stderr}")

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=15)


def _trace_ctl(cluster: Cluster) -> dict[str, int]:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(cluster.bpffs / "ctlb_trace_ctl")],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]["formatted"]["value"]


def _address(place: ctlb_lab.Place, family: int) -> str:
    return str(place.ipv6 if family == 6 else place.ipv4)


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _write_scene(cluster: Cluster, family: int, backends: list[ctlb_lab.Pod], clients: list[ctlb_lab.Pod]) -> None:
    lab = cluster.lab
    fam = f"IPv{family}"
    cluster.write("scene", [
        objects.node(NODE_NAME, addresses=[str(lab.node.ipv4), str(lab.node.ipv6)]),
        objects.service("web", cluster_ips=[CLUSTER_IP[family]], ports=PORTS),
        objects.slice_of("web", [objects.endpoint(_address(b, family)) for b in backends], ports=SLICE_PORTS, family=fam),
        objects.service("empty", cluster_ips=[EMPTY_IP[family]], ports=PORTS[:1]),
        *(objects.pod(p.name, uid=p.uid, ips=[str(a) for a in p.addresses]) for p in clients),
    ])


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_a_pods_connections_are_reported_with_the_service_and_the_backend_that_answered(
        cluster: Cluster, family: int) -> None:
    six = family == 6
    backends = [cluster.lab.add_pod(f"web{i}", ipv4=not six, ipv6=six) for i in range(2)]
    for b in backends:
        servers.start_http(b, name=b.name, port=8080)
        servers.start_udp(b, name=b.name, port=5353)
    client = cluster.lab.add_pod("client", ipv4=not six, ipv6=six)
    _write_scene(cluster, family, backends, [client])
    cluster.start_agent()
    cluster.wait_pods(1)
    address_of = {b.name: _address(b, family) for b in backends}
    tracer = Tracer(cluster)
    try:
        answered = http_requests(client, CLUSTER_IP[family], 80)[0]["backend"]
        connect = tracer.next(lambda d: d["hook"] == f"connect{family}")
        assert connect["verdict"] == "balanced" and connect["errno"] is None
        assert connect["pod"] == "default/client"
        assert connect["comm"].startswith("python")
        assert connect["protocol"] == "TCP"
        assert connect["service"] == f"default/web:http/TCP/IPv{family}"
        assert connect["from"] == _endpoint(CLUSTER_IP[family], 80)
        assert connect["to"] == _endpoint(address_of[answered], 8080), "the trace names the backend that answered"
        peer = tracer.next(lambda d: d["hook"] == f"getpeer{family}" and d["cookie"] == connect["cookie"])
        assert (peer["verdict"], peer["from"], peer["to"]) == (
            "reverse", connect["to"], connect["from"])
        assert peer["service"] == connect["service"], "found by the frontend's address"

        reply = udp_exchange(client, CLUSTER_IP[family], 53, connected=False)
        send = tracer.next(lambda d: d["hook"] == f"sendmsg{family}")
        assert (send["protocol"], send["service"]) == ("UDP", f"default/web:dns/UDP/IPv{family}")
        assert send["to"] == _endpoint(address_of[reply["backend"]], 5353)
        received = tracer.next(lambda d: d["hook"] == f"recvmsg{family}")
        assert (received["verdict"], received["to"]) == ("reverse", _endpoint(CLUSTER_IP[family], 53))

        refused = tcp_probe(client, EMPTY_IP[family], 80)
        assert refused.get("errno") == errno.ECONNREFUSED, refused
        decision = tracer.next(lambda d: d["from"] == _endpoint(EMPTY_IP[family], 80))
        assert (decision["verdict"], decision["errno"], decision["to"]) == ("refused", "ECONNREFUSED", None)
        assert decision["service"] == f"default/empty:http/TCP/IPv{family}"

        # A process of the node itself is no pod.
        tcp_probe(cluster.lab.node, EMPTY_IP[family], 80)
        from_node = tracer.next(lambda d: d["from"] == _endpoint(EMPTY_IP[family], 80))
        assert from_node["pod"] is None
    finally:
        assert tracer.stop() == 0, tracer.stderr
    assert _trace_ctl(cluster)["enabled"] == 0, "tracing is off once socket-trace exits"


def test_filters_keep_only_the_pod_and_the_service_asked_for(cluster: Cluster) -> None:
    backend = cluster.lab.add_pod("web0")
    servers.start_http(backend, name="web0", port=8080)
    ours, theirs = cluster.lab.add_pod("ours"), cluster.lab.add_pod("theirs")
    _write_scene(cluster, 4, [backend], [ours, theirs])
    cluster.start_agent()
    cluster.wait_pods(2)
    tracer = Tracer(cluster, "--pod", "ours", "--service", "default/web", "--namespace", "default", "--count", "1")
    try:
        tcp_probe(theirs, CLUSTER_IP[4], 80)  # another pod
        tcp_probe(ours, EMPTY_IP[4], 80)  # another Service
        tcp_probe(cluster.lab.node, CLUSTER_IP[4], 80)  # the node
        tcp_probe(ours, CLUSTER_IP[4], 80)
        first = tracer.next(timeout=10)
        assert (first["pod"], first["service"], first["hook"]) == ("default/ours", "default/web:http/TCP/IPv4", "connect4")
        assert tracer.proc.wait(timeout=10) == 0, "--count 1 ends the trace"
    finally:
        tracer.stop()
    assert tracer.decisions.empty()


def test_one_trace_at_a_time_and_the_agent_ends_one_that_was_killed(cluster: Cluster) -> None:
    _write_scene(cluster, 4, [], [])
    cluster.start_agent()
    first = Tracer(cluster)
    second = subprocess.run(ctlb_command("socket-trace", "--bpffs", str(cluster.bpffs), "--run-dir",
                                         str(cluster.run_dir)), capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert f"socket-trace pid {first.proc.pid} is already tracing" in second.stderr
    assert "Traceback" not in second.stderr

    first.stop(signal.SIGKILL)
    assert _trace_ctl(cluster)["enabled"] == 1, "a killed trace cannot turn itself off"
    deadline = time.monotonic() + 10
    while _trace_ctl(cluster)["enabled"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _trace_ctl(cluster) == {"enabled": 0, "owner_pid": 0, "lost": _trace_ctl(cluster)["lost"]}
    assert any(e.get("event") == "trace_abandoned" and e.get("pid") == first.proc.pid for e in cluster.log_events())
    again = Tracer(cluster)
    assert again.stop() == 0


def test_without_an_agent_installed_the_trace_says_so(cluster: Cluster) -> None:
    out = cluster.ctlb("socket-trace", check=False)
    assert out.returncode == 1
    assert "start `ctlb agent`" in out.stderr and "Traceback" not in out.stderr


def test_a_meshed_pods_connection_is_reported_going_to_its_sidecar_and_the_sidecars_balanced(
        cluster: Cluster) -> None:
    backend = cluster.lab.add_pod("web0")
    servers.start_http(backend, name="web0", port=8080)
    app = cluster.lab.add_pod("app", namespace="shop")
    sidecar.start(app)
    cluster.write("scene", [
        objects.service("web", cluster_ips=[CLUSTER_IP[4]], ports=PORTS[:1]),
        objects.slice_of("web", [objects.endpoint(str(backend.ipv4))], ports=SLICE_PORTS[:1]),
        objects.namespace("shop", labels={"ctlb.io/mesh": "enabled"}),
        objects.pod(app.name, uid=app.uid, ips=[str(a) for a in app.addresses], namespace="shop"),
    ])
    cluster.start_agent()
    cluster.wait_pods(1)
    tracer = Tracer(cluster, "--namespace", "shop")
    try:
        answer = http_requests(app, CLUSTER_IP[4], 80)[0]
        assert answer.get("via") == "sidecar", answer
        redirected = tracer.next(lambda d: d["verdict"] == "mesh")
        assert (redirected["pod"], redirected["from"], redirected["service"]) == (
            "shop/app", f"{CLUSTER_IP[4]}:80", "default/web:http/TCP/IPv4")
        assert redirected["to"].startswith("127.0.0.1:")
        onward = tracer.next(lambda d: d["hook"] == "connect4" and d["verdict"] == "balanced")
        assert (onward["pod"], onward["to"]) == ("shop/app", f"{backend.ipv4}:8080"), "the sidecar's own connect"
    finally:
        assert tracer.stop() == 0, tracer.stderr
