"""The reconciler's diff: what it writes, in which order, and what it does when a map is full;
and the tables it writes through: the backend ranges and the open-addressed frontend table."""

from __future__ import annotations

import ctypes as ct
import dataclasses
import ipaddress
import random
import sys

import msgspec
import pytest

from ctlb import desired, errors, model
from ctlb.datapath import reconcile, tables

TCP = model.Protocol.TCP


def spn(name: str, family: model.IPFamily = model.IPFamily.IPv4) -> desired.ServicePortName:
    return desired.ServicePortName("default", name, "http", TCP, family)


def fe(addr: str, port: int = 80) -> desired.Frontend:
    return desired.Frontend(ipaddress.ip_address(addr), port, TCP)


def be(addr: str, port: int = 8080) -> desired.Backend:
    return desired.Backend(ipaddress.ip_address(addr), port)


def sp(name: str, frontends: list[str], backends: list[str], *, affinity: int | None = None,
       drop: bool = False) -> desired.ServicePortState:
    fam = model.IPFamily.IPv6 if ":" in frontends[0] else model.IPFamily.IPv4
    return desired.ServicePortState(
        name=spn(name, fam),
        frontends={fe(a): desired.FrontendKind.CLUSTER_IP for a in frontends},
        backends=tuple(sorted(be(b) for b in backends)),
        affinity_timeout=affinity,
        drop=drop,
    )


def state(*sps: desired.ServicePortState) -> desired.DesiredState:
    return desired.DesiredState(service_ports={s.name: s for s in sps})


class LoggingTable(tables.MemoryTable):
    """Records every write and delete, to check the order of operations."""

    def __init__(self, name: str, max_entries: int, journal: list) -> None:
        super().__init__(name, max_entries)
        self.journal = journal

    def put(self, key, value) -> None:
        super().put(key, value)
        self.journal.append(("put", self.name, key, value))

    def delete(self, key) -> bool:
        self.journal.append(("delete", self.name, key, None))
        return super().delete(key)


def logging_tables(journal: list, *, frontends_max: int = 100, backends_max: int = 100) -> dict[int, tables.FamilyTables]:
    return {
        fam: tables.FamilyTables(
            frontends=LoggingTable(f"ctlb_fe{fam}", frontends_max, journal),
            backends=LoggingTable(f"ctlb_be{fam}", backends_max, journal),
            members=LoggingTable(f"ctlb_member{fam}", backends_max, journal),
            source_ranges=LoggingTable(f"ctlb_lb_src{fam}", frontends_max, journal),
        )
        for fam in (4, 6)
    }


def test_empty_to_state_programs_every_frontend_with_its_backends() -> None:
    r = reconcile.Reconciler(tables.memory_tables())
    want = state(sp("web", ["10.96.0.1", "192.0.2.10"], ["10.244.0.2", "10.244.0.3"]),
                 sp("v6", ["fd00::1"], ["fd00:10:244::2"]))
    out = r.apply(want)
    assert out.problems == ()
    assert r.view() == reconcile.desired_view(want)


def test_same_state_twice_writes_nothing() -> None:
    r = reconcile.Reconciler(tables.memory_tables())
    want = state(sp("web", ["10.96.0.1"], ["10.244.0.2", "10.244.0.3"]))
    r.apply(want)
    out = r.apply(want)
    assert (out.writes, out.deletes) == (0, 0)


def test_frontends_of_one_service_port_share_one_backend_set() -> None:
    t = tables.memory_tables()
    reconcile.Reconciler(t).apply(state(sp("web", ["10.96.0.1", "192.0.2.10"], ["10.244.0.2"])))
    values = list(t[4].frontends.data.values())
    assert values[0].set_id == values[1].set_id
    assert len(t[4].backends.data) == 1


def test_backend_change_keeps_service_id_and_drops_old_set() -> None:
    t = tables.memory_tables()
    r = reconcile.Reconciler(t)
    r.apply(state(sp("web", ["10.96.0.1"], ["10.244.0.2", "10.244.0.3"])))
    before = t[4].frontends.data[fe("10.96.0.1")]
    r.apply(state(sp("web", ["10.96.0.1"], ["10.244.0.3", "10.244.0.4"])))
    after = t[4].frontends.data[fe("10.96.0.1")]
    assert after.svc_id == before.svc_id and after.set_id != before.set_id
    assert {s.set_id for s in t[4].backends.data.values()} == {after.set_id}
    assert r.view()["10.96.0.1:80/TCP"]["backends"] == ["10.244.0.3:8080", "10.244.0.4:8080"]


def test_frontend_only_ever_points_at_a_complete_set() -> None:
    """Replays the journal: at every frontend write the range it names holds its whole set, and
    no slot a frontend points at is overwritten or cleared while it does."""
    journal: list = []
    r = reconcile.Reconciler(logging_tables(journal))
    r.apply(state(sp("web", ["10.96.0.1", "10.96.0.2"], ["10.244.0.2", "10.244.0.3"])))
    r.apply(state(sp("web", ["10.96.0.1", "10.96.0.2"], ["10.244.0.4", "10.244.0.5", "10.244.0.6"])))
    r.apply(state(sp("web", ["10.96.0.1"], ["10.244.0.4"])))
    r.apply(state(sp("web", ["10.96.0.1"], ["10.244.0.7", "10.244.0.8"]), sp("db", ["10.96.0.3"], ["10.244.0.9"])))
    slots: dict[int, int] = {}  # slot -> set id
    pointing: dict[desired.Frontend, tables.FrontendValue] = {}

    def in_use(idx: int) -> bool:
        return any(v.count and v.start <= idx < v.start + v.count for v in pointing.values())

    for op, name, key, value in journal:
        if name.startswith("ctlb_be"):
            assert not in_use(key), f"{op} of slot {key} while a frontend points at it"
            if op == "put":
                slots[key] = value.set_id
            else:
                slots.pop(key, None)
        elif name.startswith("ctlb_fe"):
            if op == "put":
                assert all(slots.get(value.start + i) == value.set_id for i in range(value.count)), \
                    "pointed at a partial set"
                pointing[key] = value
            else:
                pointing.pop(key)


