"""The Kubernetes API as the agent's source, against a fake API server driven through the real
`kubernetes` client: what is programmed follows the watch, and an unreachable server never
withdraws what is served."""

from __future__ import annotations

import collections
import json
import pathlib
import time
from collections.abc import Iterator

import pytest

from ctlb.lab import servers
from tests.apiserver import FakeApiServer
from tests.kernel import objects
from tests.kernel.clients import http_requests
from tests.kernel.conftest import Cluster

pytestmark = pytest.mark.kernel

CLUSTER_IP = "10.96.0.10"
HTTP = [{"name": "http", "port": 80, "targetPort": 8080}]
SLICE_HTTP = [{"name": "http", "port": 8080}]


@pytest.fixture
def api(tmp_path: pathlib.Path) -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


def _backends(client, count: int = 30) -> collections.Counter:
    return collections.Counter(a.get("backend", f"errno {a.get('errno')}")
                               for a in http_requests(client, CLUSTER_IP, 80, count=count))


def _wait_for(condition, *, timeout: float = 15.0, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _status(cluster: Cluster) -> dict:
    out = cluster.ctlb("status", "--json", check=False)
    return json.loads(out.stdout)


def test_api_outage_keeps_serving_then_converges_on_what_changed_meanwhile(
        cluster: Cluster, api: FakeApiServer, tmp_path: pathlib.Path) -> None:
    pods = []
    for i in range(2):
        pod = cluster.lab.add_pod(f"web{i}")
        servers.start_http(pod, name=f"web{i}", port=8080)
        pods.append(pod)
    client = cluster.lab.add_pod("client")
    api.create(objects.service("web", cluster_ips=[CLUSTER_IP], ports=HTTP))
    api.create(objects.endpoint_slice("web", addresses=[str(p.ipv4) for p in pods], ports=SLICE_HTTP))
    cluster.start_agent(kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig"))
    assert set(_backends(client)) == {"web0", "web1"}

    api.stop()
    _wait_for(lambda: bool(_status(cluster)["agent"].get("source_status", {}).get("stale_since")),
              what="status to call the source stale")
    status = _status(cluster)
    assert any("stale since" in reason for reason in status["reasons"]), status["reasons"]
    assert set(_backends(client)) == {"web0", "web1"}, "an unreachable API server must not withdraw anything"

    # Meanwhile web0 leaves the Service; the agent learns it when the server is back.
    api.update(objects.endpoint_slice("web", addresses=[str(pods[1].ipv4)], ports=SLICE_HTTP))
    synced = cluster.state().syncs
    api.start()
    cluster.wait_synced(after=synced, timeout=60)
    _wait_for(lambda: _backends(client, 10) == {"web1": 10}, what="web0 to leave the datapath")
    _wait_for(lambda: _status(cluster)["in_sync"], what="status to be in sync again")


def test_agent_started_while_the_api_is_down_programs_nothing_until_it_has_listed(
        cluster: Cluster, api: FakeApiServer, tmp_path: pathlib.Path) -> None:
    pod = cluster.lab.add_pod("web0")
    servers.start_http(pod, name="web0", port=8080)
    client = cluster.lab.add_pod("client")
    api.create(objects.service("web", cluster_ips=[CLUSTER_IP], ports=HTTP))
    api.create(objects.endpoint_slice("web", addresses=[str(pod.ipv4)], ports=SLICE_HTTP))
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    api.stop()

    cluster.start_agent(kubeconfig=kubeconfig, wait=False)
    _wait_for(lambda: cluster.run_dir.joinpath("state.json").exists(), what="the agent's state file")
    assert cluster.state().syncs == 0
    assert not _status(cluster)["in_sync"]

    api.start()
    cluster.wait_synced(timeout=60)
    assert _backends(client, 10) == {"web0": 10}
