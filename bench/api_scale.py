"""The API source at cluster scale: from empty to programmed end to end, memory, change latency.

A fake API server (tests/apiserver.py, in a child process so its objects do not count against
the agent's memory) holds N Services and N EndpointSlices of 4 endpoints each, shaped as the real
server serves them (managedFields included).

- From empty to programmed (as root): the real agent (`ctlb.agent.Agent` with its API source,
  in this process, on an empty cgroup of its own) from the moment its source starts listing to
  the end of its first sync: every object listed, planned and written into the maps, the state
  file written. Repeated `--rounds` times, each on a fresh datapath; median and range, with the
  CPU the agent's threads used. The fake server shares the machine's cores with the agent.
- The source alone: `KubeApiSource` lists into an `ObjectStore`: time, RSS before and after
  (/proc/self/status), the latency of one EndpointSlice change at that scale, and the time of a
  full relist forced by 410 Gone.

Run: `sudo .venv/bin/python bench/api_scale.py [--objects 10000] [--rounds 5]`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import kubernetes  # noqa: E402
import structlog  # noqa: E402

from bench import startup  # noqa: E402
from ctlb import agent, model  # noqa: E402
from ctlb.sources import kubeapi  # noqa: E402
from ctlb.sources.store import ObjectStore  # noqa: E402
from tests import apiserver  # noqa: E402

NODE = "node-1"
ENDPOINTS = 4


def _objects(n: int) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = [apiserver.node(NODE)]
    for i in range(n):
        namespace = f"team-{i % 50}"
        name = f"svc-{i}"
        cluster_ip = str(ipaddress.IPv4Address("10.96.0.0") + 1 + i)
        base = ipaddress.IPv4Address("10.128.0.0") + i * ENDPOINTS
        objects.append(apiserver.service(namespace, name, cluster_ip=cluster_ip))
        objects.append(apiserver.endpoint_slice(namespace, f"{name}-x{i % 997:03d}", service_name=name,
                                                addresses=[str(base + k) for k in range(ENDPOINTS)]))
    objects.extend(apiserver.namespace(f"team-{k}") for k in range(50))
    return objects


def _serve(n: int, conn: multiprocessing.connection.Connection) -> None:
    """The child: serves the objects and obeys the parent's commands until told to stop."""
    with apiserver.FakeApiServer() as server:
        server.create_many(_objects(n))
        conn.send(server.port)
        while True:
            command, arg = conn.recv()
            if command == "stop":
                return
            if command == "change_slice":
                i, address = arg
                slice_ = apiserver.endpoint_slice(f"team-{i % 50}", f"svc-{i}-x{i % 997:03d}", service_name=f"svc-{i}",
                                                  addresses=[address, *[f"10.200.0.{k}" for k in range(1, ENDPOINTS)]])
                server.update(slice_)
                conn.send(None)
            elif command == "expire":
                server.advance()  # writes elsewhere: the watchers' resourceVersion falls behind
                server.compact()
                server.drop_watches()
                conn.send(None)
            elif command == "requests":
                conn.send((server.count(arg, "list"), server.count(arg, "watch")))


def _requests(conn: multiprocessing.connection.Connection) -> tuple[int, int]:
    """(list, watch) requests the server has had for EndpointSlices."""
    conn.send(("requests", "endpointslices"))
    return conn.recv()


def _rss_kib() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _hwm_kib() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _wait(condition: Any, *, timeout: float, what: str) -> float:
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.0005)
    return time.perf_counter() - started


def _first_address(store: ObjectStore, key: tuple[str, str, str]) -> str | None:
    obj = store.get(key)
    if not isinstance(obj, model.EndpointSlice) or not obj.endpoints:
        return None
    return str(obj.endpoints[0].addresses[0])


