"""Where an established-connection gap between ctlb and direct comes from: the pod or ctlb.

`bench.run` measures direct from one client pod (`cplain`, which the kube-proxy modes share) and
ctlb from another (`cctlb`, whose cgroup carries the programs). A ratio under 1 on established
traffic can then come from ctlb, or from the two pods not being alike. This runs three arms on
the same lab node, alternating within every round (their order rotates from round to round):

    plain-direct  cplain to a backend's own address (what bench.run calls direct)
    ctlb-direct   cctlb to the same address: ctlb's programs attached, no Service on the path
    ctlb-service  cctlb to the Service address (what bench.run calls ctlb)

ctlb-service / ctlb-direct is what ctlb costs an established flow; ctlb-direct / plain-direct
is the difference between the pods. Phases: TCP request/response, UDP request/response and
iperf3, as bench.run measures them (client on CPU 0, servers on CPU 1). With --swap-pods the
programs go on the pod made as `cplain` and the other pod plays plain: a pod-against-pod gap
that follows the programs is theirs, one that stays with the pod is the pod's.

    sudo .venv/bin/python -m bench.established_ab --rounds 9 --seconds 3 [--swap-pods]
    sudo .venv/bin/python -m bench.established_ab --rounds 100 --seconds 1 --phases iperf

While it runs, BPF run-time stats are on, and every sample of a ctlb arm counts the runs of
ctlb's programs it caused, by hook, next to the bytes it moved: runs come from connects (and a
UDP socket's sends and receives), never from an established TCP flow's packets.

Each quotient is reported as the median of the per-round quotients with their range, and as their
geometric mean with a 95% bootstrap confidence interval: a target such as "within 2%" is met when
the whole interval lies within 0.98-1.02, which many short rounds can show where a few long ones
cannot (round-to-round noise on identical paths is 5-20% on this VM).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from bench import loadgen, program_cost, run, topology
from ctlb import lab as ctlb_lab
from ctlb.datapath import libbpf

ARMS = ("plain-direct", "ctlb-direct", "ctlb-service")
PHASES = {"rr": "transactions/s", "udp": "transactions/s", "iperf": "Gbit/s"}
# Quotients reported: (numerator arm, denominator arm, what it isolates).
RATIOS = (("ctlb-service", "ctlb-direct", "ctlb on the path, same pod"),
          ("ctlb-direct", "plain-direct", "pod against pod, no Service"),
          ("ctlb-service", "plain-direct", "as bench.run reports ctlb / direct"))


def arm_target(node: topology.BenchNode, arm: str) -> tuple[ctlb_lab.Pod, topology.Targets]:
    """The client pod and the addresses an arm dials."""
    client = node.plain_client if arm == "plain-direct" else node.ctlb_client
    mode = topology.Mode.CTLB if arm == "ctlb-service" else topology.Mode.DIRECT
    return client, node.targets(mode, 1)


def measure_phase(node: topology.BenchNode, arm: str, phase: str, seconds: float) -> float:
    client, t = arm_target(node, arm)
    cpu = topology.CLIENT_CPU
    if phase == "rr":
        return loadgen.tcp_rr(client, host=t.first, port=t.port(topology.PORT_RR), seconds=seconds, cpu=cpu)["rate"]
    if phase == "udp":
        return loadgen.udp_rr(client, host=t.first, port=t.port(topology.PORT_UDP), seconds=seconds, cpu=cpu)["rate"]
    return run.iperf(client, host=t.iperf, port=t.port(topology.PORT_IPERF), seconds=seconds)["gbit_s"]


def program_runs(node: topology.BenchNode) -> dict[str, int]:
    """run_cnt of each of ctlb's programs (needs BPF run-time stats on)."""
    return {hook: cnt for hook, (_, cnt) in program_cost.prog_stats(node.bpffs).items()}


def measure_counted(node: topology.BenchNode, arm: str, phase: str, seconds: float) -> tuple[float, dict[str, int]]:
    """A phase's figure in an arm, and the runs of ctlb's programs it caused, by hook (none
    counted for the plain pod, which no program of ctlb's serves)."""
    if arm == "plain-direct":
        return measure_phase(node, arm, phase, seconds), {}
    before = program_runs(node)
    value = measure_phase(node, arm, phase, seconds)
    after = program_runs(node)
    return value, {hook: n - before.get(hook, 0) for hook, n in after.items() if n != before.get(hook, 0)}


def one_round(node: topology.BenchNode, r: int, seconds: float, phases: list[str],
              progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Every phase, each in every arm back to back, the arms' order rotated by the round. Runs of
    ctlb's programs are under "<phase>:runs"."""
    order = ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]
    sample: dict[str, dict[str, Any]] = {}
    for phase in phases:
        measured = {arm: measure_counted(node, arm, phase, seconds) for arm in order}
        sample[phase] = {arm: measured[arm][0] for arm in ARMS}
        sample[f"{phase}:runs"] = {arm: measured[arm][1] for arm in ARMS}
        progress(f"round {r + 1} {phase}: " + ", ".join(f"{a} {sample[phase][a]:.2f}" for a in ARMS))
    return sample


BOOTSTRAP_RESAMPLES = 10_000