def test_sets_take_disjoint_ranges_and_freed_ranges_are_reused() -> None:
    t = tables.memory_tables(backends_max=6)
    r = reconcile.Reconciler(t)
    r.apply(state(sp("a", ["10.96.0.1"], ["10.244.0.2", "10.244.0.3"]), sp("b", ["10.96.0.2"], ["10.244.0.4"])))
    a, b = t[4].frontends.data[fe("10.96.0.1")], t[4].frontends.data[fe("10.96.0.2")]
    assert {a.start, a.start + 1}.isdisjoint({b.start})
    # a changes three times in a table of 6 slots: each new set goes where an old one was freed.
    for backends in (["10.244.0.5", "10.244.0.6"], ["10.244.0.7", "10.244.0.8"], ["10.244.0.2", "10.244.0.9"]):
        out = r.apply(state(sp("a", ["10.96.0.1"], backends), sp("b", ["10.96.0.2"], ["10.244.0.4"])))
        assert out.problems == ()
    assert len(t[4].backends.data) == 3
    assert r.view()["10.96.0.1:80/TCP"]["backends"] == ["10.244.0.2:8080", "10.244.0.9:8080"]

def test_removed_service_leaves_no_entries() -> None:
    t = tables.memory_tables()
    r = reconcile.Reconciler(t)
    r.apply(state(sp("web", ["10.96.0.1"], ["10.244.0.2"], affinity=60)))
    r.apply(state())
    assert (t[4].frontends.data, t[4].backends.data, t[4].members.data) == ({}, {}, {})


def test_no_backends_is_a_frontend_with_count_zero() -> None:
    t = tables.memory_tables()
    reconcile.Reconciler(t).apply(state(sp("web", ["10.96.0.1"], [])))
    assert t[4].frontends.data[fe("10.96.0.1")].count == 0


def test_a_service_port_that_drops_is_a_frontend_with_count_zero_and_the_drop_flag() -> None:
    t = tables.memory_tables()
    r = reconcile.Reconciler(t)
    want = state(sp("web", ["10.96.0.1"], [], drop=True))
    r.apply(want)
    value = t[4].frontends.data[fe("10.96.0.1")]
    assert (value.count, value.flags) == (0, tables.LB_F_DROP)
    assert r.view() == reconcile.desired_view(want) == {"10.96.0.1:80/TCP": {"backends": [], "affinity": None, "drop": True}}


def test_view_of_a_frontend_that_refuses_has_no_drop_key() -> None:
    """Entries of frontends that do not drop keep the shape (and digest) they had before drops."""
    assert reconcile.desired_view(state(sp("web", ["10.96.0.1"], []))) == {
        "10.96.0.1:80/TCP": {"backends": [], "affinity": None}}


@pytest.mark.parametrize(("start", "then"), [
    (dict(backends=[], drop=True), dict(backends=["10.244.0.2"])),
    (dict(backends=[], drop=True), dict(backends=[])),
    (dict(backends=["10.244.0.2"]), dict(backends=[], drop=True)),
    (dict(backends=[]), dict(backends=[], drop=True)),
], ids=["drop-to-backends", "drop-to-refuse", "backends-to-drop", "refuse-to-drop"])
def test_a_frontend_moves_between_drop_refuse_and_backends(start: dict, then: dict) -> None:
    r = reconcile.Reconciler(tables.memory_tables())
    r.apply(state(sp("web", ["10.96.0.1"], **start)))
    want = state(sp("web", ["10.96.0.1"], **then))
    r.apply(want)
    assert r.view() == reconcile.desired_view(want)
    assert r.needs_egress() == then.get("drop", False)


@pytest.mark.parametrize(("external", "cluster_ip_drops", "node_port_drops"), [
    (["10.244.0.3"], True, False),
    (None, True, True),
], ids=["external-set-of-its-own", "external-shares-the-cluster-ip-set"])
def test_drop_applies_to_the_frontends_that_take_the_cluster_ip_set(
        external: list[str] | None, cluster_ip_drops: bool, node_port_drops: bool) -> None:
    """iTP Local with endpoints elsewhere: the ClusterIP drops; a node port has the cluster-wide
    set (kube-proxy's short-circuit), unless it shares the ClusterIP's."""
    t = tables.memory_tables()
    want = state(msgspec.structs.replace(local_only("web", backends=[], external=external), drop=True))
    reconcile.Reconciler(t).apply(want)
    flags = {str(f): bool(v.flags & tables.LB_F_DROP) for f, v in t[4].frontends.data.items()}
    assert flags == {"10.96.0.1:80/TCP": cluster_ip_drops, "172.18.0.3:30080/TCP": node_port_drops}


class RecordingEgress:
    """Stands in for the on-demand egress program: records when it is asked to be attached."""

    def __init__(self, journal: list) -> None:
        self.journal = journal

    def ensure(self) -> None:
        self.journal.append(("ensure", "egress", None, None))


def test_egress_program_is_attached_before_the_first_frontend_that_drops_is_written() -> None:
    journal: list = []
    r = reconcile.Reconciler(logging_tables(journal), egress=RecordingEgress(journal))
    r.apply(state(sp("a", ["10.96.0.1"], ["10.244.0.2"])))
    assert [op for op, *_ in journal if op == "ensure"] == [], "nothing drops yet"
    r.apply(state(sp("a", ["10.96.0.1"], [], drop=True), sp("b", ["10.96.0.2"], [], drop=True)))
    first_drop = next(i for i, (op, name, _, value) in enumerate(journal)
                      if op == "put" and name.startswith("ctlb_fe") and value.flags & tables.LB_F_DROP)
    assert ("ensure", "egress", None, None) in journal[:first_drop]


def test_a_restarted_reconciler_makes_sure_the_egress_program_of_adopted_drops_is_there() -> None:
    t = tables.memory_tables()
    want = state(sp("a", ["10.96.0.1"], [], drop=True))
    reconcile.Reconciler(t).apply(want)
    journal: list = []
    second = reconcile.Reconciler(t, egress=RecordingEgress(journal))
    out = second.apply(want)
    assert (out.writes, out.deletes) == (0, 0)
    assert journal == [("ensure", "egress", None, None)]
    assert second.needs_egress()


