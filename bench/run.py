"""ctlb vs kube-proxy-style iptables and nftables vs a direct connection, side by side, one run.

    sudo .venv/bin/python -m bench.run            # N in {1, 1000, 10000}, 3 rounds
    sudo .venv/bin/python -m bench.run --quick    # N in {1, 1000}, 1 round, short samples (< 2 min)
    sudo .venv/bin/python -m bench.run --large    # adds N = 30000

Modes alternate within each round (their order rotates from round to round), so drift of the
machine hits them alike. Writes results.json (raw), results.md (ratios) and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

from bench import kubeproxy, loadgen, program_cost, report, topology
from bench.topology import Mode
from ctlb import lab as ctlb_lab
from ctlb.datapath import inspect, libbpf, maps

Sample = dict[str, Any]


def measure_data_path(node: topology.BenchNode, mode: Mode, n: int, *, seconds: float) -> Sample:
    """Metrics 1-4 for one mode: connection rate and latency (first and last Service),
    established request/response, UDP request/response, TCP throughput and CPU per GB."""
    client = node.client(mode)
    t = node.targets(mode, n)
    out: Sample = {}
    crr = loadgen.tcp_crr(client, host=t.first, port=t.port(topology.PORT_CRR), seconds=seconds,
                          cpu=topology.CLIENT_CPU)
    out["crr_first"] = crr
    if not t.direct and n > 1:
        out["crr_last"] = loadgen.tcp_crr(client, host=t.last, port=t.port(topology.PORT_CRR), seconds=seconds,
                                          cpu=topology.CLIENT_CPU)
    else:
        out["crr_last"] = crr
    out["rr"] = loadgen.tcp_rr(client, host=t.first, port=t.port(topology.PORT_RR), seconds=seconds,
                               cpu=topology.CLIENT_CPU)
    out["udp_rr"] = loadgen.udp_rr(client, host=t.first, port=t.port(topology.PORT_UDP), seconds=seconds,
                                   cpu=topology.CLIENT_CPU)
    out["iperf"] = iperf(client, host=t.iperf, port=t.port(topology.PORT_IPERF), seconds=seconds)
    return out


def iperf(client: ctlb_lab.Pod, *, host: str, port: int, seconds: float) -> Sample:
    cpu_before = topology.system_cpu_seconds()
    run = client.run(["taskset", "-c", str(topology.CLIENT_CPU), "iperf3", "-c", host, "-p", str(port),
                      "-t", str(max(1, round(seconds))), "-J"], timeout=seconds + 30)
    cpu = topology.system_cpu_seconds() - cpu_before
    data = json.loads(run.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3 to {host}:{port}: {data['error']}")
    received = data["end"]["sum_received"]
    gigabytes = received["bytes"] / 1e9
    return {"gbit_s": received["bits_per_second"] / 1e9, "bytes": received["bytes"],
            "cpu_s_per_gb": cpu / gigabytes if gigabytes else None}


def first_connection_after(node: topology.BenchNode, mode: Mode, n: int, change: Any) -> float:
    """Seconds from issuing an endpoint change to the first connection that reaches the new
    endpoint, seen by a client dialling the last Service in a loop."""
    client = node.client(mode)
    host = node.targets(mode, n).last
    probe = client.popen([sys.executable, "-c", _PROBE.format(host=host, port=topology.PORT_CRR)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert probe.stdout is not None
        if probe.stdout.readline().strip() != "probing":
            raise RuntimeError(f"probe failed: {probe.stderr.read() if probe.stderr else ''}")
        time.sleep(0.05)
        issued = time.monotonic()
        change()
        seen = float(probe.stdout.readline())
        return seen - issued
    finally:
        client.kill(probe)


_PROBE = textwrap.dedent("""
    import socket, sys, time
    print("probing", flush=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = socket.socket()
        s.settimeout(1)
        try:
            s.connect(({host!r}, {port}))
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            if b'"new"' in s.recv(4096):
                print(time.monotonic(), flush=True)
                break
        except OSError:
            pass
        finally:
            s.close()
""")


def change_latency(node: topology.BenchNode, mode: Mode, n: int) -> Sample:
    """Metric 5b: one endpoint change, then back."""
    netns = node.lab.node.netns
    before, after = node.last_service(moved=False), node.last_service(moved=True)
    if mode is Mode.CTLB:
        st = node.wait_synced(after=0)
        latency = first_connection_after(node, mode, n, lambda: node.write_last_service(moved=True))
        synced = node.wait_synced(after=st.syncs)
        node.write_last_service(moved=False)
        node.wait_synced(after=synced.syncs)
        return {"first_connection_s": latency, "agent_timings_ms": synced.last_sync_timings}
    partial, apply = ((kubeproxy.iptables_partial, kubeproxy.apply_iptables_partial) if mode is Mode.IPTABLES
                      else (kubeproxy.nft_partial, kubeproxy.apply_nft_partial))
    timing: list[kubeproxy.Timing] = []

    def move(pairs: list[tuple[kubeproxy.BenchService, kubeproxy.BenchService]],
             start: list[kubeproxy.BenchService]) -> None:
        current = list(start)
        for old, new in pairs:
            # kube-proxy's iptables partial sync rewrites KUBE-SERVICES and the filter table too,
            # so it is handed the whole Service set as it stands after this change.
            extra = {}
            if mode is Mode.IPTABLES:
                current = [new if s == old else s for s in current]
                extra = {"services": current}
            timing.append(apply(netns, partial(old, new, **extra)))

    moved = [dict(zip(before, after)).get(s, s) for s in node.services]
    latency = first_connection_after(node, mode, n, lambda: move(list(zip(before, after)), node.services))
    forward = timing[:]
    move(list(zip(after, before)), moved)
    timing[:] = forward
    return {"first_connection_s": latency, "restore_wall_s": sum(t.wall_s for t in timing),
            "restore_cpu_s": sum(t.cpu_s for t in timing)}


def bpf_program_cost(node: topology.BenchNode, n: int, *, seconds: float) -> Sample:
    """Metric 6: ns per call of each socket program, from the kernel's own accounting, while the
    ctlb client makes connections, sends unconnected UDP and calls getpeername(): once with tracing
    off, once while `ctlb socket-trace` reads every decision. `bench.program_cost` takes the
    programs apart."""
    off = _workload_cost(node, seconds=seconds)
    with program_cost.tracing(node.bpffs) as traced:
        on = _workload_cost(node, seconds=seconds)
    return {hook: {**cost, "ns_per_call_traced": on.get(hook, {}).get("ns_per_call"),
                   "trace_lost": traced["lost"]} for hook, cost in off.items()}


def _workload_cost(node: topology.BenchNode, *, seconds: float) -> dict[str, dict[str, float | None]]:
    stats_fd = libbpf.enable_stats()
    try:
        before = program_cost.prog_stats(node.bpffs)
        loadgen.tcp_crr(node.ctlb_client, host=topology.cluster_ip(0), port=topology.PORT_CRR, seconds=seconds,
                        cpu=topology.CLIENT_CPU)
        loadgen.udp_rr(node.ctlb_client, host=topology.cluster_ip(0), port=topology.PORT_UDP,
                       seconds=seconds / 2, cpu=topology.CLIENT_CPU, connected=False)
        program_cost.getpeername_loop(node.ctlb_client, host=topology.cluster_ip(0), port=topology.PORT_CRR,
                                      seconds=seconds / 2, cpu=topology.CLIENT_CPU)
        after = program_cost.prog_stats(node.bpffs)
    finally:
        os.close(stats_fd)
    cost: dict[str, dict[str, float | None]] = {}
    for hook, (ns, cnt) in after.items():
        d_ns, d_cnt = ns - before[hook][0], cnt - before[hook][1]
        cost[hook] = {"calls": d_cnt, "ns_per_call": d_ns / d_cnt if d_cnt else None}
    return cost


def map_memory(node: topology.BenchNode) -> Sample:
    """Metric 7: bytes the kernel charges for the frontend and backend tables, and the entries in
    use. The tables are preallocated arrays now: their bytes do not grow with N."""
    out = {}
    found = inspect.inspect(node.bpffs)
    used = {f.name: f.entries for f in found.fill} if found is not None else {}
    for name in (maps.FRONTENDS[4], maps.BACKENDS[4]):
        info = json.loads(subprocess.run(["bpftool", "map", "show", "pinned", str(node.bpffs / name), "-j"],
                                         capture_output=True, text=True, check=True).stdout)
        out[name] = {"bytes": info.get("bytes_memlock"), "entries": used.get(name, 0)}
    return out


def from_empty_s(agent_log: pathlib.Path) -> float | None:
    """Metric 5a for ctlb, end to end: from the agent's datapath being ready (programs compiled,
    loaded and attached: a cost that does not grow with N) to the end of its first sync (every
    manifest read, every Service planned, the maps written, the state file written), from the
    timestamps of its JSON log. The agent's log file is appended to at every start: the last
    start counts."""
    ready: datetime.datetime | None = None
    synced: datetime.datetime | None = None
    for line in agent_log.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # not a log event (a traceback, a warning from a library)
        if event.get("event") == "datapath_ready":
            ready, synced = datetime.datetime.fromisoformat(event["timestamp"]), None
        elif event.get("event") == "synced" and ready is not None and synced is None:
            synced = datetime.datetime.fromisoformat(event["timestamp"])
    return (synced - ready).total_seconds() if ready is not None and synced is not None else None


def run_for_n(node: topology.BenchNode, n: int, *, rounds: int, seconds: float) -> Sample:
    node.load_services(n)
    result: Sample = {"n": n, "control": {}, "rounds": []}
    result["control"]["ctlb"] = node.start_agent()
    result["control"]["ctlb"]["from_empty_s"] = from_empty_s(node.work / "agent.log")
    for mode in (Mode.IPTABLES, Mode.NFTABLES):
        print(f"  N={n} loading {mode.value} rules", flush=True)
        timing = node.install(mode)
        result["control"][mode.value] = {"wall_s": timing.wall_s, "cpu_s": timing.cpu_s}
    order = list(Mode)
    for r in range(rounds):
        rotated = order[r % len(order):] + order[:r % len(order)]
        samples: Sample = {}
        for mode in rotated:
            node.hook(mode)
            try:
                samples[mode.value] = measure_data_path(node, mode, n, seconds=seconds)
                if mode is not Mode.DIRECT:
                    samples[mode.value]["change"] = change_latency(node, mode, n)
            finally:
                node.unhook(mode)
            print(f"  N={n} round {r + 1}/{rounds} {mode.value}: "
                  f"{samples[mode.value]['crr_first']['rate']:.0f} conn/s", flush=True)
        result["rounds"].append(samples)
    result["bpf_cost"] = bpf_program_cost(node, n, seconds=seconds)
    assert node.agent is not None
    result["memory"] = {"maps": map_memory(node), "agent_rss_mib": topology.process_rss_mib(node.agent.pid)}
    node.stop_agent()
    node.remove_rules()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N in {1, 1000}, 1 round, short samples")
    ap.add_argument("--large", action="store_true", help="also N = 30000")
    ap.add_argument("--sizes", type=int, nargs="+", help="these N only, e.g. --sizes 10000")
    ap.add_argument("--rounds", type=int, help="rounds per N (default 3, quick 1)")
    ap.add_argument("--seconds", type=float, help="seconds per sample (default 3, quick 1)")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    args = ap.parse_args(argv)
    sizes = args.sizes or ([1, 1000] if args.quick else [1, 1000, 10000] + ([30000] if args.large else []))
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    loadgen.build()
    started = time.monotonic()
    results: Sample = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"kernel": platform.release(), "cpus": _cpus(), "cpu_model": _cpu_model()},
        "iptables_backend": kubeproxy.iptables_backend(),
        "rounds": rounds, "seconds_per_sample": seconds, "sizes": [],
    }
    ctlb_lab.sweep()
    with tempfile.TemporaryDirectory(prefix="ctlb-bench-") as tmp, ctlb_lab.Lab() as the_lab:
        node = topology.BenchNode(the_lab, pathlib.Path(tmp))
        try:
            for n in sizes:
                print(f"N={n}", flush=True)
                results["sizes"].append(run_for_n(node, n, rounds=rounds, seconds=seconds))
        finally:
            node.close()
    results["wall_s"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = report.markdown(results)
    (args.out / "results.md").write_text(table)
    report.plots(results, args.out)
    print(table)
    print(f"wrote {args.out}/results.json, results.md and plots in {results['wall_s']:.0f} s")
    return 0


def _cpus() -> int:
    return os.cpu_count() or 0


def _cpu_model() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


if __name__ == "__main__":
    sys.exit(main())
