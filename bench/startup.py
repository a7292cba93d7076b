"""From empty to programmed, end to end, through the real agent: the start-up figure of issue 3.

One round: a fresh cgroup and pin folder, the datapath installed (compile, load, attach: timed
apart, it does not depend on N), then the clock starts, the source is made (an API source lists,
a manifest source reads its files) and `agent.Agent` runs in a thread of this process until its
first sync has written the state file. That span, source start to datapath programmed and state
written, is the figure; the agent's own split of its first sync (read, semantics, program) comes
with it. Rounds are repeated and reported as median and range, since other work on the machine
makes single runs noisy.

Used by `bench/api_scale.py` (API source against the fake server) and `bench/program_scale.py`
(manifest files).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pathlib
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ctlb import agent, datapath
from ctlb.datapath import cgroup as cg
from ctlb.datapath import programs
from ctlb.sources import store

# Builds the agent's source over the store the agent reads; called once the clock has started.
SourceFactory = Callable[[store.ObjectStore], agent.Source]


@dataclass(frozen=True, slots=True)
class Round:
    install_s: float  # compile, load and attach the programs: before the clock starts
    start_to_programmed_s: float  # source made -> first sync done (maps written, state file written)
    start_to_sync_s: float  # source made -> first sync begun: the source's listing or reading
    cpu_s: float  # CPU time of this process (the agent's threads) over start_to_programmed_s
    timings_ms: dict[str, float]  # the agent's split of the first sync (read, semantics, program)
    services: int = 0

    @property
    def first_sync_s(self) -> float:
        """The first sync alone: planning what is left, the maps, the state (digest, file)."""
        return self.start_to_programmed_s - self.start_to_sync_s


@dataclass(slots=True)
class Summary:
    rounds: list[Round] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(r.start_to_programmed_s for r in self.rounds)

    def low(self) -> float:
        return min(r.start_to_programmed_s for r in self.rounds)

    def high(self) -> float:
        return max(r.start_to_programmed_s for r in self.rounds)

    def median_timing(self, key: str) -> float:
        return statistics.median(r.timings_ms.get(key, 0.0) for r in self.rounds)

    def line(self) -> str:
        began = statistics.median(r.start_to_sync_s for r in self.rounds)
        cpu = statistics.median(r.cpu_s for r in self.rounds)
        first_sync = statistics.median(r.first_sync_s for r in self.rounds)
        return (f"{self.median():.3f} s median ({self.low():.3f}-{self.high():.3f}, {len(self.rounds)} rounds), "
                f"agent CPU {cpu:.3f} s; "
                f"first sync began at {began:.3f} s and took {1000 * first_sync:.0f} ms: "
                f"read {self.median_timing('read_ms'):.0f} ms, "
                f"semantics {self.median_timing('semantics_ms'):.0f} ms, "
                f"program {self.median_timing('program_ms'):.0f} ms, "
                f"the rest (state digest, stale flows, state file) "
                f"{1000 * first_sync - self.median_timing('semantics_ms') - self.median_timing('program_ms'):.0f} ms")


@contextlib.contextmanager
def _fresh_node(tag: str) -> Iterator[tuple[pathlib.Path, pathlib.Path, pathlib.Path]]:
    """An empty cgroup, pin folder and run folder, removed afterwards whatever happened."""
    name = f"ctlb-startup-{tag}-{os.getpid()}"
    root = cg.cgroup2_mount() / name
    bpffs = pathlib.Path("/sys/fs/bpf") / name
    root.mkdir()
    try:
        with tempfile.TemporaryDirectory(prefix=f"{name}-") as run_dir:
            yield root, bpffs, pathlib.Path(run_dir)
    finally:
        programs.uninstall(bpffs)
        root.rmdir()


def one_round(make_source: SourceFactory, *, node_name: str, tag: str, timeout: float = 120.0) -> Round:
    """Installs a datapath on an empty node, then times the agent from source start to its first sync."""
    with _fresh_node(tag) as (root, bpffs, run_dir):
        t0 = time.perf_counter()
        dp = datapath.Datapath.install(bpffs=bpffs, cgroup=root, sizes=programs.MapSizes())
        install_s = time.perf_counter() - t0
        config = agent.AgentConfig(manifests=(), node_name=node_name, cgroup=root, bpffs=bpffs, run_dir=run_dir)
        # Each round starts from a collector state like a fresh agent's: the last round's frozen
        # objects are released first.
        gc.unfreeze()
        gc.collect()
        objects = store.ObjectStore()
        stop = threading.Event()
        cpu_started = time.process_time()
        started = time.perf_counter()
        source = make_source(objects)
        the_agent = _TimedAgent(config, source=source, objects=objects, dp=dp)
        thread = threading.Thread(target=the_agent.run, args=(stop,), name="ctlb-agent", daemon=True)
        thread.start()
        try:
            if not the_agent.first_sync.wait(timeout):
                raise RuntimeError(f"no first sync within {timeout} s")
            programmed = the_agent.first_sync_at - started
            began = the_agent.first_sync_began - started
            cpu = the_agent.first_sync_cpu - cpu_started
        finally:
            stop.set()
            thread.join(timeout=30)
            source.close()
            dp.close()
        return Round(install_s=install_s, start_to_programmed_s=programmed, start_to_sync_s=began, cpu_s=cpu,
                     timings_ms=the_agent.first_sync_timings, services=the_agent.store.count("Service"))


class _TimedAgent(agent.Agent):
    """The agent, noting when its first sync returned (maps written, state file written)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.first_sync = threading.Event()
        self.first_sync_began = 0.0
        self.first_sync_at = 0.0
        self.first_sync_cpu = 0.0
        self.first_sync_timings: dict[str, float] = {}  # a later sync would overwrite the state's

    def sync(self, *, read_ms: float = 0.0) -> bool:
        began = time.perf_counter()
        done = super().sync(read_ms=read_ms)
        if done and not self.first_sync.is_set():
            self.first_sync_began = began
            self.first_sync_at = time.perf_counter()
            self.first_sync_cpu = time.process_time()
            self.first_sync_timings = dict(self.state.last_sync_timings)
            self.first_sync.set()
        return done


def rounds(make_source: SourceFactory, *, node_name: str, tag: str, count: int,
           on_round: Callable[[int, Round], None] | None = None) -> Summary:
    summary = Summary()
    for i in range(count):
        result = one_round(make_source, node_name=node_name, tag=tag)
        summary.rounds.append(result)
        if on_round is not None:
            on_round(i, result)
    return summary