def test_affinity_writes_one_member_per_backend_and_cleans_up() -> None:
    t = tables.memory_tables()
    r = reconcile.Reconciler(t)
    r.apply(state(sp("web", ["10.96.0.1"], ["10.244.0.2", "10.244.0.3"], affinity=30)))
    value = t[4].frontends.data[fe("10.96.0.1")]
    assert value.flags & tables.LB_F_AFFINITY and value.affinity_timeout == 30
    assert {m.backend for m in t[4].members.data} == {be("10.244.0.2"), be("10.244.0.3")}
    r.apply(state(sp("web", ["10.96.0.1"], ["10.244.0.3"], affinity=30)))
    assert {m.backend for m in t[4].members.data} == {be("10.244.0.3")}


def test_restarted_reconciler_adopts_ids_and_writes_nothing() -> None:
    t = tables.memory_tables()
    want = state(sp("a", ["10.96.0.1"], ["10.244.0.2"]), sp("b", ["10.96.0.2"], ["10.244.0.3"]))
    first = reconcile.Reconciler(t)
    first.apply(want)
    second = reconcile.Reconciler(t)
    out = second.apply(want)
    assert (out.writes, out.deletes) == (0, 0)
    assert second.svc_ids == first.svc_ids


def test_half_written_set_left_by_a_dead_writer_is_collected() -> None:
    t = tables.memory_tables()
    t[4].backends.put(5, tables.BackendSlot(77, be("10.244.0.9")))  # no frontend points at it: a crash mid-write
    r = reconcile.Reconciler(t)
    r.apply(state(sp("web", ["10.96.0.1"], ["10.244.0.2"])))
    assert all(s.set_id != 77 for s in t[4].backends.data.values())
    assert r.view() == reconcile.desired_view(state(sp("web", ["10.96.0.1"], ["10.244.0.2"])))


def test_frontend_pointing_at_a_set_with_a_foreign_slot_is_rewritten() -> None:
    t = tables.memory_tables()
    want = state(sp("web", ["10.96.0.1"], ["10.244.0.2", "10.244.0.3"]))
    reconcile.Reconciler(t).apply(want)
    value = t[4].frontends.data[fe("10.96.0.1")]
    t[4].backends.put(value.start + 1, tables.BackendSlot(value.set_id + 1000, be("10.244.0.9")))
    r = reconcile.Reconciler(t)
    assert r.view()["10.96.0.1:80/TCP"]["backends"] == ["<incomplete>"]
    r.apply(want)
    assert r.view() == reconcile.desired_view(want)


@pytest.mark.parametrize("limit", ["frontends", "backends"], ids=["frontend-map-full", "backend-map-full"])
def test_full_map_reports_what_did_not_fit_and_keeps_the_rest(limit: str) -> None:
    sizes = {"frontends_max": 2, "backends_max": 100} if limit == "frontends" else {"frontends_max": 100, "backends_max": 3}
    t = tables.memory_tables(**sizes)
    r = reconcile.Reconciler(t)
    first = sp("a", ["10.96.0.1"], ["10.244.0.2", "10.244.0.3"])
    r.apply(state(first))
    big = sp("b", ["10.96.0.2", "10.96.0.3"], ["10.244.0.4", "10.244.0.5"])
    out = r.apply(state(first, big))
    assert [p.ref for p in out.problems] == ["Service default/b"]
    assert "full" in out.problems[0].reason
    assert r.view() == reconcile.desired_view(state(first)), "what was programmed stays, nothing partial"
    assert spn("b") in r.failed


def test_service_that_did_not_fit_keeps_its_old_programming() -> None:
    t = tables.memory_tables(backends_max=3)
    r = reconcile.Reconciler(t)
    r.apply(state(sp("a", ["10.96.0.1"], ["10.244.0.2", "10.244.0.3"])))
    # Growing to 3 needs 3 new slots beside the 2 in use: does not fit, the old set must stay.
    out = r.apply(state(sp("a", ["10.96.0.1"], ["10.244.0.2", "10.244.0.3", "10.244.0.4"])))
    assert out.problems
    assert r.view()["10.96.0.1:80/TCP"]["backends"] == ["10.244.0.2:8080", "10.244.0.3:8080"]


def test_unchanged_service_port_objects_cost_no_map_operation() -> None:
    r = reconcile.Reconciler(tables.memory_tables())
    web = sp("web", ["10.96.0.1"], ["10.244.0.2"], affinity=30)
    r.apply(state(web))
    out = r.apply(state(web))
    assert (out.writes, out.deletes) == (0, 0)


@pytest.mark.parametrize("seed", range(20))
def test_incremental_passes_leave_exactly_the_desired_entries(seed: int) -> None:
    """Random edits, unchanged service ports handed on as the same objects (as the semantics
    memo does): after every pass the maps hold the desired view and nothing else."""
    import random

    rnd = random.Random(seed)
    t = tables.memory_tables()
    r = reconcile.Reconciler(t)
    current: dict[str, desired.ServicePortState] = {}
    for _ in range(30):
        for name in rnd.sample([f"s{i}" for i in range(8)], 3):
            roll = rnd.random()
            if roll < 0.25:
                current.pop(name, None)
            else:
                n = rnd.randrange(0, 4)
                backends = [f"10.244.0.{rnd.randrange(2, 9)}" for _ in range(n)]
                frontends = [f"10.96.{rnd.randrange(0, 2)}.{int(name[1:]) + 1}"]
                current[name] = sp(name, frontends, backends, affinity=rnd.choice([None, 60]),
                                   drop=n == 0 and rnd.random() < 0.5)
        want = state(*current.values())
        out = r.apply(want)
        assert out.problems == ()
        assert r.view() == reconcile.desired_view(want)
        assert r.needs_egress() == any(s.drop for s in current.values())
        used_sets = {v.set_id for v in t[4].frontends.data.values() if v.count}
        assert {s.set_id for s in t[4].backends.data.values()} == used_sets, "a set no frontend uses was left"
        wanted_members = {(r.svc_ids[s.name], b) for s in current.values() if s.affinity_timeout for b in s.backends}
        assert {(m.svc_id, m.backend) for m in t[4].members.data} == wanted_members