def geomean_interval(quotients: list[float], *, seed: int = 1) -> tuple[float, float, float]:
    """The geometric mean of the quotients and a 95% percentile-bootstrap interval around it
    (seeded: the same rounds give the same interval)."""
    logs = [math.log(q) for q in quotients]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(BOOTSTRAP_RESAMPLES))
    low, high = means[int(0.025 * BOOTSTRAP_RESAMPLES)], means[int(0.975 * BOOTSTRAP_RESAMPLES) - 1]
    return math.exp(statistics.fmean(logs)), math.exp(low), math.exp(high)


def summarize(rounds: list[dict[str, dict[str, Any]]], seconds: float) -> list[dict[str, Any]]:
    rows = []
    for phase, unit in PHASES.items():
        if not all(phase in r for r in rounds):
            continue
        row: dict[str, Any] = {"phase": phase, "unit": unit}
        for arm in ARMS:
            row[arm] = statistics.median(r[phase][arm] for r in rounds)
        for num, den, _ in RATIOS:
            # Per-round quotients: the arms of one round ran back to back, under the same drift.
            q = [r[phase][num] / r[phase][den] for r in rounds if r[phase][den]]
            mean, low, high = geomean_interval(q)
            row[f"{num}/{den}"] = {"median": statistics.median(q), "min": min(q), "max": max(q),
                                   "geomean": mean, "ci95_low": low, "ci95_high": high}
        row["runs"] = summarize_runs(rounds, phase, seconds)
        rows.append(row)
    return rows


def summarize_runs(rounds: list[dict[str, dict[str, Any]]], phase: str, seconds: float) -> dict[str, Any]:
    """For each ctlb arm: the runs of ctlb's programs a sample caused, by hook (the largest over
    all samples) and in all, and for iperf the runs per GB moved."""
    out: dict[str, Any] = {}
    for arm in ARMS[1:]:
        counted = [r[f"{phase}:runs"][arm] for r in rounds if f"{phase}:runs" in r]
        if not counted:
            continue
        hooks = sorted({hook for c in counted for hook in c})
        total = sum(sum(c.values()) for c in counted)
        entry: dict[str, Any] = {"max_by_hook": {h: max(c.get(h, 0) for c in counted) for h in hooks},
                                 "total": total, "samples": len(counted)}
        if PHASES[phase] == "Gbit/s":
            gigabytes = sum(r[phase][arm] for r in rounds) * seconds / 8
            entry["gigabytes"] = gigabytes
            entry["runs_per_gb"] = total / gigabytes if gigabytes else None
        out[arm] = entry
    return out


def render(rows: list[dict[str, Any]], rounds: int) -> str:
    head = "| phase | " + " | ".join(ARMS) + " | " + " | ".join(f"{n} / {d} ({why})" for n, d, why in RATIOS) + " |"
    out = [head, "|" + "---|" * (1 + len(ARMS) + len(RATIOS))]
    for row in rows:
        arms = " | ".join(f"{row[a]:,.2f}" if row["unit"] == "Gbit/s" else f"{row[a]:,.0f}" for a in ARMS)
        ratios = " | ".join(
            "{median:.3f} ({min:.3f}–{max:.3f}); {geomean:.3f} [{ci95_low:.3f}, {ci95_high:.3f}]".format(
                **row[f"{n}/{d}"]) for n, d, _ in RATIOS)
        out.append(f"| {row['phase']} ({row['unit']}) | {arms} | {ratios} |")
    out.append(f"\nmedians of {rounds} rounds; quotients per round: median (min–max); "
               f"geometric mean [95% bootstrap interval]\n")
    out.append("| phase | arm | runs of ctlb's programs, all samples | most in one sample, by hook | GB moved | runs per GB |")
    out.append("|---|---|---|---|---|---|")
    for row in rows:
        for arm, runs in row["runs"].items():
            by_hook = ", ".join(f"{h} {n}" for h, n in runs["max_by_hook"].items()) or "none"
            gb = f"{runs['gigabytes']:,.0f}" if "gigabytes" in runs else "-"
            per_gb = f"{runs['runs_per_gb']:.2f}" if runs.get("runs_per_gb") is not None else "-"
            out.append(f"| {row['phase']} | {arm} | {runs['total']:,} | {by_hook} | {gb} | {per_gb} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.established_ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per sample")
    ap.add_argument("--swap-pods", action="store_true", help="ctlb's programs on the pod made as cplain")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    ap.add_argument("--json", type=pathlib.Path, help="write the raw rounds and the summary here")
    args = ap.parse_args(argv)
    phases = args.phases.split(",")
    if unknown := set(phases) - set(PHASES):
        ap.error(f"unknown phases: {', '.join(sorted(unknown))}")
    loadgen.build()
    ctlb_lab.sweep()
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="ctlb-ab-") as tmp, ctlb_lab.Lab() as the_lab:
        node = topology.BenchNode(the_lab, pathlib.Path(tmp))
        if args.swap_pods:
            node.ctlb_client, node.plain_client = node.plain_client, node.ctlb_client
        try:
            node.load_services(1)
            node.start_agent()
            stats_fd = libbpf.enable_stats()
            try:
                for r in range(args.rounds):
                    rounds.append(one_round(node, r, args.seconds, phases, lambda line: print(line, flush=True)))
            finally:
                os.close(stats_fd)
        finally:
            node.close()
    rows = summarize(rounds, args.seconds)
    print(render(rows, len(rounds)))
    if args.json:
        args.json.write_text(json.dumps({"swap_pods": args.swap_pods, "rounds": rounds, "summary": rows, "argv": sys.argv[1:]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
