"""The planner: after any sequence of changes, the plan equals planning everything afresh, and it
reports exactly the service ports whose desired state moved."""

from __future__ import annotations

import ipaddress
import random

import msgspec
import pytest

from ctlb import desired, model, planner, semantics
from ctlb.sources import store

TCP, UDP = model.Protocol.TCP, model.Protocol.UDP
NODE_NAME = "node-1"


def _ip(text: str) -> model.IPAddress:
    return ipaddress.ip_address(text)


def _service(rng: random.Random, name: str) -> model.Service:
    # Few addresses and ports, so Services often claim each other's frontends.
    ip = f"10.96.0.{rng.randint(1, 4)}"
    ports = tuple(model.ServicePort(f"p{port}", rng.choice((TCP, UDP)), port, port,
                                    node_port=30000 + port if rng.random() < 0.3 else None)
                  for port in sorted(rng.sample((80, 81, 82), rng.randint(1, 2))))
    kind = model.ServiceType.NODE_PORT if any(p.node_port for p in ports) else model.ServiceType.CLUSTER_IP
    # Some node-port Services are LoadBalancers with externalTrafficPolicy Local: a health check.
    local = kind is model.ServiceType.NODE_PORT and rng.random() < 0.5
    return model.Service(namespace=rng.choice(("a", "b")), name=name,
                         type=model.ServiceType.LOAD_BALANCER if local else kind, ports=ports,
                         cluster_ips=(_ip(ip),), ip_families=(model.IPFamily.IPv4,),
                         external_ips=(_ip("203.0.113.9"),) if rng.random() < 0.2 else (),
                         affinity_timeout=rng.choice((None, 60)),
                         external_traffic_policy=model.TrafficPolicy.LOCAL if local else model.TrafficPolicy.CLUSTER,
                         health_check_node_port=rng.choice((32000, 32001)) if local else None)


def _slice(rng: random.Random, name: str, namespace: str) -> model.EndpointSlice:
    endpoints = tuple(model.Endpoint(addresses=(_ip(f"10.244.0.{rng.randint(2, 9)}"),), ready=rng.random() < 0.8,
                                     node_name=rng.choice((NODE_NAME, "node-2")))
                      for _ in range(rng.randint(0, 3)))
    ports = tuple(model.EndpointPort(f"p{port}", protocol, 8000 + port)
                  for port in (80, 81, 82) for protocol in (TCP, UDP))
    return model.EndpointSlice(namespace=namespace, name=name, service_name=f"s{rng.randint(0, 5)}",
                               address_type="IPv4", endpoints=endpoints, ports=ports)


def _node(rng: random.Random) -> model.Node:
    taints = (semantics.TO_BE_DELETED_TAINT,) if rng.random() < 0.3 else ()
    return model.Node(name=NODE_NAME, addresses=(_ip(f"172.18.0.{rng.randint(1, 2)}"),), taints=taints)


def _random_change(rng: random.Random, objects: store.ObjectStore) -> None:
    roll = rng.random()
    if roll < 0.35:
        objects.put(_service(rng, f"s{rng.randint(0, 5)}"))
    elif roll < 0.75:
        objects.put(_slice(rng, f"x{rng.randint(0, 7)}", rng.choice(("a", "b"))))
    elif roll < 0.9:
        keys = objects.keys("Service") + objects.keys("EndpointSlice")
        if keys:
            objects.delete(rng.choice(sorted(keys)))
    else:
        objects.put(_node(rng))


def _fresh(objects: store.ObjectStore) -> desired.DesiredState:
    snap = objects.snapshot()
    # Without its Node object the planner still knows this node's name (local endpoints need it).
    node = next((n for n in snap.nodes if n.name == NODE_NAME), model.Node(name=NODE_NAME, addresses=()))
    return planner.desired_state(services=snap.services, endpoint_slices=snap.endpoint_slices, node=node)


def _fresh_health_checks(objects: store.ObjectStore) -> dict[tuple[str, str], semantics.HealthCheck]:
    checks = {}
    for service in objects.snapshot().services:
        check = semantics.health_check(service, slices=objects.slices_of(service.namespace, service.name),
                                       node_name=NODE_NAME)
        if check is not None:
            checks[(service.namespace, service.name)] = check
    return checks


@pytest.mark.parametrize("seed", range(40))
def test_incremental_plan_equals_planning_afresh_after_every_change(seed: int) -> None:
    rng = random.Random(seed)
    objects = store.ObjectStore()
    plan = planner.Planner(NODE_NAME)
    before: dict[desired.ServicePortName, desired.ServicePortState] = {}
    for _ in range(60):
        for _ in range(rng.randint(1, 3)):
            _random_change(rng, objects)
        changed = plan.update(objects, objects.take())
        state = plan.state()
        fresh = _fresh(objects)
        assert dict(state.service_ports) == dict(fresh.service_ports)
        assert state.problems == fresh.problems
        assert plan.frontend_count == fresh.frontend_count()
        assert plan.health_checks() == _fresh_health_checks(objects)
        moved = {n for n in before.keys() | state.service_ports.keys()
                 if before.get(n) != state.service_ports.get(n)}
        assert moved <= changed.keys(), "every moved service port is reported"
        assert all(changed[n] is before.get(n) for n in changed), "with the state it had before"
        assert all(before.get(n) is not state.service_ports.get(n) for n in changed), "unmoved ports keep identity"
        before = dict(state.service_ports)