def _from_empty(port: int, *, rounds: int) -> list[tuple[str, str]]:
    """The agent from an empty node to programmed, through its API source, `rounds` times."""
    if os.geteuid() != 0:
        return [("from empty to programmed, end to end", "skipped: needs root")]
    # The client's API classes load on first use; an agent has them before it lists.
    kubernetes.client.CoreV1Api, kubernetes.client.DiscoveryV1Api  # noqa: B018
    with tempfile.TemporaryDirectory(prefix="ctlb-api-scale-") as tmp:
        kubeconfig = _kubeconfig(pathlib.Path(tmp) / "kubeconfig", port)

        def api_source(objects: ObjectStore) -> agent.ApiSource:
            return agent.ApiSource(objects, kubeconfig=kubeconfig, node_name=NODE)

        summary = startup.rounds(api_source, node_name=NODE, tag="api", count=rounds,
                                 on_round=lambda i, r: print(f"  round {i + 1}: {r.start_to_programmed_s:.3f} s "
                                                             f"(list {r.start_to_sync_s:.3f} s, agent CPU {r.cpu_s:.3f} s)",
                                                             flush=True))
    return [("from empty to programmed, end to end (list start -> first sync done)", summary.line()),
            ("datapath install before it (compile, load, attach; not counted)",
             f"{statistics.median(r.install_s for r in summary.rounds):.2f} s")]


def _kubeconfig(path: pathlib.Path, port: int) -> pathlib.Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "fake", "user": {"token": "fake-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=10_000, help="Services, and as many EndpointSlices")
    parser.add_argument("--page-size", type=int, default=kubeapi.DEFAULT_PAGE_SIZE)
    parser.add_argument("--changes", type=int, default=20, help="single-slice changes timed")
    parser.add_argument("--rounds", type=int, default=5, help="end-to-end rounds through the agent")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings only

    n = args.objects
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_serve, args=(n, child), daemon=True)
    process.start()
    port = parent.recv()
    rows: list[tuple[str, str]] = [("objects", f"{n} Services + {n} EndpointSlices ({ENDPOINTS} endpoints each)"),
                                   ("page size", f"{args.page_size} (source alone), "
                                                 f"{kubeapi.DEFAULT_PAGE_SIZE} (agent)")]
    try:
        # The source alone first, in a process that has held nothing yet, so RSS means something.
        rss_before = _rss_kib()
        store = ObjectStore()
        config = kubernetes.client.Configuration(host=f"http://127.0.0.1:{port}")
        config.retries = False
        source = kubeapi.KubeApiSource(store, client=kubernetes.client.ApiClient(configuration=config),
                                       node_name=NODE, page_size=args.page_size)
        started = time.perf_counter()
        source.start()
        _wait(lambda: source.synced() and store.count("Service") == n and store.count("EndpointSlice") == n,
              timeout=600, what="the first sync")
        sync_s = time.perf_counter() - started
        rss_after = _rss_kib()
        rows += [("source alone: list into the store", f"{sync_s:.2f} s"),
                 ("RSS before", f"{rss_before / 1024:.1f} MiB"),
                 ("RSS after sync", f"{rss_after / 1024:.1f} MiB"),
                 ("RSS growth per object", f"{(rss_after - rss_before) / (2 * n):.2f} KiB"),
                 ("peak RSS (VmHWM)", f"{_hwm_kib() / 1024:.1f} MiB")]

        latencies = []
        for c in range(args.changes):
            i = (c * 7919) % n
            address = f"10.250.{c // 250}.{c % 250 + 1}"
            key = ("EndpointSlice", f"team-{i % 50}", f"svc-{i}-x{i % 997:03d}")
            t0 = time.perf_counter()
            parent.send(("change_slice", (i, address)))
            parent.recv()
            _wait(lambda: _first_address(store, key) == address, timeout=30, what="a slice change")
            latencies.append(time.perf_counter() - t0)
        rows.append(("one slice change, server write to store (median / max)",
                     f"{statistics.median(latencies) * 1000:.1f} / {max(latencies) * 1000:.1f} ms"))

        lists_before, watches_before = _requests(parent)
        t0 = time.perf_counter()
        parent.send(("expire", None))
        parent.recv()
        pages = (n + args.page_size - 1) // args.page_size

        def relisted() -> bool:
            # Done when the watch after the relist is open: the dropped watch's resume (answered 410)
            # and the new one make two watch requests.
            lists, watches = _requests(parent)
            return lists >= lists_before + pages and watches >= watches_before + 2

        _wait(relisted, timeout=600, what="the relist")
        rows.append(("relist after 410 Gone (all five at once, until the slice watch reopens)",
                     f"{time.perf_counter() - t0:.2f} s"))
        assert store.count("EndpointSlice") == n and store.count("Service") == n
        source.close()
        source.check()
        del store
        rows += _from_empty(port, rounds=args.rounds)
    finally:
        parent.send(("stop", None))
        process.join(timeout=10)

    width = max(len(name) for name, _ in rows)
    print(f"{'MEASURE':<{width}}  VALUE")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
