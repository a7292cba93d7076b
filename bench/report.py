"""Turns a benchmark run's raw figures into the ratio table and the plots."""

from __future__ import annotations

import pathlib
import statistics
from collections.abc import Callable, Sequence
from typing import Any

MODES = ("direct", "ctlb", "iptables", "nftables")

# (label, how to read one round's sample of one mode, higher is better)
METRICS: list[tuple[str, Callable[[dict[str, Any]], float | None], bool]] = [
    ("TCP connections/s, first Service", lambda s: s["crr_first"]["rate"], True),
    ("TCP connections/s, last Service", lambda s: s["crr_last"]["rate"], True),
    ("connect p50 µs, first Service", lambda s: s["crr_first"]["p50_us"], False),
    ("connect p99 µs, first Service", lambda s: s["crr_first"]["p99_us"], False),
    ("connect p99 µs, last Service", lambda s: s["crr_last"]["p99_us"], False),
    ("TCP request/response /s (established)", lambda s: s["rr"]["rate"], True),
    ("UDP request/response /s", lambda s: s["udp_rr"]["rate"], True),
    ("TCP throughput Gbit/s", lambda s: s["iperf"]["gbit_s"], True),
    ("CPU s per GB moved", lambda s: s["iperf"]["cpu_s_per_gb"], False),
    ("endpoint change → first connection, ms", lambda s: 1000 * s["change"]["first_connection_s"]
     if "change" in s else None, False),
]


def values(size: dict[str, Any], mode: str, read: Callable[[dict[str, Any]], float | None]) -> list[float]:
    out = []
    for rnd in size["rounds"]:
        v = read(rnd[mode])
        if v is not None:
            out.append(float(v))
    return out


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def cell(xs: Sequence[float]) -> str:
    """Median, with the range over rounds when there is more than one."""
    if not xs:
        return "–"
    m = statistics.median(xs)
    text = _num(m)
    if len(xs) > 1:
        text += f" ({_num(min(xs))}–{_num(max(xs))})"
    return text


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "–"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Run {results['date']}, kernel {results['machine']['kernel']}, {results['machine']['cpus']} CPUs "
             f"({results['machine']['cpu_model']}), {results['rounds']} round(s) of "
             f"{results['seconds_per_sample']} s samples, iptables backend {results['iptables_backend']}. "
             "Cells: median (min–max over rounds).", ""]
    for size in results["sizes"]:
        lines += [f"### N = {size['n']} Services × 4 endpoints", "",
                  "| metric | direct | ctlb | iptables | nftables | ctlb / direct | ctlb / iptables | ctlb / nftables |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, read, _ in METRICS:
            med = {m: median(values(size, m, read)) for m in MODES}
            lines.append(f"| {label} | " + " | ".join(cell(values(size, m, read)) for m in MODES)
                         + f" | {ratio(med['ctlb'], med['direct'])} | {ratio(med['ctlb'], med['iptables'])}"
                         f" | {ratio(med['ctlb'], med['nftables'])} |")
        lines += ["", _control_table(size), "", _bpf_table(size), "", _memory_line(size), ""]
    return "\n".join(lines)


def _control_table(size: dict[str, Any]) -> str:
    c = size["control"]
    ctlb = c["ctlb"]
    # End to end when the agent's log gave it: read, plan, write the maps and the state file.
    program_s = ctlb.get("from_empty_s") or (
        ctlb.get("read_ms", 0) + ctlb.get("semantics_ms", 0) + ctlb.get("program_ms", 0)) / 1000
    rows = ["| control plane | ctlb | iptables-restore | nft -f |", "|---|---|---|---|",
            f"| program N Services from empty, s (ctlb: from YAML manifests, read to first sync done) | {program_s:.3f} (maps only {ctlb.get('program_ms', 0) / 1000:.3f}) "
            f"| {c['iptables']['wall_s']:.3f} | {c['nftables']['wall_s']:.3f} |",
            f"| CPU s for it | {ctlb['cpu_s']:.2f} (whole agent start, incl. compile) | {c['iptables']['cpu_s']:.3f} "
            f"| {c['nftables']['cpu_s']:.3f} |"]
    changes = {m: [r[m]["change"] for r in size["rounds"] if "change" in r[m]] for m in ("ctlb", "iptables", "nftables")}
    if changes["ctlb"]:
        agent_ms = [sum(ch["agent_timings_ms"].values()) for ch in changes["ctlb"]]
        prog_ms = [ch["agent_timings_ms"].get("program_ms", 0) for ch in changes["ctlb"]]
        ipt = [1000 * ch["restore_wall_s"] for ch in changes["iptables"]]
        nft = [1000 * ch["restore_wall_s"] for ch in changes["nftables"]]
        rows.append(f"| one endpoint change applied, ms | {cell(agent_ms)} (maps only {cell(prog_ms)}) "
                    f"| {cell(ipt)} | {cell(nft)} |")
    return "\n".join(rows)


def _bpf_table(size: dict[str, Any]) -> str:
    cost = size.get("bpf_cost", {})
    rows = ["| socket program | calls | ns per call (tracing off) | tracing on (socket-trace reading) |",
            "|---|---|---|---|"]
    lost = 0
    for hook, c in sorted(cost.items()):
        lost = max(lost, c.get("trace_lost") or 0)
        rows.append(f"| {hook} | {c['calls']} | {_ns(c['ns_per_call'])} | {_ns(c.get('ns_per_call_traced'))} |")
    if cost:
        rows.append(f"\nDecisions socket-trace could not keep up with while traced: {lost}.")
    return "\n".join(rows)


def _ns(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def _memory_line(size: dict[str, Any]) -> str:
    """Map bytes as the kernel accounts them. The frontend and backend tables are preallocated
    arrays, so their bytes are fixed by the configured sizes; what N changes is the entries used."""
    mem = size.get("memory", {})
    parts = []
    for name, now in sorted(mem.get("maps", {}).items()):
        entries = now.get("entries", 0)
        text = f"{name} {(now.get('bytes') or 0) / 2**20:.1f} MiB (preallocated), {entries} entries in use"
        parts.append(text)
    return f"Memory: {'; '.join(parts)}; agent RSS {mem.get('agent_rss_mib', 0):.0f} MiB."


def plots(results: dict[str, Any], out: pathlib.Path) -> None:
    """rate.png and latency.png against N, one line per mode (median, with min–max bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [s["n"] for s in results["sizes"]]
    for name, metric, ylabel in (
        ("rate", METRICS[1], "TCP connections/s (last Service)"),
        ("latency", METRICS[4], "connect p99 µs (last Service)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in MODES:
            meds, lows, highs = [], [], []
            for size in results["sizes"]:
                xs = values(size, mode, metric[1])
                m = median(xs) or 0.0
                meds.append(m)
                lows.append(m - min(xs, default=m))
                highs.append(max(xs, default=m) - m)
            ax.errorbar(ns, meds, yerr=[lows, highs], marker="o", capsize=3, label=mode)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("Services (N)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs N")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
