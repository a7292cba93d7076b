"""The first pass from empty maps, written in batches (BPF_MAP_UPDATE_BATCH), in real pinned maps:
it leaves exactly what writing one entry at a time leaves, a full map fails the service ports
that did not fit and nothing else, and a restarted reconciler adopts what it wrote.

The maps are made by compiling and loading the real programs into a pin folder of the test's
own; nothing is attached, since these tests read the maps, not traffic (test_ctlb.py sends
traffic through a datapath that the agent programmed this way from empty).
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import itertools
import os
import pathlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from ctlb import desired, model
from ctlb.datapath import libbpf, maps, programs, reconcile, tables

TCP = model.Protocol.TCP
_counter = itertools.count()


@dataclass
class PinnedDatapath:
    """Loaded programs and their pinned maps, nothing attached."""

    bpffs: pathlib.Path
    bpf: object
    pinned: dict[str, maps.PinnedMap]

    def tables(self) -> dict[int, tables.FamilyTables]:
        return tables.kernel_tables(self.pinned)

    def raw(self, name: str) -> bytes:
        return bytes(self.pinned[name].read_all())

    def close(self) -> None:
        for m in self.pinned.values():
            m.close()
        self.pinned = {}
        cleanup = getattr(self.bpf, "cleanup", None)
        if cleanup is not None:
            cleanup()
            self.bpf = None


@pytest.fixture
def make_datapath(require_root: None, require_bcc: None) -> Iterator[Callable[..., PinnedDatapath]]:
    """Makes pinned map sets of the given sizes; every one is removed after the test."""
    made: list[PinnedDatapath] = []

    def make(**sizes: int) -> PinnedDatapath:
        bpffs = pathlib.Path(f"/sys/fs/bpf/ctlb-test-batch-{os.getpid()}-{next(_counter)}")
        programs.ensure_bpffs_dir(bpffs)
        dp = PinnedDatapath(bpffs=bpffs, bpf=None, pinned={})
        made.append(dp)
        dp.bpf, _ = programs.compile_and_load(bpffs, programs.MapSizes(**sizes))
        dp.pinned = maps.open_pinned(bpffs, maps.layouts_of(dp.bpf))
        return dp

    try:
        yield make
    finally:
        for dp in made:
            try:
                dp.close()
            finally:
                programs.uninstall(dp.bpffs)


def service_port(i: int, *, family: int = 4, frontends: int = 1, backends: int = 4,
                 affinity: int | None = None) -> desired.ServicePortState:
    """Service port i: `frontends` addresses, `backends` backends, all its own."""
    if family == 4:
        fe_base, be_base = ipaddress.ip_address("10.96.0.0") + 16 * i, ipaddress.ip_address("10.128.0.0") + 16 * i
    else:
        fe_base, be_base = ipaddress.ip_address("fd00::") + 16 * i, ipaddress.ip_address("fd00:10::") + 16 * i
    return desired.ServicePortState(
        name=desired.ServicePortName("bench", f"svc-{i:04d}", "http", TCP,
                                     model.IPFamily.IPv4 if family == 4 else model.IPFamily.IPv6),
        frontends={desired.Frontend(fe_base + k, 80, TCP): desired.FrontendKind.CLUSTER_IP for k in range(frontends)},
        backends=tuple(sorted(desired.Backend(be_base + k, 8080) for k in range(backends))),
        affinity_timeout=affinity,
    )


def plan(*sps: desired.ServicePortState) -> desired.DesiredState:
    return desired.DesiredState(service_ports={s.name: s for s in sps})


def mixed_plan(n: int) -> desired.DesiredState:
    """Both families, one to three frontends, zero to five backends, some with affinity."""
    return plan(*(service_port(i, family=6 if i % 5 == 0 else 4, frontends=1 + i % 3, backends=i % 6,
                               affinity=30 if i % 7 == 0 else None) for i in range(n)))


LB_MAPS = (*maps.FRONTENDS.values(), *maps.BACKENDS.values())


def members(dp: PinnedDatapath) -> set[bytes]:
    return {bytes(key) for name in maps.MEMBERS.values() for key, _ in dp.pinned[name].items()}


def test_a_batched_pass_from_empty_writes_the_same_bytes_as_one_entry_at_a_time(make_datapath) -> None:
    want = mixed_plan(300)
    batched, single = make_datapath(), make_datapath()
    out_batched = reconcile.Reconciler(batched.tables()).apply(want)
    out_single = reconcile.Reconciler(single.tables(), batch_from_empty=False).apply(want)
    assert out_batched.problems == out_single.problems == ()
    assert out_batched.writes == out_single.writes
    for name in LB_MAPS:
        assert batched.raw(name) == single.raw(name), f"{name} differs"
    assert members(batched) == members(single) and members(batched)


def test_a_batched_pass_from_empty_reads_back_as_the_desired_state(make_datapath) -> None:
    want = mixed_plan(300)
    dp = make_datapath()
    reconcile.Reconciler(dp.tables()).apply(want)
    found = reconcile.read_programmed(dp.tables())
    assert reconcile.datapath_view(found.frontends, found.sets, found.source_ranges) == reconcile.desired_view(want)
    assert sum(found.slots.values()) == sum(len(b) for b in found.sets.values()), "no stray backend slot"


def test_a_reconciler_restarted_after_a_batched_pass_adopts_it_and_writes_nothing(make_datapath) -> None:
    want = mixed_plan(300)
    dp = make_datapath()
    first = reconcile.Reconciler(dp.tables())
    first.apply(want)
    again = reconcile.Reconciler(dp.tables())
    assert again.programmed.frontends == first.programmed.frontends
    assert again.programmed.sets == first.programmed.sets
    assert again.programmed.members == first.programmed.members
    out = again.apply(want)
    assert (out.problems, out.writes, out.deletes) == ((), 0, 0)


def test_a_batched_pass_that_does_not_fit_reports_each_service_port_left_out_and_programs_the_rest(
        make_datapath) -> None:
    # 24 backend slots: five sets of four fit, and one of two more after them.
    dp = make_datapath(frontends=64, backends=24)
    want = plan(*(service_port(i) for i in range(8)))
    out = reconcile.Reconciler(dp.tables()).apply(want)
    left_out = [f"Service bench/svc-{i:04d}" for i in range(6, 8)]
    assert [p.ref for p in out.problems] == left_out
    assert all("full" in p.reason for p in out.problems)
    found = reconcile.read_programmed(dp.tables())
    fitted = plan(*(service_port(i) for i in range(6)))
    assert reconcile.datapath_view(found.frontends, found.sets, found.source_ranges) == reconcile.desired_view(fitted)
    assert sum(found.slots.values()) == 24


def test_a_member_the_kernel_refuses_in_a_batch_fails_its_service_port_alone_and_leaves_no_trace_of_it(
        make_datapath) -> None:
    """Another writer filled the members hash behind the reconciler's back: the kernel stops the
    batch at the first member that does not fit. That service port, and each after it whose
    members do not fit, is reported; none of their frontends is written and their backend slots
    are cleared; the service ports before it are programmed whole."""
    dp = make_datapath(frontends=64, backends=16)  # the members hash holds 16 entries
    t = dp.tables()
    r = reconcile.Reconciler(t)
    foreign = [tables.MemberKey(9000 + k, desired.Backend(ipaddress.ip_address(f"192.0.2.{k}"), 1)) for k in range(11)]
    for key in foreign:
        t[4].members.put(key, True)
    # Four service ports of two backends with affinity: eight members, five free entries.
    want = plan(*(service_port(i, backends=2, affinity=60) for i in range(4)))
    out = r.apply(want)
    assert [p.ref for p in out.problems] == ["Service bench/svc-0002", "Service bench/svc-0003"]
    assert all("full" in p.reason for p in out.problems)
    found = reconcile.read_programmed(dp.tables())
    fitted = plan(*(service_port(i, backends=2, affinity=60) for i in range(2)))
    assert reconcile.datapath_view(found.frontends, found.sets, found.source_ranges) == reconcile.desired_view(fitted)
    assert sum(found.slots.values()) == 4, "the sets of the service ports left out are cleared"
    assert r.view() == reconcile.desired_view(fitted), "the reconciler's shadow says the same"
    assert len(members(dp)) == 16

    for key in foreign:
        t[4].members.delete(key)
    out = r.apply(want)
    assert out.problems == ()
    found = reconcile.read_programmed(dp.tables())
    assert reconcile.datapath_view(found.frontends, found.sets, found.source_ranges) == reconcile.desired_view(want)


def test_a_batch_the_kernel_stops_part_way_leaves_the_entries_after_it_untouched(make_datapath) -> None:
    """BPF_MAP_UPDATE_BATCH writes in order and stops at the first entry that fails (here an
    index past the array's end): put_many says how many it wrote, and nothing after is written."""
    dp = make_datapath(backends=8)
    table = dp.tables()[4].backends
    slot = tables.BackendSlot(7, desired.Backend(ipaddress.ip_address("10.128.0.1"), 8080))
    assert table.put_many([(0, slot), (1, slot), (8, slot), (2, slot)]) == 2
    assert [idx for idx, _ in table.items()] == [0, 1]
    assert table.get(0) == slot


def test_a_batch_the_kernel_refuses_before_its_first_entry_counts_as_nothing_written(make_datapath) -> None:
    """An error the kernel finds before it looks at an entry (here: the fd is no map) leaves the
    count it was given as it was, which must not read as all written."""
    dp = make_datapath()
    backends = dp.pinned[maps.BACKENDS[4]]
    keys = (ct.c_uint32 * 2)(0, 1)
    leaves = (backends.layout.leaf * 2)()
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        written, error = libbpf.map_update_batch(fd, keys, leaves, 2)
    finally:
        os.close(fd)
    assert written == 0 and error is not None
    assert backends.put_batch(keys, leaves, 2) == (2, None)
