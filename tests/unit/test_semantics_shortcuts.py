"""The common-case shortcuts of `semantics` give exactly the plan the general rules give.

Each shortcut is checked the same way: many Services and slices, varied along every factor the
rules read (type, traffic policies, families, external and LoadBalancer IPs, node ports,
endpoint conditions, hints, nodes, duplicates, slices of the other family, ports), are planned
with the shortcut and with it turned off, and the results must be equal. The inputs come from a
seeded generator, so a failure repeats; the test also checks that the shortcut was taken often
enough, and refused often enough, for the comparison to mean something.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from typing import Any

import pytest

from ctlb import desired, model, semantics

TCP, UDP = model.Protocol.TCP, model.Protocol.UDP
CLUSTER, LOCAL = model.TrafficPolicy.CLUSTER, model.TrafficPolicy.LOCAL
Type = model.ServiceType

NODES = ("node-1", "node-2", "node-3", None)
ZONES = ("zone-a", "zone-b")
SLICE_PORTS = (model.EndpointPort("http", TCP, 8080), model.EndpointPort("dns", UDP, 53),
               model.EndpointPort("", TCP, 9090))


def _node(rng: random.Random) -> model.Node | None:
    if rng.random() < 0.1:
        return None
    labels = (("topology.kubernetes.io/zone", rng.choice(ZONES)),) if rng.random() < 0.8 else ()
    return model.Node(name="node-1", addresses=(ipaddress.ip_address("172.18.0.3"), ipaddress.ip_address("fc00::3")),
                      labels=labels)


def _address(rng: random.Random, family: int) -> model.IPAddress:
    # Few distinct addresses, so that backends listed twice are common.
    if family == 4:
        return ipaddress.IPv4Address(f"10.244.{rng.randint(1, 3)}.{rng.randint(1, 6)}")
    return ipaddress.IPv6Address(f"fd00:10:244:{rng.randint(1, 3)}::{rng.randint(1, 6)}")


def _maybe(rng: random.Random, p: float, value: Any) -> Any:
    return value if rng.random() < p else None


def _endpoint(rng: random.Random, family: int, *, plain: bool, hinted: str) -> model.Endpoint:
    """An endpoint; a `plain` one is ready (or unset) without hints, as most are. A `hinted`
    one ("zones", "nodes") always has hints of that kind, so that a whole slice can have them."""
    addresses = (_address(rng, family),) if rng.random() < 0.97 else ()
    if rng.random() < 0.03:
        addresses = (_address(rng, 10 - family), *addresses)  # an address of the other family first
    if rng.random() < 0.1:
        addresses = (*addresses, _address(rng, family))
    if plain:
        ready = rng.choice((True, True, None))
        hint_zones: tuple[str, ...] = ()
        hint_nodes: tuple[str, ...] = ()
    else:
        ready = rng.choice((True, None, False, False))
        hint_zones = tuple(rng.sample(ZONES, rng.randint(1, 2))) if rng.random() < 0.3 else ()
        hint_nodes = tuple(rng.sample(("node-1", "node-2"), 1)) if rng.random() < 0.2 else ()
    if hinted == "zones":
        hint_zones = tuple(rng.sample(ZONES, rng.randint(1, 2)))
    elif hinted == "nodes":
        hint_nodes = (rng.choice(("node-1", "node-2")),)
    return model.Endpoint(
        addresses=addresses, ready=ready, serving=rng.choice((True, False, None)),
        terminating=rng.choice((True, False, None)), node_name=rng.choice(NODES), zone=rng.choice(ZONES),
        hint_zones=hint_zones, hint_nodes=hint_nodes,
    )


def _slices(rng: random.Random) -> list[model.EndpointSlice]:
    slices = []
    plain = rng.random() < 0.6
    hinted = rng.choice(("", "", "", "zones", "nodes"))
    for i in range(rng.randint(0, 3)):
        address_type = rng.choice(("IPv4", "IPv4", "IPv6", "FQDN"))
        family = 6 if address_type == "IPv6" else 4
        endpoints = tuple(_endpoint(rng, family, plain=plain or rng.random() < 0.7,
                                    hinted=hinted) for _ in range(rng.randint(0, 5)))
        ports = tuple(rng.sample(SLICE_PORTS, rng.randint(0, len(SLICE_PORTS))))
        slices.append(model.EndpointSlice(namespace="shop", name=f"web-{i}", service_name="web",
                                          address_type=address_type, endpoints=endpoints, ports=ports))
    return slices


def _service(rng: random.Random) -> model.Service:
    service_type = rng.choice((Type.CLUSTER_IP, Type.CLUSTER_IP, Type.CLUSTER_IP, Type.NODE_PORT, Type.LOAD_BALANCER))
    node_ports = service_type is not Type.CLUSTER_IP
    ports = [model.ServicePort("http", TCP, 80, "http", node_port=_maybe(rng, 0.8, 30080) if node_ports else None)]
    if rng.random() < 0.3:
        ports.append(model.ServicePort("dns", UDP, 53, "dns", node_port=_maybe(rng, 0.8, 30053) if node_ports else None))
    if rng.random() < 0.2:
        ports = [model.ServicePort("", TCP, 90, 9090)]
    cluster_ips = rng.choice(((ipaddress.ip_address("10.96.0.10"),), (ipaddress.ip_address("fd00:96::10"),),
                              (ipaddress.ip_address("10.96.0.10"), ipaddress.ip_address("fd00:96::10")), ()))
    external_ips = tuple(rng.sample((ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("2001:db8::7")),
                                    rng.choice((0, 0, 0, 1, 2))))
    ingress = tuple(model.LoadBalancerIngress(ipaddress.ip_address(a), rng.choice((None, "VIP", "Proxy")))
                    for a in rng.sample(("198.51.100.9", "2001:db8:1::9"), rng.randint(0, 2)))
    ranges = tuple(ipaddress.ip_network(r) for r in rng.sample(("172.18.0.0/16", "203.0.113.0/24"), rng.randint(0, 2)))
    return model.Service(
        namespace="shop", name="web", type=service_type, ports=tuple(ports), cluster_ips=cluster_ips,
        ip_families=tuple(model.family_of(a) for a in cluster_ips), external_ips=external_ips,
        load_balancer_ingress=ingress, affinity_timeout=_maybe(rng, 0.2, 600),
        external_traffic_policy=rng.choice((CLUSTER, CLUSTER, LOCAL)),
        internal_traffic_policy=rng.choice((CLUSTER, CLUSTER, LOCAL)),
        load_balancer_source_ranges=ranges,
    )


def _counting(shortcut: Callable[..., Any], counts: dict[str, int]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        result = shortcut(*args, **kwargs)
        counts["taken" if result is not None else "refused"] += 1
        return result
    return counted


def _plan(service: model.Service, slices: list[model.EndpointSlice],
          node: model.Node | None) -> list[desired.ServicePortState]:
    return semantics.service_port_states(service, slices=slices, node=node)


@pytest.mark.parametrize("seed", range(8))
def test_plain_policy_shortcut_gives_the_plan_of_the_general_rules(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    cases = [(_service(rng), _slices(rng), _node(rng)) for _ in range(400)]
    counts = {"taken": 0, "refused": 0}
    with monkeypatch.context() as patched:
        patched.setattr(semantics, "_plain_policy", _counting(semantics._plain_policy, counts))
        fast = [_plan(*case) for case in cases]
    with monkeypatch.context() as patched:
        patched.setattr(semantics, "_plain_policy", lambda *args, **kwargs: None)
        general = [_plan(*case) for case in cases]
    assert fast == general
    assert counts["taken"] > 100 and counts["refused"] > 100, counts