def local_only(name: str, *, backends: list[str], external: list[str] | None,
               affinity: int | None = None) -> desired.ServicePortState:
    """internalTrafficPolicy Local: the ClusterIP gets `backends`, the NodePort `external`."""
    return desired.ServicePortState(
        name=spn(name),
        frontends={fe("10.96.0.1"): desired.FrontendKind.CLUSTER_IP,
                   fe("172.18.0.3", 30080): desired.FrontendKind.NODE_PORT},
        backends=tuple(sorted(be(b) for b in backends)),
        external_backends=None if external is None else tuple(sorted(be(b) for b in external)),
        affinity_timeout=affinity,
    )


def test_external_frontends_get_their_own_set_when_it_differs() -> None:
    r = reconcile.Reconciler(tables.memory_tables())
    split = state(local_only("web", backends=["10.244.0.2"], external=["10.244.0.2", "10.244.0.3"], affinity=60))
    r.apply(split)
    view = r.view()
    assert view["10.96.0.1:80/TCP"]["backends"] == ["10.244.0.2:8080"]
    assert view["172.18.0.3:30080/TCP"]["backends"] == ["10.244.0.2:8080", "10.244.0.3:8080"]
    assert view == reconcile.desired_view(split)
    assert {m.backend for m in r.programmed.members} == {be("10.244.0.2"), be("10.244.0.3")}

    joined = state(local_only("web", backends=["10.244.0.2"], external=None, affinity=60))
    r.apply(joined)
    assert r.view() == reconcile.desired_view(joined)
    assert len(r.programmed.sets) == 1, "the external set is freed once both kinds share one"
    assert {m.backend for m in r.programmed.members} == {be("10.244.0.2")}


def test_a_full_backend_table_reports_the_service_port_even_when_fragmented() -> None:
    """Free slots that lie apart cannot take a set: the service port is reported, not split."""
    t = tables.memory_tables(backends_max=4)
    r = reconcile.Reconciler(t)
    r.apply(state(sp("a", ["10.96.0.1"], ["10.244.0.2"]), sp("b", ["10.96.0.2"], ["10.244.0.3"]),
                  sp("c", ["10.96.0.3"], ["10.244.0.4"]), sp("d", ["10.96.0.4"], ["10.244.0.5"])))
    out = r.apply(state(sp("b", ["10.96.0.2"], ["10.244.0.3"]), sp("d", ["10.96.0.4"], ["10.244.0.5"]),
                        sp("e", ["10.96.0.5"], ["10.244.0.6", "10.244.0.7"])))
    starts = sorted(v.start for v in t[4].frontends.data.values())
    if starts != [1, 3]:
        pytest.skip(f"allocator placed sets at {starts}: no fragmentation to test")
    assert [p.ref for p in out.problems] == ["Service default/e"]
    assert "full" in out.problems[0].reason


# --- backend ranges -------------------------------------------------------------------------------


def test_ranges_best_fit_and_merge_on_free() -> None:
    ranges = reconcile.Ranges(10)
    a, b, c = ranges.allocate(3), ranges.allocate(2), ranges.allocate(3)
    assert (a, b, c) == (0, 3, 5)
    ranges.free(a, 3)
    assert ranges.allocate(2) == 8, "best fit: the 2-slot hole at the end, not the 3-slot one"
    assert ranges.allocate(4) is None
    ranges.free(b, 2)
    assert ranges.allocate(5) == 0, "freed neighbours merged into one range"
    assert ranges.free_slots() == 0


def test_ranges_from_adopted_sets_leave_only_the_gaps_free() -> None:
    ranges = reconcile.Ranges(10, [(2, 3), (7, 1)])
    assert ranges.free_slots() == 6
    assert sorted(ranges.allocate(n) for n in (2, 2, 2)) == [0, 5, 8]


# --- the open-addressed frontend table ------------------------------------------------------------


class FakeArray:
    """An ARRAY map in memory with a journal of element images: (index, before, after)."""

    def __init__(self, name: str, layout, max_entries: int) -> None:
        self.name = name
        self.layout = layout
        self.max_entries = max_entries
        self.elems = [layout.leaf() for _ in range(max_entries)]
        self.journal: list[tuple[int, bytes, bytes]] = []

    def get(self, key):
        return type(self.elems[key.value]).from_buffer_copy(self.elems[key.value])

    def put(self, key, leaf) -> None:
        before = bytes(self.elems[key.value])
        self.elems[key.value] = type(leaf).from_buffer_copy(leaf)
        self.journal.append((key.value, before, bytes(leaf)))

    def put_batch(self, keys, leaves, count: int):
        # As the kernel does it: one ordinary update per element, in order.
        for i in range(count):
            self.put(ct.c_uint32(keys[i]), leaves[i])
        return count, None

    def read_all(self):
        out = (self.layout.leaf * self.max_entries)()
        for i, e in enumerate(self.elems):
            ct.memmove(ct.byref(out, i * ct.sizeof(e)), ct.byref(e), ct.sizeof(e))
        return out


@pytest.fixture(scope="module")
def layouts():
    pytest.importorskip("bcc")
    from ctlb.datapath import maps

    return maps.compile_layouts()


def lookup_like_sock_c(table: tables.KernelFrontendTable, elems: list, frontend: desired.Frontend):
    """bpf/sock.c's lookup over element images: probe from home, stop at EMPTY, match a USED key,
    copy val[gen & 1]."""
    want = table._leaf()
    tables._encode_fe_key(want.key, frontend, tables.SLOT_USED)
    idx = table.home(frontend)
    for _ in range(tables.FE_PROBES):
        e = elems[idx]
        if bytes(e.key) == bytes(want.key):
            return tables._decode_fe_value(e.val[e.gen & 1])
        if e.key.state == tables.SLOT_EMPTY:
            return None
        idx = (idx + 1) % table.slots
    return None


def fev(n: int) -> tables.FrontendValue:
    return tables.FrontendValue(svc_id=n, set_id=n, count=n % 5, start=n * 7)


