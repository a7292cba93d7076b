"""loadBalancerSourceRanges in the reconciler: which frontends are gated, what the ranges maps hold,
and the order that never leaves a gated frontend without the ranges it is judged by."""

from __future__ import annotations

import ipaddress

import pytest

from ctlb import desired, model
from ctlb.datapath import reconcile, tables
from tests.unit.test_reconcile import be, fe, logging_tables, spn, state

LB = desired.FrontendKind.LOAD_BALANCER
CLUSTER_IP = desired.FrontendKind.CLUSTER_IP


def nets(*ranges: str) -> tuple[desired.SourceRange, ...]:
    return tuple(ipaddress.ip_network(r) for r in ranges)


def lb_port(name: str = "web", *, ranges: tuple[str, ...] = ("203.0.113.0/24",), admit_node: bool = False,
            backends: tuple[str, ...] = ("10.244.1.2",), lb_ip: str = "198.51.100.7",
            cluster_ip: str = "10.96.0.10") -> desired.ServicePortState:
    return desired.ServicePortState(
        name=spn(name),
        frontends={fe(cluster_ip): CLUSTER_IP, fe(lb_ip): LB},
        backends=tuple(be(b) for b in backends),
        source_ranges=nets(*ranges),
        source_ranges_admit_node=admit_node,
    )


def ranges_in(r: reconcile.Reconciler, fam: int = 4) -> set[tables.SourceRangeKey]:
    return {key for key, _ in r._tables[fam].source_ranges.items()}


def test_only_load_balancer_frontends_are_gated_and_their_ranges_written() -> None:
    r = reconcile.Reconciler(logging_tables([]))
    r.apply(state(lb_port(ranges=("203.0.113.0/24", "192.0.2.0/25"), admit_node=True)))

    cluster_ip = r.programmed.frontends[fe("10.96.0.10")]
    lb_ip = r.programmed.frontends[fe("198.51.100.7")]
    assert cluster_ip.flags & tables.NEEDS_EGRESS == 0
    assert lb_ip.flags == tables.LB_F_SOURCE_RANGES | tables.LB_F_SOURCE_NODE
    assert cluster_ip.set_id == lb_ip.set_id, "one backend set serves both"
    assert ranges_in(r) == {tables.SourceRangeKey(lb_ip.svc_id, n) for n in nets("203.0.113.0/24", "192.0.2.0/25")}


def test_no_ranges_means_no_gate_and_nothing_written() -> None:
    r = reconcile.Reconciler(logging_tables([]))
    r.apply(state(lb_port(ranges=())))

    assert r.programmed.frontends[fe("198.51.100.7")].flags == 0
    assert ranges_in(r) == set()
    assert not r.needs_egress()


def test_a_gated_frontend_needs_the_egress_program() -> None:
    r = reconcile.Reconciler(logging_tables([]))
    r.apply(state(lb_port()))
    assert r.needs_egress()

    r.apply(state(lb_port(ranges=())))
    assert not r.needs_egress()


def _replay(journal: list) -> list[tuple[str, object]]:
    """The journal's frontend-value writes and range operations, in order."""
    return [(op, key) for op, name, key, _ in journal if name.startswith("ctlb_lb_src") or name.startswith("ctlb_fe")]


def test_ranges_are_written_before_the_frontend_is_gated_and_deleted_after_it_no_longer_is() -> None:
    journal: list = []
    r = reconcile.Reconciler(logging_tables(journal))

    r.apply(state(lb_port(ranges=("203.0.113.0/24", "192.0.2.0/24"))))
    ops = _replay(journal)
    lb_write = ops.index(("put", fe("198.51.100.7")))
    range_puts = [i for i, (op, key) in enumerate(ops) if op == "put" and isinstance(key, tables.SourceRangeKey)]
    assert len(range_puts) == 2 and max(range_puts) < lb_write

    journal.clear()
    r.apply(state(lb_port(ranges=())))
    ops = _replay(journal)
    lb_write = next(i for i, (op, key) in enumerate(ops) if op == "put" and key == fe("198.51.100.7"))
    range_delete = next(i for i, (op, key) in enumerate(ops) if op == "delete")
    assert lb_write < range_delete
    assert ranges_in(r) == set()


def test_changed_ranges_add_the_new_before_deleting_the_old() -> None:
    journal: list = []
    r = reconcile.Reconciler(logging_tables(journal))
    r.apply(state(lb_port(ranges=("203.0.113.0/24",))))
    svc_id = r.programmed.frontends[fe("198.51.100.7")].svc_id
    journal.clear()

    r.apply(state(lb_port(ranges=("192.0.2.0/24",))))

    assert [(op, key) for op, name, key, _ in journal if name.startswith("ctlb_lb_src")] == [
        ("put", tables.SourceRangeKey(svc_id, nets("192.0.2.0/24")[0])),
        ("delete", tables.SourceRangeKey(svc_id, nets("203.0.113.0/24")[0])),
    ]
    assert not [key for _, name, key, _ in journal if name.startswith("ctlb_fe")], "the frontend value is unchanged"


