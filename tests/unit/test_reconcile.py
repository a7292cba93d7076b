"""The reconciler's diff: what it writes, in which order, and what it does when a map is full."""

from __future__ import annotations

import ipaddress

import pytest

from ctlb import desired, model
from ctlb.datapath import reconcile, tables

TCP = model.Protocol.TCP


def spn(name: str, family: model.IPFamily = model.IPFamily.IPv4) -> desired.ServicePortName:
    return desired.ServicePortName("default", name, "http", TCP, family)


def fe(addr: str, port: int = 80) -> desired.Frontend:
    return desired.Frontend(ipaddress.ip_address(addr), port, TCP)


def be(addr: str, port: int = 8080) -> desired.Backend:
    return desired.Backend(ipaddress.ip_address(addr), port)


def sp(name: str, frontends: list[str], backends: list[str], *, affinity: int | None = None) -> desired.ServicePortState:
    fam = model.IPFamily.IPv6 if ":" in frontends[0] else model.IPFamily.IPv4
    return desired.ServicePortState(
        name=spn(name, fam),
        frontends={fe(a): desired.FrontendKind.CLUSTER_IP for a in frontends},
        backends=tuple(sorted(be(b) for b in backends)),
        affinity_timeout=affinity,
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
    assert {k.set_id for k in t[4].backends.data} == {after.set_id}
    assert r.view()["10.96.0.1:80/TCP"]["backends"] == ["10.244.0.3:8080", "10.244.0.4:8080"]


def test_frontend_only_ever_points_at_a_complete_set() -> None:
    """Replays the journal: at every frontend write the set it names is whole, and no slot of a
    set is deleted while a frontend still points at it."""
    journal: list = []
    r = reconcile.Reconciler(logging_tables(journal))
    r.apply(state(sp("web", ["10.96.0.1", "10.96.0.2"], ["10.244.0.2", "10.244.0.3"])))
    r.apply(state(sp("web", ["10.96.0.1", "10.96.0.2"], ["10.244.0.4", "10.244.0.5", "10.244.0.6"])))
    r.apply(state(sp("web", ["10.96.0.1"], ["10.244.0.4"])))
    slots: dict[int, set[int]] = {}
    pointing: dict[desired.Frontend, tables.FrontendValue] = {}
    for op, name, key, value in journal:
        if name.startswith("ctlb_be"):
            if op == "put":
                slots.setdefault(key.set_id, set()).add(key.slot)
            else:
                assert all(v.set_id != key.set_id for v in pointing.values()), "deleted a slot in use"
                slots[key.set_id].discard(key.slot)
        elif name.startswith("ctlb_fe"):
            if op == "put":
                assert slots.get(value.set_id, set()) >= set(range(value.count)), "pointed at a partial set"
                pointing[key] = value
            else:
                pointing.pop(key)


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
    t[4].backends.put(tables.SlotKey(4, 77, 1), be("10.244.0.9"))  # slot 0 missing: a crash mid-write
    r = reconcile.Reconciler(t)
    r.apply(state(sp("web", ["10.96.0.1"], ["10.244.0.2"])))
    assert all(k.set_id != 77 for k in t[4].backends.data)


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
                current[name] = sp(name, frontends, backends, affinity=rnd.choice([None, 60]))
        want = state(*current.values())
        out = r.apply(want)
        assert out.problems == ()
        assert r.view() == reconcile.desired_view(want)
        used_sets = {v.set_id for v in t[4].frontends.data.values() if v.count}
        assert {k.set_id for k in t[4].backends.data} == used_sets, "a set no frontend uses was left"
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
