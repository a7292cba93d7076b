"""Program N Services x B backends from manifest files: from empty to programmed, end to end, and
one endpoint change at that scale. Run as root:

    .venv/bin/python bench/program_scale.py --services 10000 --backends 4 --rounds 5

- From empty to programmed: the real agent (`ctlb.agent.Agent` with its manifest source, in this
  process, on an empty cgroup of its own) from the moment it starts reading the files to the end
  of its first sync: every file decoded, every object converted and planned, the maps written,
  the state file written. Once with YAML files (`kubectl get -o yaml` shape, 1000 Services a
  file) and once with JSON files (`kubectl get -o json`: one List a file), each `--rounds` times
  on a fresh datapath; median and range, with the CPU this process used (YAML is decoded by
  worker processes, whose CPU is not in that figure).
- Stages, timed apart on one more datapath: reading, planning and the map writes (reconcile),
  then one endpoint of one Service changed, and a pass with nothing to do. The programs are
  attached to a fresh empty cgroup, so no real traffic is touched.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import pathlib
import resource
import statistics
import sys
import tempfile
import time
from typing import Any

import structlog
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import startup  # noqa: E402
from ctlb import agent, datapath, planner  # noqa: E402
from ctlb.datapath import cgroup as cg  # noqa: E402
from ctlb.datapath import programs  # noqa: E402
from ctlb.sources import manifests, store  # noqa: E402

SERVICES_A_FILE = 1000


def objects(n: int, b: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        ip = str(ipaddress.IPv4Address("10.96.0.0") + 1 + i)
        name = f"svc-{i}"
        out.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "bench"},
                    "spec": {"clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"], "type": "ClusterIP",
                             "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}})
        base = ipaddress.IPv4Address("10.128.0.0") + i * b
        out.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": f"{name}-x", "namespace": "bench",
                                 "labels": {"kubernetes.io/service-name": name}},
                    "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": [{"addresses": [str(base + k)], "conditions": {"ready": True}} for k in range(b)]})
    return out


def write_manifests(folder: pathlib.Path, docs: list[dict[str, Any]], *, fmt: str) -> pathlib.Path:
    """The first Service (whose endpoint the change test moves) in a file of its own, the rest in
    files of 1000 Services: the manifest source re-reads only files that changed. Returns the
    first Service's file."""
    folder.mkdir(parents=True)
    per_file = 2 * SERVICES_A_FILE
    for start in range(2, len(docs), per_file):
        _write(folder / f"bulk-{start:06d}.{fmt}", docs[start:start + per_file], fmt=fmt)
    target = folder / f"target.{fmt}"
    _write(target, docs[:2], fmt=fmt)
    return target


def _write(path: pathlib.Path, docs: list[dict[str, Any]], *, fmt: str) -> None:
    if fmt == "json":
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}, indent=4))
    else:
        path.write_text(yaml.dump_all(docs, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False))


def from_empty(folder: pathlib.Path, *, rounds: int, fmt: str) -> dict[str, Any]:
    """The agent from an empty node to programmed, through its manifest source, `rounds` times."""
    def manifest_source(objects: store.ObjectStore) -> agent.ManifestSource:
        return agent.ManifestSource((folder,), objects=objects, interval=0.2)

    summary = startup.rounds(manifest_source, node_name="", tag=fmt, count=rounds,
                             on_round=lambda i, r: print(f"  {fmt} round {i + 1}: {r.start_to_programmed_s:.3f} s "
                                                         f"(read {r.start_to_sync_s:.3f} s, agent CPU {r.cpu_s:.3f} s)",
                                                         file=sys.stderr, flush=True))
    print(f"{fmt}: {summary.line()}", file=sys.stderr, flush=True)
    return {"median_s": summary.median(), "min_s": summary.low(), "max_s": summary.high(),
            "rounds": [round(r.start_to_programmed_s, 4) for r in summary.rounds],
            "read_s_median": statistics.median(r.start_to_sync_s for r in summary.rounds),
            "agent_cpu_s_median": statistics.median(r.cpu_s for r in summary.rounds),
            "first_sync_s_median": statistics.median(r.first_sync_s for r in summary.rounds),
            "first_sync_timings_ms_median": {key: summary.median_timing(key)
                                             for key in ("read_ms", "semantics_ms", "program_ms")}}


def stages(folder: pathlib.Path, target: pathlib.Path, docs: list[dict[str, Any]], *, fmt: str) -> dict[str, Any]:
    """Reading, planning and the map writes timed apart; then one endpoint change; then no change."""
    result: dict[str, Any] = {}
    # The collector as the agent has it until its first sync: off, while the heap only grows.
    thresholds = gc.get_threshold()
    gc.set_threshold(100_000, 50, 1000)
    gc.disable()
    root = cg.cgroup2_mount() / f"ctlb-bench-{os.getpid()}"
    bpffs = pathlib.Path(f"/sys/fs/bpf/ctlb-bench-{os.getpid()}")
    root.mkdir()
    try:
        reader = manifests.ManifestReader([folder])
        held = store.ObjectStore()
        plan = planner.Planner("")
        t0 = time.perf_counter()
        dp = datapath.Datapath.install(bpffs=bpffs, cgroup=root, sizes=programs.MapSizes())
        result["load_attach_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        reader.refresh(held)
        result["read_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan.update(held, held.take())
        state = plan.state()
        result["semantics_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = dp.apply(state)
        result["program_from_empty_s"] = time.perf_counter() - t0
        result["map_writes"] = out.writes
        # One endpoint of one Service changes.
        docs[1]["endpoints"][0]["addresses"] = ["10.255.255.254"]
        _write(target, docs[:2], fmt=fmt)
        t0 = time.perf_counter()
        reader.refresh(held)
        t1 = time.perf_counter()
        changed = plan.update(held, held.take())
        state = plan.state()
        t2 = time.perf_counter()
        out = dp.apply(state, hint=changed)
        t3 = time.perf_counter()
        result["one_endpoint_change_read_s"] = t1 - t0
        result["one_endpoint_change_semantics_s"] = t2 - t1
        result["one_endpoint_change_program_s"] = t3 - t2
        result["one_endpoint_change_writes"] = out.writes + out.deletes
        t0 = time.perf_counter()
        out = dp.apply(state, hint=())
        result["no_change_pass_s"] = time.perf_counter() - t0
        dp.close()
    finally:
        gc.set_threshold(*thresholds)
        gc.enable()
        programs.uninstall(bpffs)
        root.rmdir()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--backends", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="end-to-end rounds through the agent, per format")
    ap.add_argument("--formats", nargs="+", choices=("yaml", "json"), default=["yaml", "json"])
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings only
    result: dict[str, Any] = {"services": args.services, "backends_per_service": args.backends,
                              "services_a_file": SERVICES_A_FILE, "from_empty": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            docs = objects(args.services, args.backends)
            folder = pathlib.Path(tmp) / fmt
            target = write_manifests(folder, docs, fmt=fmt)
            result["from_empty"][fmt] = from_empty(folder, rounds=args.rounds, fmt=fmt)
            result.setdefault("stages", {})[fmt] = stages(folder, target, docs, fmt=fmt)
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(_rounded(result), indent=1))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


if __name__ == "__main__":
    main()