@pytest.mark.parametrize("family", [4, 6])
def test_frontend_table_finds_every_key_the_way_sock_c_probes(layouts, family: int) -> None:
    from ctlb.datapath import maps

    rnd = random.Random(family)
    array = FakeArray(maps.FRONTENDS[family], layouts[maps.FRONTENDS[family]], 64)
    table = tables.KernelFrontendTable(array, family)
    prefix = "10.96.0." if family == 4 else "fd00::"
    live: dict[desired.Frontend, tables.FrontendValue] = {}
    for step in range(600):
        f = fe(f"{prefix}{rnd.randrange(1, 60)}", rnd.choice([53, 80]))
        if f in live and rnd.random() < 0.4:
            assert table.delete(f)
            del live[f]
        elif f in live or table.room_for([f]):
            live[f] = fev(step)
            table.put(f, live[f])
        for g, v in live.items():
            assert lookup_like_sock_c(table, array.elems, g) == v
    assert dict(table.items()) == live
    again = tables.KernelFrontendTable(array, family)
    assert dict(again.items()) == live, "a new table (a restarted agent) adopts what is there"
    assert len(live) <= table.max_entries == 32


def test_frontend_table_writes_change_only_what_no_reader_relies_on(layouts) -> None:
    """Each element write is whole in this stand-in; in the kernel it may tear. A write is safe
    to tear if the bytes it changes lie in: the inactive value copy, gen alone, or the state
    byte alone (bpf/ctlb.h). Replaying the journal, every write must be one of those, or the
    first write of an insert, which happens under a state no lookup matches."""
    from ctlb.datapath import maps

    layout = layouts[maps.FRONTENDS[4]]
    array = FakeArray(maps.FRONTENDS[4], layout, 32)
    table = tables.KernelFrontendTable(array, 4)
    state_at, _ = tables.field_bytes(layout.leaf, "key", "state")
    gen_at, gen_size = tables.field_bytes(layout.leaf, "gen")
    val_at, val_size = tables.field_bytes(layout.leaf, "val")
    one = val_size // 2
    for i in range(12):
        table.put(fe(f"10.96.0.{i}"), fev(i))
    for i in range(0, 12, 2):
        table.put(fe(f"10.96.0.{i}"), fev(100 + i))
    for i in range(0, 12, 3):
        table.delete(fe(f"10.96.0.{i}"))
    for i in range(12, 16):
        table.put(fe(f"10.96.0.{i}"), fev(i))
    for idx, before, after in array.journal:
        changed = {b for b in range(len(after)) if before[b] != after[b]}
        old, new = layout.leaf.from_buffer_copy(before), layout.leaf.from_buffer_copy(after)
        inactive = val_at + one * ((old.gen + 1) & 1)
        if changed <= {state_at}:
            continue  # publish (TOMB -> USED), delete (USED -> TOMB), trim (TOMB -> EMPTY)
        if changed <= set(range(gen_at, gen_at + gen_size)):
            assert new.gen == old.gen + 1  # the flip
            continue
        if changed <= set(range(inactive, inactive + one)):
            assert old.key.state == tables.SLOT_USED  # a value update, invisible until the flip
            continue
        assert old.key.state != tables.SLOT_USED and new.key.state == tables.SLOT_TOMB, \
            f"slot {idx}: a write a reader could see half done"


def test_tcp_udp_and_sctp_on_one_address_and_port_are_three_frontends(layouts) -> None:
    """The protocol is part of the key the programs match (ctx->protocol): an SCTP port never
    answers for TCP or UDP on the same number, nor they for it."""
    from ctlb.datapath import maps

    array = FakeArray(maps.FRONTENDS[4], layouts[maps.FRONTENDS[4]], 32)
    r = reconcile.Reconciler({**tables.memory_tables(), 4: tables.FamilyTables(
        frontends=tables.KernelFrontendTable(array, 4), backends=tables.MemoryTable("be4", 64),
        members=tables.MemoryTable("m4", 64), source_ranges=tables.MemoryTable("src4", 64))})
    ports = {proto: desired.ServicePortState(
        name=desired.ServicePortName("default", "sig", proto.lower(), proto, model.IPFamily.IPv4),
        frontends={desired.Frontend(ipaddress.ip_address("10.96.0.10"), 3868, proto): desired.FrontendKind.CLUSTER_IP},
        backends=(be(f"10.244.0.{i + 2}"),)) for i, proto in enumerate(model.Protocol)}
    r.apply(desired.DesiredState(service_ports={p.name: p for p in ports.values()}))
    table = r._tables[4].frontends
    found = {proto: lookup_like_sock_c(table, array.elems, next(iter(sp.frontends))) for proto, sp in ports.items()}
    assert len({v.set_id for v in found.values()}) == 3
    assert {f: v["backends"] for f, v in r.view().items()} == {
        "10.96.0.10:3868/TCP": ["10.244.0.2:8080"], "10.96.0.10:3868/UDP": ["10.244.0.3:8080"],
        "10.96.0.10:3868/SCTP": ["10.244.0.4:8080"]}
    used = [e.key.proto for e in array.elems if e.key.state == tables.SLOT_USED]
    assert sorted(used) == [6, 17, 132], "IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP in the keys"


def test_frontend_table_reports_full_when_the_probe_window_is_taken(layouts) -> None:
    from ctlb.datapath import maps

    array = FakeArray(maps.FRONTENDS[4], layouts[maps.FRONTENDS[4]], 4)
    table = tables.KernelFrontendTable(array, 4)
    table.put(fe("10.96.0.1"), fev(1))
    table.put(fe("10.96.0.2"), fev(2))
    assert not table.room_for([fe("10.96.0.3")])
    with pytest.raises(errors.MapFull):
        table.put(fe("10.96.0.3"), fev(3))


def test_mix64_is_the_header_s_hash() -> None:
    """Known values of murmur3's 64-bit finaliser, which bpf/sock.c uses as ctlb_mix64."""
    assert tables.mix64(0) == 0
    assert tables.mix64(1) == 0xB456BCFC34C2CB2C
    assert tables.scale32(0xFFFFFFFF, 10) == 9 and tables.scale32(0, 10) == 0


# --- the first pass from empty maps, batched --------------------------------------------------


