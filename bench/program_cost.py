"""Per-call cost of each socket program, from the kernel's own accounting (BPF_ENABLE_STATS).

    sudo .venv/bin/python -m bench.program_cost                    # N=10000 x 4, 5 rounds
    sudo .venv/bin/python -m bench.program_cost --services 1000 --rounds 3 --json out.json

A lab node with four backend pods and one client pod; the datapath (the real `Datapath`, its
programs attached to the client pod's cgroup) is given N Services of B backends each, every one
a ClusterIP on port 80/TCP (and, with --nodeport, a second frontend on the node address, the
shape of a NodePort Service). The first Service also has 53/UDP. All N Services share the same
backend pods, as in `bench.run`.

After a warm-up of connection churn (long enough to fill a per-socket LRU of 262 144 entries,
which is what a node under steady churn runs with), each round runs these phases, client on
CPU 0 and servers on CPU 1, and takes the run-time and run-count deltas of every program:

    crr       loadgen tcp-crr to the first Service: connect4 with a translation
    crr-np    (--nodeport) tcp-crr to the first Service's node-address frontend
    direct    loadgen tcp-crr to a backend pod's own address: connect4 finding no frontend
    udp       loadgen udp-rr --unconnected to the first Service's UDP port: sendmsg4, recvmsg4
    peer      connect + getpeername() + close in a loop (Python): getpeer4 after a translation
    peer-dir  the same to a backend pod directly: getpeer4 on a socket that was not translated

Per program and phase it prints the median ns/call over the rounds with the min-max range.
Correctness is checked on the way (getpeername() returns the Service address, UDP replies come
from it) and reported; nothing is judged on time. The VM this runs on is noisy: compare runs made
back to back, several rounds each.
"""

from __future__ import annotations

import argparse
import logging
import ipaddress
import json
import os
import pathlib
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any

import structlog

from bench import loadgen
from ctlb import datapath, desired, lab as ctlb_lab, model
from ctlb.datapath import libbpf, programs

CLIENT_CPU = 0
SERVER_CPU = 1
TCP_PORT, TCP_TARGET = 80, 8080
UDP_PORT, UDP_TARGET = 53, 9090
NODE_PORT_BASE = 20000

TCP = model.Protocol.TCP
UDP = model.Protocol.UDP


def cluster_ip(index: int, *, ipv6: bool = False) -> model.IPAddress:
    base = ipaddress.IPv6Address("fd00:10:96::") if ipv6 else ipaddress.IPv4Address("10.96.0.0")
    return base + 1 + index


def desired_state(n: int, backends: list[model.IPAddress], *, node_ip: model.IPAddress,
                  nodeport: bool) -> desired.DesiredState:
    """N Services on the same backend pods; the first also carries 53/UDP."""
    ipv6 = backends[0].version == 6
    family = model.IPFamily.IPv6 if ipv6 else model.IPFamily.IPv4
    ports: dict[desired.ServicePortName, desired.ServicePortState] = {}
    for i in range(n):
        for proto, port, target in ((TCP, TCP_PORT, TCP_TARGET), (UDP, UDP_PORT, UDP_TARGET)):
            if proto is UDP and i != 0:
                continue
            name = desired.ServicePortName("bench", f"svc-{i}", f"p{port}", proto, family)
            frontends = {desired.Frontend(cluster_ip(i, ipv6=ipv6), port, proto): desired.FrontendKind.CLUSTER_IP}
            if nodeport and proto is TCP:
                frontends[desired.Frontend(node_ip, NODE_PORT_BASE + i, proto)] = desired.FrontendKind.NODE_PORT
            ports[name] = desired.ServicePortState(
                name=name, frontends=frontends,
                backends=tuple(sorted(desired.Backend(b, target) for b in backends)))
    return desired.DesiredState(service_ports=ports)


_PEER_CLIENT = textwrap.dedent("""
    import json, socket, struct, time
    host, port, seconds = {host!r}, {port}, {seconds}
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    linger = struct.pack("ii", 1, 0)
    done = wrong = errors = 0
    first_errno = None
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s = socket.socket(family)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        try:
            s.connect((host, port))
            for _ in range(4):
                if s.getpeername()[:2] != (host, port):
                    wrong += 1
            done += 1
        except OSError as e:
            errors += 1
            first_errno = first_errno or e.errno
        finally:
            s.close()
    print(json.dumps({{"connections": done, "getpeername_wrong": wrong, "errors": errors,
                      "first_errno": first_errno}}))
""")


