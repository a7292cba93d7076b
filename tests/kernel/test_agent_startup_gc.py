"""The agent keeps the cyclic garbage collector off while it starts (the heap only grows, with no
cycles to find), and gives it back as it found it: after the first sync, after a start-up that
took too long, and when stopped before its first sync. What it works out ahead of the first sync
(the plan, the state file's account of it) is what the first sync would have worked out."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ctlb import agent, datapath, model
from ctlb.datapath import reconcile
from ctlb.datapath import cgroup as cg
from ctlb.datapath import programs
from ctlb.sources import manifests, store

pytestmark = pytest.mark.kernel

SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
           "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ipFamilies": ["IPv4"],
                    "type": "ClusterIP", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


class NeverSynced:
    """A source whose first list never completes (an API server that does not answer)."""

    def describe(self) -> str:
        return "never-synced"

    def refresh(self) -> None:
        pass

    def synced(self) -> bool:
        return False

    def wait(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.05))

    def status(self) -> dict[str, object]:
        return {"synced": False}

    def close(self) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[int, int, int]]:
    """The collector's settings before the test, put back after it whatever the agent did."""
    before = gc.get_threshold()
    enabled = gc.isenabled()
    gc.set_threshold(700, 10, 10)
    try:
        yield gc.get_threshold()
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        (gc.enable if enabled else gc.disable)()


@pytest.fixture
def run_agent(require_root: None, require_bcc: None) -> Iterator[Callable[..., tuple[agent.Agent, threading.Event]]]:
    """Starts agents in threads on fresh datapaths (an empty cgroup and pin folder of their own)."""
    started: list[tuple[threading.Thread, threading.Event, agent.Source, datapath.Datapath, pathlib.Path,
                        pathlib.Path, tempfile.TemporaryDirectory]] = []

    def run(make_source: Callable[[store.ObjectStore, pathlib.Path], agent.Source]
            ) -> tuple[agent.Agent, threading.Event]:
        tag = f"ctlb-test-gc-{os.getpid()}-{len(started)}"
        root, bpffs = cg.cgroup2_mount() / tag, pathlib.Path("/sys/fs/bpf") / tag
        root.mkdir()
        run_dir = tempfile.TemporaryDirectory(prefix=f"{tag}-")
        dp = datapath.Datapath.install(bpffs=bpffs, cgroup=root, sizes=programs.MapSizes(frontends=64, backends=64))
        objects = store.ObjectStore()
        source = make_source(objects, pathlib.Path(run_dir.name))
        config = agent.AgentConfig(manifests=(), node_name="", cgroup=root, bpffs=bpffs,
                                   run_dir=pathlib.Path(run_dir.name), interval=0.05)
        the_agent = agent.Agent(config, source=source, objects=objects, dp=dp)
        stop = threading.Event()
        thread = threading.Thread(target=the_agent.run, args=(stop,), daemon=True)
        started.append((thread, stop, source, dp, root, bpffs, run_dir))
        thread.start()
        return the_agent, stop

    try:
        yield run
    finally:
        for thread, stop, source, dp, root, bpffs, run_dir in started:
            stop.set()
            thread.join(timeout=10)
            source.close()
            dp.close()
            programs.uninstall(bpffs)
            root.rmdir()
            run_dir.cleanup()