def random_state(rnd: random.Random, n: int) -> desired.DesiredState:
    sps = []
    for i in range(n):
        frontends = [f"10.96.{i}.{k + 1}" for k in range(rnd.randrange(1, 4))]
        backends = [f"10.244.{i}.{k + 2}" for k in range(rnd.randrange(0, 5))]
        sps.append(sp(f"s{i:03d}", frontends, backends, affinity=rnd.choice([None, None, 60]),
                      drop=not backends and rnd.random() < 0.3))
    return state(*sps)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("limits", [{}, {"frontends_max": 40}, {"backends_max": 30}],
                         ids=["roomy", "few-frontends", "few-backends"])
def test_a_batched_pass_from_empty_leaves_what_one_entry_at_a_time_leaves(seed: int, limits: dict) -> None:
    want = random_state(random.Random(seed), 30)
    batched, single = tables.memory_tables(**limits), tables.memory_tables(**limits)
    out_batched = reconcile.Reconciler(batched).apply(want)
    out_single = reconcile.Reconciler(single, batch_from_empty=False).apply(want)
    assert out_batched.problems == out_single.problems
    # A set whose frontends do not fit is never written in a batch, where one at a time writes
    # and then clears it.
    assert out_batched.writes - out_batched.deletes == out_single.writes - out_single.deletes
    for fam in (4, 6):
        for part in ("frontends", "backends", "members"):
            assert getattr(batched[fam], part).data == getattr(single[fam], part).data, f"{part}{fam}"
        assert not batched[fam].frontends.pending


def test_a_batched_pass_from_empty_writes_every_set_and_member_before_any_frontend() -> None:
    journal: list = []
    r = reconcile.Reconciler(logging_tables(journal, frontends_max=100, backends_max=100))
    r.apply(state(sp("a", ["10.96.0.1", "10.96.0.2"], ["10.244.0.2", "10.244.0.3"], affinity=60),
                  sp("b", ["10.96.0.3"], ["10.244.0.4"]), sp("c", ["10.96.0.4"], [])))
    kinds = [name[:7] for op, name, *_ in journal if op == "put"]
    first_frontend = kinds.index("ctlb_fe")
    assert "ctlb_be" in kinds and "ctlb_me" in kinds
    assert set(kinds[first_frontend:]) == {"ctlb_fe"}, "a set or member written after a frontend"
    assert len(kinds) == 3 + 2 + 4  # set slots, members, frontends: each once


def test_only_a_first_pass_from_empty_maps_is_batched() -> None:
    """Later passes, and a first pass over adopted frontends, write at once: their frontend
    updates must follow their sets one by one (make-before-break per set)."""
    t = tables.memory_tables()
    r = reconcile.Reconciler(t)
    r.apply(state(sp("a", ["10.96.0.1"], ["10.244.0.2"])))
    assert r._batch is None
    again = reconcile.Reconciler(t)
    seen: list = []
    flush = t[4].frontends.flush
    t[4].frontends.flush = lambda: (seen.append("flush"), flush())[1]  # type: ignore[method-assign]
    again.apply(state(sp("a", ["10.96.0.1"], ["10.244.0.3"]), sp("b", ["10.96.0.2"], ["10.244.0.4"])))
    assert seen == [] and r.view() != again.view()


def test_a_member_refused_when_the_batch_is_written_fails_its_service_port_alone() -> None:
    """Something else filled the members table after the reconciler read it: the write that does
    not fit fails its service port, whose frontends are then never written and whose set is
    cleared; the service ports before it stay whole."""
    t = tables.memory_tables(backends_max=10)
    r = reconcile.Reconciler(t)
    for k in range(7):  # three entries left: a's two and one of b's
        t[4].members.data[tables.MemberKey(900 + k, be(f"192.0.2.{k}"))] = True  # behind its back
    a = sp("a", ["10.96.0.1"], ["10.244.0.2", "10.244.0.3"], affinity=60)
    b = sp("b", ["10.96.0.2", "10.96.0.3"], ["10.244.0.4", "10.244.0.5"], affinity=60)
    c = sp("c", ["10.96.0.4"], ["10.244.0.6", "10.244.0.7"], affinity=60)
    out = r.apply(state(a, b, c))
    assert [p.ref for p in out.problems] == ["Service default/b", "Service default/c"]
    assert set(t[4].frontends.data) == {fe("10.96.0.1")}
    assert {s.set_id for s in t[4].backends.data.values()} == {t[4].frontends.data[fe("10.96.0.1")].set_id}
    assert r.view() == reconcile.desired_view(state(a))
    assert r.failed == {spn("b"), spn("c")}
    for key in [k for k in t[4].members.data if k.svc_id >= 900]:
        del t[4].members.data[key]
    out = r.apply(state(a, b, c))
    assert out.problems == () and r.view() == reconcile.desired_view(state(a, b, c))


def test_frontend_table_batched_inserts_publish_only_complete_slots(layouts) -> None:
    """put_later then flush, replayed write by write as a reader would see it: every write is one
    a reader may see torn (as in the test above), every slot is TOMB before any turns USED, and
    when a frontend turns USED no slot between its home and it is EMPTY."""
    from ctlb.datapath import maps

    layout = layouts[maps.FRONTENDS[4]]
    array = FakeArray(maps.FRONTENDS[4], layout, 32)
    table = tables.KernelFrontendTable(array, 4)
    for i in range(4):  # a chain with a tombstone in it, from an earlier life
        table.put(fe(f"10.96.1.{i}"), fev(50 + i))
    table.delete(fe("10.96.1.1"))
    start = len(array.journal)
    states = [e.key.state for e in array.elems]  # as a reader sees the slots before the batch
    wanted = {fe(f"10.96.0.{i}"): fev(i) for i in range(12)}
    for frontend, value in wanted.items():
        table.put_later(frontend, value)
    assert all(lookup_like_sock_c(table, array.elems, f) is None for f in wanted), "nothing before flush"
    table.flush()
    state_at, _ = tables.field_bytes(layout.leaf, "key", "state")
    assert len(array.journal) - start == 2 * len(wanted), "two writes a frontend"
    published = False
    for idx, before, after in array.journal[start:]:
        old, new = layout.leaf.from_buffer_copy(before), layout.leaf.from_buffer_copy(after)
        changed = {b for b in range(len(after)) if before[b] != after[b]}
        if new.key.state == tables.SLOT_USED:
            published = True
            assert changed <= {state_at} and old.key.state == tables.SLOT_TOMB
            frontend = tables._decode_fe_key(new.key, 4)
            at = table.home(frontend)
            while at != idx:
                assert states[at] != tables.SLOT_EMPTY, "a probe would stop before the frontend"
                at = (at + 1) % table.slots
        else:
            assert not published, "a first step after a frontend was published"
            assert old.key.state != tables.SLOT_USED and new.key.state == tables.SLOT_TOMB
        states[idx] = new.key.state
    for frontend, value in wanted.items():
        assert lookup_like_sock_c(table, array.elems, frontend) == value
        assert table.get(frontend) == value


