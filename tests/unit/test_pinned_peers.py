"""Which peers sockets stay pinned to, and when a peer is let go of (ctlb/datapath/sockdiag.py):
a UDP backend that no UDP service port has any more, the drop address once nothing drops at its
port, and what the maps held when the agent started but the first plan no longer has."""

from __future__ import annotations

import ipaddress

import pytest

from ctlb import desired, model
from ctlb.datapath import reconcile, sockdiag, tables

TCP, UDP = model.Protocol.TCP, model.Protocol.UDP
DROP4 = tables.DROP_ADDR4


def port(name: str, protocol: model.Protocol, *, frontend: str = "10.96.0.10", port_number: int = 53,
         backends: tuple[str, ...] = (), drop: bool = False) -> desired.ServicePortState:
    address = ipaddress.ip_address(frontend)
    family = model.IPFamily.IPv6 if address.version == 6 else model.IPFamily.IPv4
    return desired.ServicePortState(
        name=desired.ServicePortName("default", name, "p", protocol, family),
        frontends={desired.Frontend(address, port_number, protocol): desired.FrontendKind.CLUSTER_IP},
        backends=tuple(sorted(desired.Backend(ipaddress.ip_address(b), 5353) for b in backends)),
        drop=drop,
    )


def peer(protocol: model.Protocol, address: str | ipaddress.IPv4Address, port_number: int) -> sockdiag.Peer:
    return sockdiag.Peer(protocol, ipaddress.ip_address(address), port_number)


def current(*sps: desired.ServicePortState) -> dict[desired.ServicePortName, desired.ServicePortState]:
    return {sp.name: sp for sp in sps}


def test_a_udp_backend_no_service_port_has_any_more_is_let_go_of() -> None:
    tracker = sockdiag.PinnedPeers()
    before = port("dns", UDP, backends=("10.244.0.2", "10.244.0.3"))
    tracker.update({before.name: None}, current(before))
    after = port("dns", UDP, backends=("10.244.0.3",))
    assert tracker.update({before.name: before}, current(after)) == {peer(UDP, "10.244.0.2", 5353)}


def test_a_udp_backend_another_service_port_still_has_is_kept() -> None:
    tracker = sockdiag.PinnedPeers()
    a, b = port("a", UDP, backends=("10.244.0.2",)), port("b", UDP, backends=("10.244.0.2",))
    tracker.update({a.name: None, b.name: None}, current(a, b))
    assert tracker.update({a.name: a}, current(b)) == set()
    assert tracker.update({b.name: b}, current()) == {peer(UDP, "10.244.0.2", 5353)}


def test_tcp_backends_pin_nothing() -> None:
    """A TCP connection to a backend that went ends with the backend (RST, timeout)."""
    tracker = sockdiag.PinnedPeers()
    web = port("web", TCP, backends=("10.244.0.2",))
    tracker.update({web.name: None}, current(web))
    assert tracker.update({web.name: web}, current()) == set()


@pytest.mark.parametrize("protocol", [TCP, UDP])
@pytest.mark.parametrize("then", ["local-endpoint", "no-endpoints", "removed"])
def test_the_drop_address_is_let_go_of_when_the_service_port_stops_dropping(
        protocol: model.Protocol, then: str) -> None:
    tracker = sockdiag.PinnedPeers()
    dropping = port("local", protocol, drop=True)
    tracker.update({dropping.name: None}, current(dropping))
    after = {"local-endpoint": current(port("local", protocol, backends=("10.244.0.2",))),
             "no-endpoints": current(port("local", protocol)),
             "removed": current()}[then]
    gone = tracker.update({dropping.name: dropping}, after)
    assert peer(protocol, DROP4, 53) in gone


def test_the_drop_address_is_kept_while_another_service_port_drops_at_that_port() -> None:
    tracker = sockdiag.PinnedPeers()
    a = port("a", UDP, frontend="10.96.0.10", drop=True)
    b = port("b", UDP, frontend="10.96.0.11", drop=True)
    tracker.update({a.name: None, b.name: None}, current(a, b))
    assert tracker.update({a.name: a}, current(b)) == set()


def test_an_ipv6_frontend_that_drops_pins_to_the_ipv6_drop_address() -> None:
    assert sockdiag.service_port_peers(port("v6", UDP, frontend="fd00::10", drop=True)) == {
        peer(UDP, tables.DROP_ADDR6, 53)}


def test_peers_adopted_at_start_that_the_first_plan_lacks_are_let_go_of() -> None:
    """A backend removed while no agent ran: the first sync must end its sockets too."""
    t = tables.memory_tables()
    reconcile.Reconciler(t).apply(desired.DesiredState(service_ports=current(
        port("dns", UDP, backends=("10.244.0.2", "10.244.0.3")), port("local", UDP, frontend="10.96.0.11", drop=True))))
    adopted = sockdiag.programmed_peers(reconcile.Reconciler(t).programmed)
    assert adopted == {peer(UDP, "10.244.0.2", 5353), peer(UDP, "10.244.0.3", 5353), peer(UDP, DROP4, 53)}

    tracker = sockdiag.PinnedPeers(adopted)
    first = port("dns", UDP, backends=("10.244.0.3",))
    gone = tracker.update({first.name: None}, current(first))
    assert gone == {peer(UDP, "10.244.0.2", 5353), peer(UDP, DROP4, 53)}
    assert tracker.update({}, current(first)) == set(), "adopted peers are looked at once"