def _prog_stats(bpffs: pathlib.Path) -> dict[str, tuple[int, int]]:
    """run_time_ns and run_cnt of every program attached through ctlb's links."""
    stats = {}
    for a in programs.attachments(bpffs):
        info = json.loads(subprocess.run(["bpftool", "prog", "show", "id", str(a.prog_id), "-j"],
                                         capture_output=True, text=True, check=True).stdout)
        stats[a.hook] = (info.get("run_time_ns", 0), info.get("run_cnt", 0))
    return stats


class Rig:
    """The lab node, its pods and servers, and the datapath on the client pod's cgroup."""

    def __init__(self, the_lab: ctlb_lab.Lab, *, n: int, nodeport: bool, ipv6: bool = False) -> None:
        self.lab = the_lab
        self.ipv6 = ipv6
        self.backends = [the_lab.add_pod(f"be{i}", ipv6=ipv6) for i in range(4)]
        self.client = the_lab.add_pod("client", ipv6=ipv6)
        loadgen.tune(self.client)
        for pod in self.backends:
            loadgen.start_tcp_server(pod, port=TCP_TARGET, cpu=SERVER_CPU)
            loadgen.start_udp_server(pod, port=UDP_TARGET, cpu=SERVER_CPU)
        self.bpffs = pathlib.Path("/sys/fs/bpf") / f"{the_lab.prefix}-cost"
        self.dp = datapath.Datapath.install(bpffs=self.bpffs, cgroup=self.client.pod_cgroup,
                                            sizes=programs.MapSizes())
        state = desired_state(n, [self.addr(p) for p in self.backends], node_ip=self.addr(the_lab.node),
                              nodeport=nodeport)
        started = time.perf_counter()
        outcome = self.dp.apply(state)
        self.program_s = time.perf_counter() - started
        if outcome.problems:
            raise RuntimeError(f"not programmed: {outcome.problems[:3]}")

    def addr(self, place: ctlb_lab.Place) -> model.IPAddress:
        address = place.ipv6 if self.ipv6 else place.ipv4
        assert address is not None
        return address

    def service(self, index: int = 0) -> str:
        return str(cluster_ip(index, ipv6=self.ipv6))

    def close(self) -> None:
        self.dp.close()
        programs.uninstall(self.bpffs)

    # --- phases: each returns what the client saw; the programs' figures come from the stats ---

    def crr(self, seconds: float, *, host: str, port: int = TCP_PORT) -> dict[str, Any]:
        out = loadgen.tcp_crr(self.client, host=host, port=port, seconds=seconds, cpu=CLIENT_CPU)
        return {"rate": out["rate"], "errors": out["errors"]}

    def udp(self, seconds: float) -> dict[str, Any]:
        out = loadgen.udp_rr(self.client, host=self.service(), port=UDP_PORT, seconds=seconds,
                             cpu=CLIENT_CPU, connected=False)
        return {"rate": out["rate"], "errors": out["errors"], "source_mismatch": out.get("source_mismatch")}

    def peer(self, seconds: float, *, host: str, port: int) -> dict[str, Any]:
        return getpeername_loop(self.client, host=host, port=port, seconds=seconds, cpu=CLIENT_CPU)


def getpeername_loop(place: ctlb_lab.Place, *, host: str, port: int, seconds: float, cpu: int) -> dict[str, Any]:
    """Connects, calls getpeername() four times and closes, in a loop, for `seconds`; returns
    the connection count, how many getpeername() answers were not (host, port), and how many
    connects failed."""
    code = _PEER_CLIENT.format(host=host, port=port, seconds=seconds)
    run = place.run(["taskset", "-c", str(cpu), sys.executable, "-c", code], timeout=seconds + 30, check=True)
    return json.loads(run.stdout)


def measure(rig: Rig, phase: str, seconds: float) -> dict[str, Any]:
    """Runs one phase; returns per-program calls and ns/call, and the client's view."""
    be = str(rig.addr(rig.backends[0]))
    node = str(rig.addr(rig.lab.node))
    before = _prog_stats(rig.bpffs)
    if phase == "crr":
        seen = rig.crr(seconds, host=rig.service())
    elif phase == "crr-np":
        seen = rig.crr(seconds, host=node, port=NODE_PORT_BASE)
    elif phase == "direct":
        seen = rig.crr(seconds, host=be, port=TCP_TARGET)
    elif phase == "udp":
        seen = rig.udp(seconds)
    elif phase == "peer":
        seen = rig.peer(seconds, host=rig.service(), port=TCP_PORT)
    elif phase == "peer-np":
        seen = rig.peer(seconds, host=node, port=NODE_PORT_BASE)
    elif phase == "peer-dir":
        seen = rig.peer(seconds, host=be, port=TCP_TARGET)
    else:
        raise ValueError(phase)
    after = _prog_stats(rig.bpffs)
    progs = {}
    for hook, (ns, cnt) in after.items():
        d_ns, d_cnt = ns - before.get(hook, (0, 0))[0], cnt - before.get(hook, (0, 0))[1]
        if d_cnt:
            progs[hook] = {"calls": d_cnt, "ns_per_call": d_ns / d_cnt}
    return {"client": seen, "programs": progs}