@pytest.mark.parametrize("family", [4, 6])
def test_backend_slots_written_in_a_batch_are_the_bytes_one_slot_at_a_time_writes(layouts, family: int) -> None:
    from ctlb.datapath import maps

    array = FakeArray(maps.BACKENDS[family], layouts[maps.BACKENDS[family]], 8)
    table = tables.KernelBackendTable(array, family)
    base = "fd00:10:244::" if family == 6 else "10.244.0."
    slots = [(i, tables.BackendSlot(7 + i, be(f"{base}{i + 2}", 8080 + 257 * i))) for i in range(4)]
    assert table.put_many(slots) == 4
    batched = [bytes(e) for e in array.elems[:4]]
    for idx, slot in slots:
        table.put(idx, slot)
    assert [bytes(e) for e in array.elems[:4]] == batched
    assert [table.get(idx) for idx, _ in slots] == [slot for _, slot in slots]


@pytest.mark.parametrize("family", [4, 6])
def test_backend_sets_written_whole_are_the_bytes_their_slots_written_one_by_one_are(layouts, family: int) -> None:
    from ctlb.datapath import maps

    base = "fd00:10:244::" if family == 6 else "10.244.0."
    sets = [(1, 7, (be(f"{base}2", 8080), be(f"{base}3", 9090))), (5, 8, (be(f"{base}4", 65535),)), (3, 9, ())]
    by_set = FakeArray(maps.BACKENDS[family], layouts[maps.BACKENDS[family]], 8)
    by_slot = FakeArray(maps.BACKENDS[family], layouts[maps.BACKENDS[family]], 8)
    assert tables.KernelBackendTable(by_set, family).put_sets(sets) == 3
    one_by_one = tables.KernelBackendTable(by_slot, family)
    for start, set_id, backends in sets:
        for i, backend in enumerate(backends):
            one_by_one.put(start + i, tables.BackendSlot(set_id, backend))
    assert [bytes(e) for e in by_set.elems] == [bytes(e) for e in by_slot.elems]
    assert [i for i, _, _ in by_set.journal] == [1, 2, 5], "slot after slot, set after set"


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("protocol", list(model.Protocol))
@pytest.mark.parametrize("state", [tables.SLOT_EMPTY, tables.SLOT_USED, tables.SLOT_TOMB])
def test_a_packed_frontend_key_is_the_bytes_the_ctypes_encoder_writes(layouts, family: int,
                                                                       protocol: model.Protocol, state: int) -> None:
    from ctlb.datapath import maps

    key_type = dict(layouts[maps.FRONTENDS[family]].leaf._fields_)["key"]
    frontend = desired.Frontend(ipaddress.ip_address("fd00::a:1" if family == 6 else "10.96.1.2"), 8443, protocol)
    want = key_type()
    tables._encode_fe_key(want, frontend, state)
    packed = tables._fe_key_packer(key_type).pack(frontend.address.packed, frontend.port.to_bytes(2, "big"),
                                                  tables.PROTO_NUMBERS[protocol], state)
    assert packed == bytes(want)


@pytest.mark.parametrize("value", [
    tables.FrontendValue(svc_id=1, set_id=2, count=3, affinity_timeout=10800, flags=tables.LB_F_AFFINITY, start=40),
    tables.FrontendValue(svc_id=(1 << 32) - 1, set_id=(1 << 32) - 2, count=0, flags=tables.LB_F_DROP, start=0),
], ids=["affinity", "largest-ids-dropping"])
def test_a_packed_frontend_value_is_the_bytes_the_ctypes_encoder_writes(layouts, value: tables.FrontendValue) -> None:
    from ctlb.datapath import maps

    value_type = dict(layouts[maps.FRONTENDS[4]].leaf._fields_)["val"]._type_
    want = value_type()
    tables._encode_fe_value(value, want)
    packed = tables._fe_value_packer(value_type).pack(value.svc_id, value.set_id, value.start, value.count,
                                                      value.affinity_timeout, value.flags)
    assert packed == bytes(want)


@pytest.mark.parametrize("family", [4, 6])
def test_frontends_flushed_in_a_batch_leave_the_bytes_one_put_at_a_time_leaves(layouts, family: int) -> None:
    """Slot by slot, including a tombstone reused (its gen kept) and the two steps of each."""
    from ctlb.datapath import maps

    layout = layouts[maps.FRONTENDS[family]]
    base = "fd00::" if family == 6 else "10.96.0."
    batched = tables.KernelFrontendTable(FakeArray(maps.FRONTENDS[family], layout, 32), family)
    one_by_one = tables.KernelFrontendTable(FakeArray(maps.FRONTENDS[family], layout, 32), family)
    gone = fe(f"{base}1")
    neighbour = next(f for f in (fe(f"{base}{i}") for i in range(100, 200)) if batched.home(f) == batched.home(gone))
    for table in (batched, one_by_one):  # a tombstone with a flipped gen, from an earlier life
        table.put(gone, fev(1))
        table.put(gone, fev(2))
        table.put(neighbour, fev(9))
        table.delete(gone)
    tomb = batched.home(gone)
    assert batched.array.elems[tomb].key.state == tables.SLOT_TOMB and batched.array.elems[tomb].gen == 1
    start = len(batched.array.journal)
    wanted = {fe(f"{base}{i}"): fev(i) for i in range(1, 8)}
    for frontend, value in sorted(wanted.items(), key=lambda item: batched.home(item[0])):
        batched.put_later(frontend, value)
    batched.flush()
    for frontend, value in sorted(wanted.items(), key=lambda item: one_by_one.home(item[0])):
        one_by_one.put(frontend, value)
    assert batched.slot_of(gone) == tomb and batched.array.elems[tomb].gen == 1
    assert [bytes(e) for e in batched.array.elems] == [bytes(e) for e in one_by_one.array.elems]
    steps = sorted(batched.array.journal[start:])
    assert steps == sorted(one_by_one.array.journal[start:]), "the same two writes a slot"


