"""Per-call cost of each socket program, from the kernel's own accounting (BPF_ENABLE_STATS).

    sudo .venv/bin/python -m bench.program_cost                    # N=10000 x 4, 5 rounds
    sudo .venv/bin/python -m bench.program_cost --services 1000 --rounds 3 --json out.json
    sudo .venv/bin/python -m bench.program_cost --drop --egress-ab --phases rr,udp,iperf,blast
    sudo .venv/bin/python -m bench.program_cost --services 1000 --mesh --gate --phases crr,crr-lb,direct
    sudo .venv/bin/python -m bench.program_cost --services 1000 --trace --phases crr,udp,peer
    sudo .venv/bin/python -m bench.program_cost --services 1000 --affinity --phases crr,udp,direct
    sudo .venv/bin/python -m bench.program_cost --services 1000 --meshed-client --phases crr,direct

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
    rr        loadgen tcp-rr to a backend pod: established request/response (no socket program)
    iperf     iperf3 to a backend pod: established throughput (no socket program)
    blast     iperf3 -u of 64-byte datagrams to a backend pod, unlimited: packets/s of one CPU

With --mesh, the node has a meshed pod (not the client), as on any node of a mesh: its cgroup
carries the mesh redirect and sock_ops and getsockopt are attached; the client's connects should
not pay for it. With --meshed-client, the client itself is the meshed pod: the datapath hangs on
the lab's cgroup above every pod, as the agent's does on a node, and the mesh's programs on the
client pod's cgroup, where a stand-in sidecar listens on the outbound port (15001) and closes
what it accepts. A connect to the Service then runs meshconn4 (the redirect) and, on the
redirected loopback address, the node-wide connect4; sock_ops records the connection. With --gate, the first Service also has a
LoadBalancer IP with loadBalancerSourceRanges that admit the client, and the phase crr-lb connects
to it: connect4 through the source-range gate (the pod lookup and an LPM lookup).

With --affinity, every Service has ClientIP session affinity: connect4 and sendmsg4 then find
the client's backend in the affinity LRU (ctlb_aff4/6) or pick one and remember it there.

With --drop, one more service port drops (internalTrafficPolicy Local, endpoints elsewhere), so
the drop action's egress program (ctlb_egress) is attached: it runs on every packet the client
sends, and its ns/packet is reported for each phase. With --egress-ab as well, after the rounds
above, as many rounds run rr, udp, iperf and blast (those of --phases) twice each, egress program
attached and detached (order alternating), with the kernel's run-time accounting off, and report
the client's rate with it over the rate without: its effect on established traffic. With --floor
(not with --egress-ab), an empty egress program (bench/egress_floor.c) runs beside it on the same
packets: the kernel's run-time accounting costs every program ~50 ns a call on this VM, so the
egress program's own cost is the difference.

With --trace, every phase is run a second time (as `<phase>+trace`) while `ctlb socket-trace
--json` reads the decisions (its output thrown away), on the servers' CPU: the programs' cost with
tracing on. The decisions socket-trace could not keep up with are reported as lost.

Per program and phase it prints the median ns/call over the rounds with the min-max range.
Correctness is checked on the way (getpeername() returns the Service address, UDP replies come
from it) and reported; nothing is judged on time. The VM this runs on is noisy: compare runs made
back to back, several rounds each.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import ipaddress
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import structlog

from bench import loadgen
from ctlb import datapath, desired, lab as ctlb_lab, model
from ctlb.datapath import libbpf, programs
from ctlb.lab import cgroups as lab_cgroups
from meshredirect import podmap, switch

CLIENT_CPU = 0
SERVER_CPU = 1
TCP_PORT, TCP_TARGET = 80, 8080
UDP_PORT, UDP_TARGET = 53, 9090
RR_TARGET = 8081
IPERF_PORT = 5201
NODE_PORT_BASE = 20000
DROP_PORT = 80
LB_IP = {4: ipaddress.ip_address("198.51.100.1"), 6: ipaddress.ip_address("2001:db8:7::1")}

TCP = model.Protocol.TCP
UDP = model.Protocol.UDP


AFFINITY_TIMEOUT_S = 10800  # sessionAffinityConfig.clientIP.timeoutSeconds' default


def cluster_ip(index: int, *, ipv6: bool = False) -> model.IPAddress:
    base = ipaddress.IPv6Address("fd00:10:96::") if ipv6 else ipaddress.IPv4Address("10.96.0.0")
    return base + 1 + index


def desired_state(n: int, backends: list[model.IPAddress], *, node_ip: model.IPAddress,
                  nodeport: bool, drop: bool = False,
                  gate: tuple[desired.SourceRange, ...] = (), affinity: bool = False) -> desired.DesiredState:
    """N Services on the same backend pods; the first also carries 53/UDP. With `drop`, one
    more service port (the N+1th ClusterIP) drops: its endpoints are on other nodes. With `gate`,
    the first Service's TCP port also has a LoadBalancer IP admitting those source ranges. With
    `affinity`, every Service has ClientIP session affinity (Kubernetes' default timeout)."""
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
            gated = bool(gate) and i == 0 and proto is TCP
            if gated:
                frontends[desired.Frontend(LB_IP[node_ip.version], port, proto)] = desired.FrontendKind.LOAD_BALANCER
            ports[name] = desired.ServicePortState(
                name=name, frontends=frontends,
                backends=tuple(sorted(desired.Backend(b, target) for b in backends)),
                source_ranges=gate if gated else (), affinity_timeout=AFFINITY_TIMEOUT_S if affinity else None)
    if drop:
        name = desired.ServicePortName("bench", "svc-drop", f"p{DROP_PORT}", TCP, family)
        ports[name] = desired.ServicePortState(
            name=name, frontends={desired.Frontend(cluster_ip(n, ipv6=ipv6), DROP_PORT, TCP): desired.FrontendKind.CLUSTER_IP},
            backends=(), drop=True)
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


def prog_stats(bpffs: pathlib.Path, extra: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
    """run_time_ns and run_cnt of every program attached through ctlb's links, and of `extra`
    programs (name -> id)."""
    ids = {a.hook: a.prog_id for a in programs.attachments(bpffs)}
    ids |= {a.hook: a.prog_id for a in programs.pod_attachments(bpffs)}  # the one meshed pod's
    ids |= extra or {}
    stats = {}
    for hook, prog_id in ids.items():
        info = json.loads(subprocess.run(["bpftool", "prog", "show", "id", str(prog_id), "-j"],
                                         capture_output=True, text=True, check=True).stdout)
        stats[hook] = (info.get("run_time_ns", 0), info.get("run_cnt", 0))
    return stats


class Rig:
    """The lab node, its pods and servers, and the datapath on the client pod's cgroup (on the
    lab's cgroup above every pod with a meshed client)."""

    def __init__(self, the_lab: ctlb_lab.Lab, *, n: int, nodeport: bool, ipv6: bool = False,
                 drop: bool = False, mesh: bool = False, gate: bool = False, affinity: bool = False,
                 meshed_client: bool = False) -> None:
        self.lab = the_lab
        self.ipv6 = ipv6
        self.backends = [the_lab.add_pod(f"be{i}", ipv6=ipv6) for i in range(4)]
        self.client = the_lab.add_pod("client", ipv6=ipv6)
        loadgen.tune(self.client)
        for pod in self.backends:
            loadgen.start_tcp_server(pod, port=TCP_TARGET, cpu=SERVER_CPU)
            loadgen.start_udp_server(pod, port=UDP_TARGET, cpu=SERVER_CPU)
        loadgen.start_tcp_server(self.backends[0], port=RR_TARGET, echo=True, cpu=SERVER_CPU)
        self.backends[0].popen(["taskset", "-c", str(SERVER_CPU), "iperf3", "-s", "-p", str(IPERF_PORT)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.bpffs = pathlib.Path("/sys/fs/bpf") / f"{the_lab.prefix}-cost"
        self.extra_programs: dict[str, int] = {}  # name -> program id, measured beside ctlb's
        self._floor_link: int | None = None
        # A meshed client needs the node-wide programs above its pod's own, as on a node: the
        # kernel runs the pod cgroup's redirect first, then the ancestors' connect4.
        try:
            self.dp = datapath.Datapath.install(bpffs=self.bpffs,
                                                cgroup=the_lab.cgroup_root if meshed_client else self.client.pod_cgroup,
                                                sizes=programs.MapSizes())
        except BaseException:
            programs.uninstall(self.bpffs)  # a failed compile or load leaves no pin folder behind
            raise
        try:
            self._program(n, nodeport=nodeport, drop=drop, mesh=mesh, gate=gate, affinity=affinity,
                          meshed_client=meshed_client)
        except BaseException:
            self.close()  # nor does a failure to program it
            raise

    def _program(self, n: int, *, nodeport: bool, drop: bool, mesh: bool, gate: bool, affinity: bool,
                 meshed_client: bool) -> None:
        ipv6, the_lab = self.ipv6, self.lab
        client = self.addr(self.client)
        gate_ranges = (ipaddress.ip_network(client), ipaddress.ip_network("203.0.113.0/24" if not ipv6 else "2001:db8::/32"))
        state = desired_state(n, [self.addr(p) for p in self.backends], node_ip=self.addr(the_lab.node),
                              nodeport=nodeport, drop=drop, gate=gate_ranges if gate else (), affinity=affinity)
        started = time.perf_counter()
        outcome = self.dp.apply(state)
        self.program_s = time.perf_counter() - started
        if outcome.problems:
            raise RuntimeError(f"not programmed: {outcome.problems[:3]}")
        if meshed_client:
            loadgen.start_tcp_server(self.client, port=switch.MeshSettings().outbound_port, cpu=SERVER_CPU)
            self._write_pods(meshed=self.client)
        elif mesh or gate:
            self._write_pods(meshed=the_lab.add_pod("meshed", ipv6=ipv6) if mesh else None)

    def _write_pods(self, *, meshed: ctlb_lab.Pod | None) -> None:
        """Puts the client pod (not meshed) and `meshed` into the pod maps, as the agent would."""
        mount = lab_cgroups.mount_point()
        placements = [
            podmap.PodPlacement(
                mode=switch.PodMode("bench", pod.name, pod.uid, ips=tuple(pod.addresses),
                                    capture=switch.Capture() if pod is meshed else None),
                cgroup_id=pod.pod_cgroup.stat().st_ino, level=len(pod.pod_cgroup.relative_to(mount).parts))
            for pod in dict.fromkeys((self.client, meshed)) if pod is not None
        ]
        outcome = podmap.PodTable(self.dp.pinned, switch.MeshSettings()).apply(placements)
        if outcome.problems:
            raise RuntimeError(f"pods not programmed: {outcome.problems}")
        if meshed is not None and self.dp.pod_links is not None:
            failed = self.dp.pod_links.sync({meshed.pod_cgroup.stat().st_ino: meshed.pod_cgroup})
            if failed:
                raise RuntimeError(f"mesh redirect not attached: {failed}")

    def addr(self, place: ctlb_lab.Place) -> model.IPAddress:
        address = place.ipv6 if self.ipv6 else place.ipv4
        assert address is not None
        return address

    def service(self, index: int = 0) -> str:
        return str(cluster_ip(index, ipv6=self.ipv6))

    def close(self) -> None:
        if self._floor_link is not None:
            libbpf.link_detach(self._floor_link)
            os.close(self._floor_link)
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

    def rr(self, seconds: float) -> dict[str, Any]:
        out = loadgen.tcp_rr(self.client, host=str(self.addr(self.backends[0])), port=RR_TARGET,
                             seconds=seconds, cpu=CLIENT_CPU)
        return {"rate": out["rate"], "errors": out["errors"]}

    def iperf(self, seconds: float) -> dict[str, Any]:
        run = self.client.run(["taskset", "-c", str(CLIENT_CPU), "iperf3", "-c", str(self.addr(self.backends[0])),
                               "-p", str(IPERF_PORT), "-t", str(max(1, round(seconds))), "-J"],
                              timeout=seconds + 30)
        data = json.loads(run.stdout)
        if "error" in data:
            return {"rate": 0.0, "errors": 1, "error": data["error"]}
        return {"rate": data["end"]["sum_received"]["bits_per_second"] / 1e9, "errors": 0}  # Gbit/s

    def attach_floor(self) -> None:
        """Attaches the empty egress program of bench/egress_floor.c beside ctlb_egress."""
        from bcc import BPF  # Debian's python3-bpfcc

        self._floor_bpf = BPF(src_file=str(pathlib.Path(__file__).with_name("egress_floor.c")).encode())
        fn = self._floor_bpf.load_func(b"ctlb_floor", BPF.CGROUP_SKB, attach_type=programs.CGROUP_INET_EGRESS)
        cg_fd = os.open(self.client.pod_cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._floor_link = libbpf.link_create(fn.fd, cg_fd, programs.CGROUP_INET_EGRESS)
        finally:
            os.close(cg_fd)
        self.extra_programs["floor"] = libbpf.link_info(self._floor_link).prog_id

    def blast(self, seconds: float) -> dict[str, Any]:
        """64-byte UDP datagrams to a backend as fast as one CPU sends them: the per-packet path."""
        run = self.client.run(["taskset", "-c", str(CLIENT_CPU), "iperf3", "-c", str(self.addr(self.backends[0])),
                               "-p", str(IPERF_PORT), "-u", "-b", "0", "-l", "64",
                               "-t", str(max(1, round(seconds))), "-J"], timeout=seconds + 30)
        data = json.loads(run.stdout)
        if "error" in data:
            return {"rate": 0.0, "errors": 1, "error": data["error"]}
        sent = data["end"]["sum"]
        return {"rate": sent["packets"] / sent["seconds"], "errors": 0}  # packets/s

    def egress(self, attached: bool) -> None:
        """Attaches or detaches the drop action's egress program (for the A/B comparison)."""
        assert self.dp.egress is not None
        if attached:
            self.dp.egress.ensure()
        else:
            self.dp.egress.release()


def getpeername_loop(place: ctlb_lab.Place, *, host: str, port: int, seconds: float, cpu: int) -> dict[str, Any]:
    """Connects, calls getpeername() four times and closes, in a loop, for `seconds`; returns
    the connection count, how many getpeername() answers were not (host, port), and how many
    connects failed."""
    code = _PEER_CLIENT.format(host=host, port=port, seconds=seconds)
    run = place.run(["taskset", "-c", str(cpu), sys.executable, "-c", code], timeout=seconds + 30, check=True)
    return json.loads(run.stdout)


TRACED = "+trace"


@contextlib.contextmanager
def tracing(bpffs: pathlib.Path) -> Iterator[dict[str, Any]]:
    """`ctlb socket-trace` reading every decision while the block runs, on the servers' CPU, its
    output thrown away; the dict gets `lost`: the decisions it could not keep up with."""
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        proc = subprocess.Popen(["taskset", "-c", str(SERVER_CPU), sys.executable, "-m", "ctlb.cli.main",
                                 "socket-trace", "--json", "--bpffs", str(bpffs), "--run-dir", run_dir],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        started = proc.stderr.readline()
        if not started.startswith("tracing"):
            proc.kill()
            raise RuntimeError(f"socket-trace did not start: {started}{proc.stderr.read()}")
        try:
            yield found
        finally:
            proc.send_signal(signal.SIGINT)
            rest = proc.communicate(timeout=30)[1]
            lost = re.search(r"(\d+) decisions were not reported", rest)
            found["lost"] = int(lost[1]) if lost else 0


def measure(rig: Rig, phase: str, seconds: float) -> dict[str, Any]:
    """Runs one phase; returns per-program calls and ns/call, and the client's view."""
    if phase.endswith(TRACED):
        with tracing(rig.bpffs) as traced:
            out = measure(rig, phase.removesuffix(TRACED), seconds)
        out["client"]["trace_lost"] = traced["lost"]
        return out
    be = str(rig.addr(rig.backends[0]))
    node = str(rig.addr(rig.lab.node))
    before = prog_stats(rig.bpffs, rig.extra_programs)
    if phase == "crr":
        seen = rig.crr(seconds, host=rig.service())
    elif phase == "crr-lb":
        seen = rig.crr(seconds, host=str(LB_IP[6 if rig.ipv6 else 4]))
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
    elif phase == "rr":
        seen = rig.rr(seconds)
    elif phase == "iperf":
        seen = rig.iperf(seconds)
    elif phase == "blast":
        seen = rig.blast(seconds)
    else:
        raise ValueError(phase)
    after = prog_stats(rig.bpffs, rig.extra_programs)
    progs = {}
    for hook, (ns, cnt) in after.items():
        d_ns, d_cnt = ns - before.get(hook, (0, 0))[0], cnt - before.get(hook, (0, 0))[1]
        if d_cnt:
            progs[hook] = {"calls": d_cnt, "ns_per_call": d_ns / d_cnt}
    return {"client": seen, "programs": progs}


# Which program each phase is there to measure.
# meshconn4 and sockops run only with --meshed-client.
FOCUS = {"crr": ["meshconn4", "connect4", "sockops"], "crr-lb": ["connect4"], "crr-np": ["connect4"],
         "direct": ["meshconn4", "connect4", "sockops"], "udp": ["sendmsg4", "recvmsg4"],
         "peer": ["getpeer4"], "peer-np": ["getpeer4"], "peer-dir": ["getpeer4"], "rr": [], "iperf": [],
         "blast": []}
EGRESS = programs.EGRESS.name
FLOOR = "floor"  # bench/egress_floor.c, with --floor
# Phases the egress A/B comparison runs, and what their client-side rate is.
AB_PHASES = {"rr": "transactions/s", "udp": "transactions/s", "iperf": "Gbit/s", "blast": "packets/s"}


def focus(phase: str, *, ipv6: bool) -> list[str]:
    """The programs a phase measures; the egress program runs in every phase (every packet)."""
    return [h.replace("4", "6") if ipv6 else h for h in FOCUS[phase.removesuffix(TRACED)]] + [EGRESS, FLOOR]


def egress_ab(rig: Rig, phases: list[str], seconds: float, *, first_attached: bool) -> dict[str, Any]:
    """Runs each phase with the egress program attached and detached; the client's rates."""
    out: dict[str, Any] = {}
    for phase in phases:
        out[phase] = {}
        for attached in (first_attached, not first_attached):
            rig.egress(attached)
            out[phase]["with" if attached else "without"] = measure(rig, phase, seconds)["client"]
    rig.egress(True)
    return out


def summarize_ab(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for phase, unit in AB_PHASES.items():
        pairs = [(r[phase]["with"]["rate"], r[phase]["without"]["rate"]) for r in rounds if phase in r]
        if not pairs:
            continue
        ratios = [w / wo for w, wo in pairs if wo]
        rows.append({"phase": phase, "unit": unit, "with": statistics.median(w for w, _ in pairs),
                     "without": statistics.median(wo for _, wo in pairs),
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios), "rounds": len(pairs)})
    return rows


def render_ab(rows: list[dict[str, Any]]) -> str:
    out = [f"{'phase':<7} {'with egress':>14} {'without':>14} {'unit':<15} {'ratio (median, range)':>24}"]
    for r in rows:
        out.append(f"{r['phase']:<7} {r['with']:>14.2f} {r['without']:>14.2f} {r['unit']:<15} "
                   f"{r['ratio_median']:>8.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})")
    return "\n".join(out)


def summarize(rounds: list[dict[str, Any]], *, ipv6: bool = False) -> list[dict[str, Any]]:
    rows = []
    for phase in dict.fromkeys(phase for r in rounds for phase in r):  # in the order they ran
        samples = [r[phase] for r in rounds if phase in r]
        if not samples:
            continue
        for hook in focus(phase, ipv6=ipv6):
            values = [s["programs"][hook]["ns_per_call"] for s in samples if hook in s["programs"]]
            calls = [s["programs"][hook]["calls"] for s in samples if hook in s["programs"]]
            if not values:
                continue
            lost = [s["client"]["trace_lost"] for s in samples if "trace_lost" in s["client"]]
            rows.append({"phase": phase, "program": hook, "median_ns": statistics.median(values),
                         "min_ns": min(values), "max_ns": max(values), "rounds": len(values),
                         "calls_per_round": int(statistics.median(calls)),
                         "trace_lost_per_round": int(statistics.median(lost)) if lost else None})
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    out = [f"{'phase':<11} {'program':<9} {'median ns':>10} {'range ns':>16} {'calls/round':>12} {'trace lost':>11}"]
    for r in rows:
        lost = "" if r["trace_lost_per_round"] is None else str(r["trace_lost_per_round"])
        out.append(f"{r['phase']:<11} {r['program']:<9} {r['median_ns']:>10.0f} "
                   f"{r['min_ns']:>7.0f} - {r['max_ns']:<6.0f} {r['calls_per_round']:>12} {lost:>11}")
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
    ap.add_argument("--drop", action="store_true",
                    help="one more service port drops, so the egress program is attached and measured")
    ap.add_argument("--mesh", action="store_true", help="the node has a meshed pod (not the client)")
    ap.add_argument("--meshed-client", action="store_true",
                    help="the client is a meshed pod: its connects are redirected to a stand-in sidecar")
    ap.add_argument("--gate", action="store_true",
                    help="the first Service also has a LoadBalancer IP with source ranges (phase crr-lb)")
    ap.add_argument("--affinity", action="store_true",
                    help="every Service has ClientIP session affinity: connect4 and sendmsg4 take that path")
    ap.add_argument("--egress-ab", action="store_true",
                    help="with --drop: rr, udp and iperf with the egress program attached and detached")
    ap.add_argument("--floor", action="store_true",
                    help="with --drop: an empty egress program beside it, for the accounting floor")
    ap.add_argument("--trace", action="store_true",
                    help="each phase also runs while socket-trace reads the decisions (<phase>+trace)")
    ap.add_argument("--phases", default="crr,direct,udp,peer,peer-dir",
                    help="comma-separated, from: " + ", ".join(FOCUS))
    ap.add_argument("--label", default="", help="recorded in the JSON output")
    ap.add_argument("--json", type=pathlib.Path, help="write raw rounds and the summary here")
    args = ap.parse_args(argv)
    if (args.egress_ab or args.floor) and not args.drop:
        ap.error("--egress-ab and --floor need --drop")
    if args.egress_ab and args.floor:
        ap.error("--floor would run in both arms of --egress-ab: run them apart")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    phases = args.phases.split(",")
    if args.nodeport:
        phases += [p for p in ("crr-np", "peer-np") if p not in phases]
    if args.gate and "crr-lb" not in phases:
        phases.append("crr-lb")
    if args.trace:
        phases += [p + TRACED for p in phases if p in FOCUS and FOCUS[p]]
    loadgen.build()
    ctlb_lab.sweep()
    stats_fd: int | None = libbpf.enable_stats()
    rounds: list[dict[str, Any]] = []
    ab_rounds: list[dict[str, Any]] = []
    ab_stats_on = None
    try:
        with ctlb_lab.Lab() as the_lab:
            rig = Rig(the_lab, n=args.services, nodeport=args.nodeport, ipv6=args.ipv6, drop=args.drop,
                      mesh=args.mesh, gate=args.gate, affinity=args.affinity, meshed_client=args.meshed_client)
            try:
                if args.floor:
                    rig.attach_floor()
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
                if args.egress_ab:
                    # Without run-time accounting, which would add its own cost to every packet.
                    os.close(stats_fd)
                    stats_fd = None
                    ab_stats_on = pathlib.Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() != "0"
                    for r in range(args.rounds):
                        ab_rounds.append(egress_ab(rig, [p for p in phases if p in AB_PHASES], args.seconds,
                                                   first_attached=r % 2 == 0))
                        print(f"egress A/B round {r + 1}/{args.rounds}", flush=True)
            finally:
                rig.close()
    finally:
        if stats_fd is not None:
            os.close(stats_fd)
    rows = summarize(rounds, ipv6=args.ipv6)
    print(render(rows))
    ab_rows = summarize_ab(ab_rounds)
    if ab_rows:
        print(render_ab(ab_rows))
        if ab_stats_on:
            print("note: another process kept kernel.bpf_stats_enabled on during the A/B rounds")
    problems = [(ph, s["client"]) for r in rounds for ph, s in r.items()
                if s["client"].get("errors") or s["client"].get("source_mismatch")
                or s["client"].get("getpeername_wrong")]
    print(f"client-side problems: {problems if problems else 'none'}")
    if args.json:
        args.json.write_text(json.dumps({"label": args.label, "services": args.services, "rounds": rounds,
                                         "summary": rows, "egress_ab": {"rounds": ab_rounds, "summary": ab_rows},
                                         "argv": sys.argv[1:]}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
