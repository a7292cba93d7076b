"""Connected UDP sockets pinned to a backend that no longer serves are ended, also when the
backend went away while no agent was running: the restarted agent finds it in the maps it adopts."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from ctlb.lab import servers
from tests.kernel import objects
from tests.kernel.clients import udp_exchange
from tests.kernel.conftest import Cluster

pytestmark = pytest.mark.kernel

DNS = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]
SLICE_DNS = [{"name": "dns", "port": 5353, "protocol": "UDP"}]

# A resolver that keeps one connected UDP socket: each line on stdin is one query; each answer is
# the echo's JSON or the errno the socket gave.
_RESOLVER = textwrap.dedent("""
    import json, socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect(({host!r}, 53))
    print("ready", flush=True)
    for _ in sys.stdin:
        try:
            s.send(b"q")
            print(json.dumps(json.loads(s.recv(65536))), flush=True)
        except OSError as e:
            print(json.dumps({{"errno": e.errno}}), flush=True)
""")


def _resolver(place, host: str) -> subprocess.Popen[str]:
    proc = place.popen([sys.executable, "-c", _RESOLVER.format(host=host)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _ask(proc: subprocess.Popen[str]) -> dict[str, Any]:
    proc.stdin.write("q\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def _dns_service(name: str, cluster_ip: str, backends: list) -> list[dict]:
    return [objects.service(name, cluster_ips=[cluster_ip], ports=DNS),
            objects.endpoint_slice(name, addresses=[str(p.ipv4) for p in backends], ports=SLICE_DNS)]


def test_a_backend_removed_while_the_agent_was_down_has_its_udp_sockets_ended_on_restart(cluster: Cluster) -> None:
    echo0, echo1 = (cluster.lab.add_pod(f"echo{i}") for i in range(2))
    for i, pod in enumerate((echo0, echo1)):
        servers.start_udp(pod, name=f"echo{i}", port=5353)
    client = cluster.lab.add_pod("client")
    cluster.write("dns", _dns_service("dns", "10.96.0.10", [echo0]))
    cluster.write("other", _dns_service("other", "10.96.0.11", [echo1]))
    cluster.start_agent()
    stale = _resolver(client, "10.96.0.10")
    alive = _resolver(client, "10.96.0.11")
    assert (_ask(stale).get("backend"), _ask(alive).get("backend")) == ("echo0", "echo1")

    assert cluster.kill_agent(signal.SIGTERM) == 0
    cluster.write("dns", _dns_service("dns", "10.96.0.10", [echo1]))  # echo0 goes while no agent runs
    cluster.start_agent()

    answer = _ask(stale)
    assert answer.get("errno") in (errno.EDESTADDRREQ, errno.ECONNABORTED), \
        f"the socket pinned to echo0 outlived the restart: {answer}"
    assert _ask(alive).get("backend") == "echo1", "a socket on a backend that still serves is left alone"
    assert udp_exchange(client, "10.96.0.10", 53, connected=True).get("backend") == "echo1"