def test_a_packer_puts_each_field_at_its_offset_and_refuses_a_layout_it_does_not_know() -> None:
    class Slot(ct.Structure):
        _fields_ = [("addr", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16), ("set_id", ct.c_uint32)]

    want = Slot(addr=int.from_bytes(b"\x0a\0\0\1", sys.byteorder), port=int.from_bytes(b"\0\x50", sys.byteorder),
                set_id=7)
    assert tables._packer(Slot, {"addr": "s", "port": "s", "set_id": "I"}).pack(b"\x0a\0\0\1", b"\0\x50", 7) == \
        bytes(want)
    with pytest.raises(ValueError, match="fields"):
        tables._packer(Slot, {"addr": "s", "set_id": "I"})
    with pytest.raises(ValueError, match="fields"):
        tables._packer(Slot, {"port": "s", "addr": "s", "set_id": "I"})
    with pytest.raises(ValueError, match="set_id"):
        tables._packer(Slot, {"addr": "s", "port": "s", "set_id": "Q"})


@pytest.mark.parametrize("port", [
    sp("web", ["10.96.0.1"], ["10.244.0.2", "10.244.0.10", "10.244.0.3"]),
    sp("sticky", ["10.96.0.1", "192.0.2.7"], ["10.244.0.2"], affinity=10800),
    sp("none", ["10.96.0.1"], []),
    sp("dropped", ["10.96.0.1"], [], drop=True),
    sp("v6", ["fd00::1", "fd00::2"], ["fd00:10:244::2", "fd00:10:244::a"]),
    local_only("split", backends=["10.244.0.2"], external=["10.244.0.2", "10.244.0.3"], affinity=30),
    local_only("dropping", backends=[], external=["10.244.0.3"]),
], ids=["plain", "affinity", "refuses", "drops", "ipv6", "two-groups", "two-groups-one-empty"])
def test_the_agent_s_digest_of_a_service_port_is_the_digest_of_its_programmed_maps(
        port: desired.ServicePortState) -> None:
    """The agent keeps the state digest from `service_port_digest`, `ctlb status` computes it
    from the maps (`programmed_digest`): once programmed, the two must agree."""
    r = reconcile.Reconciler(tables.memory_tables())
    assert r.apply(state(port)).problems == ()
    assert reconcile.programmed_digest(r.programmed) == reconcile.combine(reconcile.service_port_digest(port))


def test_the_digest_of_a_whole_state_is_the_sum_of_its_service_ports_digests() -> None:
    want = state(sp("web", ["10.96.0.5", "192.0.2.10"], ["10.244.0.2", "10.244.0.3"], affinity=60),
                 sp("v6", ["fd00::1"], ["fd00:10:244::2"]), sp("gone", ["10.96.0.2"], [], drop=True),
                 local_only("split", backends=["10.244.0.4"], external=["10.244.0.4", "10.244.0.5"]))
    r = reconcile.Reconciler(tables.memory_tables())
    assert r.apply(want).problems == ()
    agent_sum = sum(reconcile.service_port_digest(port) for port in want.service_ports.values())
    assert reconcile.programmed_digest(r.programmed) == reconcile.combine(agent_sum)


@pytest.mark.parametrize("wanted", [
    sp("web", ["10.96.0.1"], ["10.244.0.2", "10.244.0.4"]),
    sp("web", ["10.96.0.1"], ["10.244.0.2"]),
    sp("web", ["10.96.0.1"], ["10.244.0.2", "10.244.0.3", "10.244.0.4"]),
    msgspec.structs.replace(sp("web", ["10.96.0.1"], []), backends=(be("10.244.0.2"), be("10.244.0.3", 8081))),
    sp("web", ["10.96.0.1"], ["10.244.0.2", "10.244.0.3"], affinity=60),
    sp("web", ["10.96.0.2"], ["10.244.0.2", "10.244.0.3"]),
    sp("web", ["10.96.0.1", "10.96.0.2"], ["10.244.0.2", "10.244.0.3"]),
], ids=["other-backend", "backend-missing", "backend-extra", "backend-port", "affinity", "other-frontend",
        "frontend-extra"])
def test_a_one_entry_difference_makes_the_digests_differ(wanted: desired.ServicePortState) -> None:
    """`ctlb status` says out of sync when the maps hold anything but what the agent wants."""
    r = reconcile.Reconciler(tables.memory_tables())
    r.apply(state(sp("web", ["10.96.0.1"], ["10.244.0.2", "10.244.0.3"])))
    assert reconcile.programmed_digest(r.programmed) != reconcile.combine(reconcile.service_port_digest(wanted))


@pytest.mark.parametrize("drop", [False, True], ids=["refuses", "drops"])
def test_dropping_and_refusing_frontends_differ_in_the_digest(drop: bool) -> None:
    r = reconcile.Reconciler(tables.memory_tables())
    r.apply(state(sp("web", ["10.96.0.1"], [], drop=drop)))
    other = sp("web", ["10.96.0.1"], [], drop=not drop)
    assert reconcile.programmed_digest(r.programmed) != reconcile.combine(reconcile.service_port_digest(other))


def test_an_incomplete_set_in_the_maps_makes_the_digests_differ() -> None:
    """A set some slot of which went missing reads as incomplete, whatever the rest holds."""
    r = reconcile.Reconciler(tables.memory_tables())
    port = sp("web", ["10.96.0.1"], ["10.244.0.2", "10.244.0.3"])
    r.apply(state(port))
    value = r.programmed.frontends[fe("10.96.0.1")]
    found = dataclasses.replace(r.programmed, sets={(4, value.set_id): (be("10.244.0.2"),)})
    assert reconcile.programmed_digest(found) != reconcile.combine(reconcile.service_port_digest(port))
