"""Time to program N Services x B backends from empty into the real pinned maps, and to apply one
endpoint change at that scale. Run as root: `.venv/bin/python bench/program_scale.py --services 10000 --backends 10`.

Stages are timed apart: manifest parsing, semantics, and the map writes (reconcile), so a slow
stage is visible. The programs are attached to a fresh empty cgroup, so no real traffic is touched.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import pathlib
import resource
import tempfile
import time

import yaml

from ctlb import datapath, planner
from ctlb.datapath import cgroup as cg, programs
from ctlb.sources import manifests, store


def objects(n: int, b: int) -> list[dict]:
    out = []
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--backends", type=int, default=10)
    args = ap.parse_args()
    root = cg.cgroup2_mount() / f"ctlb-bench-{os.getpid()}"
    bpffs = pathlib.Path(f"/sys/fs/bpf/ctlb-bench-{os.getpid()}")
    root.mkdir()
    result: dict[str, float | int] = {"services": args.services, "backends_per_service": args.backends}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = pathlib.Path(tmp)
            docs = objects(args.services, args.backends)
            # The changing EndpointSlice lives in a file of its own, the rest in files of 1000
            # Services: the manifest source re-reads only files that changed.
            target = folder / "target.yaml"
            target.write_text(yaml.safe_dump_all(docs[:2], sort_keys=False))
            for start in range(2, len(docs), 2000):
                (folder / f"bulk-{start:06d}.yaml").write_text(yaml.safe_dump_all(docs[start:start + 2000], sort_keys=False))
            reader = manifests.ManifestReader([folder])
            held = store.ObjectStore()
            plan = planner.Planner("")
            t0 = time.perf_counter()
            dp = datapath.Datapath.install(bpffs=bpffs, cgroup=root, sizes=programs.MapSizes())
            result["load_attach_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            reader.refresh(held)
            result["parse_s"] = time.perf_counter() - t0
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
            target.write_text(yaml.safe_dump_all(docs[:2], sort_keys=False))
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
            result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        programs.uninstall(bpffs)
        root.rmdir()
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