# Which program each phase is there to measure.
FOCUS = {"crr": ["connect4"], "crr-np": ["connect4"], "direct": ["connect4"], "udp": ["sendmsg4", "recvmsg4"],
         "peer": ["getpeer4"], "peer-np": ["getpeer4"], "peer-dir": ["getpeer4"]}


def focus(phase: str, *, ipv6: bool) -> list[str]:
    return [h.replace("4", "6") if ipv6 else h for h in FOCUS[phase]]


def summarize(rounds: list[dict[str, Any]], *, ipv6: bool = False) -> list[dict[str, Any]]:
    rows = []
    for phase in FOCUS:
        samples = [r[phase] for r in rounds if phase in r]
        if not samples:
            continue
        for hook in focus(phase, ipv6=ipv6):
            values = [s["programs"][hook]["ns_per_call"] for s in samples if hook in s["programs"]]
            calls = [s["programs"][hook]["calls"] for s in samples if hook in s["programs"]]
            if not values:
                continue
            rows.append({"phase": phase, "program": hook, "median_ns": statistics.median(values),
                         "min_ns": min(values), "max_ns": max(values), "rounds": len(values),
                         "calls_per_round": int(statistics.median(calls))})
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    out = [f"{'phase':<9} {'program':<9} {'median ns':>10} {'range ns':>16} {'calls/round':>12}"]
    for r in rows:
        out.append(f"{r['phase']:<9} {r['program']:<9} {r['median_ns']:>10.0f} "
                   f"{r['min_ns']:>7.0f} - {r['max_ns']:<6.0f} {r['calls_per_round']:>12}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.program_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per phase")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds of connection churn first")
    ap.add_argument("--nodeport", action="store_true", help="each Service also gets a node-address frontend")
    ap.add_argument("--ipv6", action="store_true", help="IPv6 Services, pods and clients (the *6 programs)")
    ap.add_argument("--phases", default="crr,direct,udp,peer,peer-dir",
                    help="comma-separated, from: " + ", ".join(FOCUS))
    ap.add_argument("--label", default="", help="recorded in the JSON output")
    ap.add_argument("--json", type=pathlib.Path, help="write raw rounds and the summary here")
    args = ap.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    phases = args.phases.split(",")
    if args.nodeport:
        phases += [p for p in ("crr-np", "peer-np") if p not in phases]
    loadgen.build()
    ctlb_lab.sweep()
    stats_fd = libbpf.enable_stats()
    rounds: list[dict[str, Any]] = []
    try:
        with ctlb_lab.Lab() as the_lab:
            rig = Rig(the_lab, n=args.services, nodeport=args.nodeport, ipv6=args.ipv6)
            try:
                print(f"programmed {args.services} Services in {rig.program_s:.2f} s; "
                      f"warm-up {args.warmup:.0f} s", flush=True)
                if args.warmup > 0:
                    rig.crr(args.warmup, host=rig.service())
                for r in range(args.rounds):
                    sample = {phase: measure(rig, phase, args.seconds) for phase in phases}
                    rounds.append(sample)
                    print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                        f"{ph} {h} {sample[ph]['programs'][h]['ns_per_call']:.0f}"
                        for ph in phases for h in focus(ph, ipv6=args.ipv6) if h in sample[ph]['programs']),
                        flush=True)
            finally:
                rig.close()
    finally:
        os.close(stats_fd)
    rows = summarize(rounds, ipv6=args.ipv6)
    print(render(rows))
    problems = [(ph, s["client"]) for r in rounds for ph, s in r.items()
                if s["client"].get("errors") or s["client"].get("source_mismatch")
                or s["client"].get("getpeername_wrong")]
    print(f"client-side problems: {problems if problems else 'none'}")
    if args.json:
        args.json.write_text(json.dumps({"label": args.label, "services": args.services, "rounds": rounds,
                                         "summary": rows, "argv": sys.argv[1:]}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