@pytest.mark.parametrize("seed", range(40))
def test_planning_ahead_while_listing_then_completing_equals_planning_afresh(seed: int) -> None:
    rng = random.Random(seed)
    objects = store.ObjectStore()
    plan = planner.Planner(NODE_NAME)
    before: dict[desired.ServicePortName, desired.ServicePortState] = {}
    for _ in range(30):
        moved: planner.Moved = {}
        for _ in range(rng.randint(0, 4)):  # updates while the source lists: partial plans
            for _ in range(rng.randint(1, 3)):
                _random_change(rng, objects)
            for name, previous in plan.update(objects, objects.take(), listing=True).items():
                moved.setdefault(name, previous)
        _random_change(rng, objects)
        for name, previous in plan.update(objects, objects.take()).items():
            moved.setdefault(name, previous)
        state = plan.state()
        fresh = _fresh(objects)
        assert dict(state.service_ports) == dict(fresh.service_ports)
        assert state.problems == fresh.problems
        assert plan.frontend_count == fresh.frontend_count()
        assert plan.health_checks() == _fresh_health_checks(objects)
        now_moved = {n for n in before.keys() | state.service_ports.keys()
                     if before.get(n) != state.service_ports.get(n)}
        assert now_moved <= moved.keys(), "every moved service port is reported, by one update or another"
        assert all(moved[n] is before.get(n) for n in moved), "with the state it had before the first"
        before = dict(state.service_ports)


def test_planning_while_listing_leaves_a_service_without_slices_for_later() -> None:
    objects = store.ObjectStore()
    objects.put(model.Node(name=NODE_NAME, addresses=()))
    objects.put(_web())
    objects.put(_web("10.96.0.11", name="api"))
    objects.put(_web_slice("10.244.0.2", name="api-1", service="api"))
    plan = planner.Planner(NODE_NAME)

    ahead = plan.update(objects, objects.take(), listing=True)
    done = plan.update(objects, objects.take())

    assert ({n.name for n in ahead}, {n.name for n in done}) == ({"api"}, {"web"})


def test_planning_while_listing_waits_for_the_node() -> None:
    objects = store.ObjectStore()
    objects.put(_web())
    objects.put(_web_slice("10.244.0.2"))
    plan = planner.Planner(NODE_NAME)

    ahead = plan.update(objects, objects.take(), listing=True)
    objects.put(model.Node(name=NODE_NAME, addresses=()))
    later = plan.update(objects, objects.take(), listing=True)

    assert (ahead, {n.name for n in later}) == ({}, {"web"})


def _web(ip: str = "10.96.0.10", *, name: str = "web", namespace: str = "shop") -> model.Service:
    return model.Service(namespace=namespace, name=name, type=model.ServiceType.CLUSTER_IP,
                         ports=(model.ServicePort("http", TCP, 80, 8080),), cluster_ips=(_ip(ip),),
                         ip_families=(model.IPFamily.IPv4,))


def _web_slice(*addresses: str, name: str = "web-1", service: str = "web") -> model.EndpointSlice:
    return model.EndpointSlice(namespace="shop", name=name, service_name=service, address_type="IPv4",
                               endpoints=tuple(model.Endpoint(addresses=(_ip(a),), ready=True) for a in addresses),
                               ports=(model.EndpointPort("http", TCP, 8080),))


def test_one_changed_slice_recomputes_only_its_service() -> None:
    objects = store.ObjectStore()
    for i in range(50):
        objects.put(_web(f"10.96.1.{i}", name=f"web{i}"))
        objects.put(_web_slice("10.244.0.2", name=f"web{i}-1", service=f"web{i}"))
    plan = planner.Planner(NODE_NAME)
    plan.update(objects, objects.take())
    untouched = plan.state().service_ports
    kept = {name: state for name, state in untouched.items() if name.name != "web7"}
    objects.put(_web_slice("10.244.0.3", name="web7-1", service="web7"))
    changed = plan.update(objects, objects.take())
    assert [n.name for n in changed] == ["web7"]
    assert all(plan.state().service_ports[name] is state for name, state in kept.items())


def test_slice_moving_between_services_updates_both() -> None:
    objects = store.ObjectStore()
    objects.put(_web(name="a"))
    objects.put(_web("10.96.0.11", name="b"))
    objects.put(_web_slice("10.244.0.2", name="x", service="a"))
    plan = planner.Planner(NODE_NAME)
    plan.update(objects, objects.take())
    objects.put(_web_slice("10.244.0.2", name="x", service="b"))
    changed = plan.update(objects, objects.take())
    assert {n.name for n in changed} == {"a", "b"}
    backends = {n.name: sp.backends for n, sp in plan.state().service_ports.items()}
    assert backends == {"a": (), "b": (desired.Backend(_ip("10.244.0.2"), 8080),)}


def test_frontend_passes_to_the_next_claimant_when_its_owner_goes() -> None:
    objects = store.ObjectStore()
    objects.put(_web(name="a"))
    objects.put(_web(name="b"))  # same ClusterIP: loses it to shop/a
    plan = planner.Planner(NODE_NAME)
    plan.update(objects, objects.take())
    assert [n.name for n in plan.state().service_ports] == ["a"]
    assert [p.ref for p in plan.state().problems] == ["Service shop/b"]
    objects.delete(("Service", "shop", "a"))
    changed = plan.update(objects, objects.take())
    assert {n.name for n in changed} == {"a", "b"}
    assert [n.name for n in plan.state().service_ports] == ["b"]
    assert plan.state().problems == ()


def test_nothing_changed_reports_nothing() -> None:
    objects = store.ObjectStore()
    objects.put(_web())
    plan = planner.Planner(NODE_NAME)
    plan.update(objects, objects.take())
    objects.put(msgspec.structs.replace(_web()))  # an equal value is no change at all
    assert objects.take() is None
    assert plan.update(objects, store.Changes(before={("Service", "shop", "web"): _web()},
                                              problems_changed=False)) == {}