def test_admitting_the_node_is_a_flag_change_only() -> None:
    journal: list = []
    r = reconcile.Reconciler(logging_tables(journal))
    r.apply(state(lb_port()))
    journal.clear()

    r.apply(state(lb_port(admit_node=True)))

    assert [(op, name) for op, name, *_ in journal] == [("put", "ctlb_fe4")]
    assert r.programmed.frontends[fe("198.51.100.7")].flags & tables.LB_F_SOURCE_NODE


def test_removed_service_port_leaves_no_ranges() -> None:
    r = reconcile.Reconciler(logging_tables([]))
    r.apply(state(lb_port("web"), lb_port("api", lb_ip="198.51.100.8", cluster_ip="10.96.0.11", ranges=("192.0.2.0/24",))))

    r.apply(state(lb_port("api", lb_ip="198.51.100.8", cluster_ip="10.96.0.11", ranges=("192.0.2.0/24",))))

    api = r.programmed.frontends[fe("198.51.100.8")]
    assert ranges_in(r) == {tables.SourceRangeKey(api.svc_id, nets("192.0.2.0/24")[0])}


def test_adoption_keeps_what_is_wanted_and_removes_ranges_of_service_ports_gone_meanwhile() -> None:
    maps_ = logging_tables([])
    first = reconcile.Reconciler(maps_)
    first.apply(state(lb_port("web"), lb_port("api", lb_ip="198.51.100.8", cluster_ip="10.96.0.11", ranges=("192.0.2.0/24",))))
    web_id = first.programmed.frontends[fe("198.51.100.7")].svc_id

    journal: list = []
    for t in maps_.values():
        for table in (t.frontends, t.backends, t.members, t.source_ranges):
            table.journal = journal
    second = reconcile.Reconciler(maps_)
    second.apply(state(lb_port("web")))

    assert ranges_in(second) == {tables.SourceRangeKey(web_id, nets("203.0.113.0/24")[0])}
    assert not [1 for op, name, *_ in journal if op == "put"], "adopted as is"
    assert second.view() == reconcile.desired_view(state(lb_port("web")))


@pytest.mark.parametrize("admit_node", [False, True])
def test_datapath_view_matches_the_desired_view(admit_node: bool) -> None:
    wanted = state(lb_port(ranges=("203.0.113.0/24", "203.0.113.0/24", "192.0.2.0/25"), admit_node=admit_node))
    r = reconcile.Reconciler(logging_tables([]))
    r.apply(wanted)

    assert r.view() == reconcile.desired_view(wanted)
    entry = r.view()["198.51.100.7:80/TCP"]
    assert entry["sources"] == ["192.0.2.0/25", "203.0.113.0/24"]  # type: ignore[index]
    assert entry["sources_admit_node"] is admit_node  # type: ignore[index]
    assert "sources" not in r.view()["10.96.0.10:80/TCP"]  # type: ignore[operator]


def test_a_full_ranges_map_reports_the_service_port_and_keeps_the_rest() -> None:
    r = reconcile.Reconciler(logging_tables([], frontends_max=2))
    outcome = r.apply(state(lb_port("web", ranges=("203.0.113.0/24", "192.0.2.0/24", "198.18.0.0/15"))))

    assert [p.ref for p in outcome.problems] == ["Service default/web"]
    assert "ctlb_lb_src4" in outcome.problems[0].reason
    assert fe("198.51.100.7") not in r.programmed.frontends, "never gated without its ranges"


def test_ipv6_ranges_go_to_the_ipv6_map() -> None:
    port = desired.ServicePortState(
        name=spn("web", model.IPFamily.IPv6),
        frontends={fe("2001:db8:1::7"): LB},
        backends=(be("fd00:10:244::2"),),
        source_ranges=nets("2001:db8:ff::/48"),
    )
    r = reconcile.Reconciler(logging_tables([]))
    r.apply(state(port))

    svc_id = r.programmed.frontends[fe("2001:db8:1::7")].svc_id
    assert ranges_in(r, 6) == {tables.SourceRangeKey(svc_id, nets("2001:db8:ff::/48")[0])}
    assert ranges_in(r, 4) == set()


def test_the_agent_s_digest_of_a_gated_service_port_covers_its_ranges() -> None:
    """`ctlb status` compares the digest the agent keeps with one of the maps' view: both must
    see the ranges, or a gated Service would read as out of sync."""
    port = lb_port(ranges=("203.0.113.0/24",), admit_node=True)
    r = reconcile.Reconciler(logging_tables([]))
    r.apply(state(port))
    assert reconcile.programmed_digest(r.programmed) == reconcile.combine(reconcile.service_port_digest(port))
    for other in (lb_port(ranges=("192.0.2.0/24",), admit_node=True), lb_port(ranges=("203.0.113.0/24",)),
                  lb_port(ranges=("203.0.113.0/24", "192.0.2.0/24"), admit_node=True)):
        assert reconcile.programmed_digest(r.programmed) != reconcile.combine(reconcile.service_port_digest(other))