def _manifests(objects: store.ObjectStore, run_dir: pathlib.Path) -> agent.Source:
    folder = run_dir / "manifests"
    folder.mkdir()
    (folder / "web.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [SERVICE]}))
    return agent.ManifestSource((folder,), objects=objects, interval=0.05)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_the_collector_is_back_as_it_was_after_the_first_sync(run_agent, collector) -> None:
    the_agent, _ = run_agent(_manifests)
    _wait_for(lambda: the_agent.state.syncs > 0, "the first sync")
    assert gc.isenabled() and gc.get_threshold() == collector
    assert gc.get_freeze_count() > 0, "what start-up built is out of the collector's reach"


def test_a_start_up_that_takes_too_long_collects_again(run_agent, collector, monkeypatch) -> None:
    monkeypatch.setattr(agent, "STARTUP_WITHOUT_GC_S", 0.2)
    the_agent, stop = run_agent(lambda objects, run_dir: NeverSynced())
    _wait_for(lambda: gc.isenabled(), "the collector on again")
    assert the_agent.state.syncs == 0
    stop.set()
    _wait_for(lambda: gc.get_threshold() == collector, "the thresholds back")


def test_an_agent_stopped_before_its_first_sync_gives_the_collector_back(run_agent, collector) -> None:
    the_agent, stop = run_agent(lambda objects, run_dir: NeverSynced())
    _wait_for(lambda: not gc.isenabled(), "the start-up without collector")
    stop.set()
    _wait_for(lambda: gc.isenabled() and gc.get_threshold() == collector, "the collector back")
    assert the_agent.state.syncs == 0


class Gated:
    """A source whose first list completes when the test says so; the test fills the store."""

    def __init__(self) -> None:
        self.listed = threading.Event()

    def describe(self) -> str:
        return "gated"

    def refresh(self) -> None:
        pass

    def synced(self) -> bool:
        return self.listed.is_set()

    def wait(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.02))

    def status(self) -> dict[str, object]:
        return {"synced": self.listed.is_set()}

    def close(self) -> None:
        pass


def _service_and_slice(name: str, cluster_ip: str, endpoints: list[str]) -> list[dict]:
    service = json.loads(json.dumps(SERVICE))
    service["metadata"]["name"] = name
    service["spec"]["clusterIP"] = cluster_ip
    service["spec"]["clusterIPs"] = [cluster_ip]
    slice_ = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
              "metadata": {"name": f"{name}-x", "namespace": "default", "labels": {"kubernetes.io/service-name": name}},
              "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
              "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in endpoints]}
    return [service, slice_]


def _put(objects: store.ObjectStore, folder: pathlib.Path, docs: list[dict]) -> None:
    """Puts the objects `docs` describe in the store, decoded as the manifest source decodes them."""
    path = folder / f"batch-{len(list(folder.iterdir()))}.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    snapshot = manifests.load([path])
    with objects.locked():
        for obj in (*snapshot.services, *snapshot.endpoint_slices):
            objects.put(obj)
        objects.notify()


def test_the_state_planned_ahead_of_the_first_sync_is_accounted_as_if_planned_in_it(run_agent, collector) -> None:
    """The digest and frontend kinds worked out while the source lists (for service ports planned
    ahead) are those of the plan the first sync programs: `ctlb status`'s comparison holds."""
    gated = Gated()
    held: dict[str, store.ObjectStore] = {}

    def make(objects: store.ObjectStore, run_dir: pathlib.Path) -> agent.Source:
        held["objects"] = objects
        return gated  # type: ignore[return-value]

    the_agent, _ = run_agent(make)
    objects = held["objects"]
    with tempfile.TemporaryDirectory() as folder:
        with objects.locked():
            objects.put(model.Node(name="", addresses=()))
            objects.notify()
        _put(objects, pathlib.Path(folder), _service_and_slice("a", "10.96.0.11", ["10.244.0.2"])
             + _service_and_slice("b", "10.96.0.12", ["10.244.0.3"]))
        _wait_for(lambda: len(the_agent._viewed) == 2, "the two service ports planned ahead")
        _put(objects, pathlib.Path(folder), _service_and_slice("b", "10.96.0.12", ["10.244.0.3", "10.244.0.4"])
             + _service_and_slice("c", "10.96.0.13", ["10.244.0.5"]))
        gated.listed.set()
        _wait_for(lambda: the_agent.state.syncs > 0, "the first sync")
    plan = the_agent.planner.state()
    assert len(plan.service_ports) == 3
    want = reconcile.combine(sum(reconcile.service_port_digest(sp) for sp in plan.service_ports.values()))
    assert the_agent.state.desired_digest == want
    assert reconcile.programmed_digest(the_agent.datapath.reconciler.programmed) == want
    assert the_agent.state.frontend_kinds == {"10.96.0.11:80/TCP": "ClusterIP", "10.96.0.12:80/TCP": "ClusterIP",
                                              "10.96.0.13:80/TCP": "ClusterIP"}
