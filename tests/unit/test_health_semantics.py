"""kube-proxy's health-check rules: which Services get a healthCheckNodePort server, what it counts
as a local endpoint, when the node is eligible and when the proxy is healthy.

This node is node-1. Pod addresses say their node: 10.244.<node>.x and fd00:10:244:<node>::x.
"""

from __future__ import annotations

import ipaddress

import pytest

from ctlb import model, planner, semantics
from ctlb.sources import store

TCP = model.Protocol.TCP
IPv4, IPv6 = model.IPFamily.IPv4, model.IPFamily.IPv6
CLUSTER, LOCAL = model.TrafficPolicy.CLUSTER, model.TrafficPolicy.LOCAL
Type = model.ServiceType
HERE = "node-1"
HTTP = model.EndpointPort("http", TCP, 8080)
METRICS = model.EndpointPort("metrics", TCP, 9090)


def _ip(text: str) -> model.IPAddress:
    return ipaddress.ip_address(text)


def _service(*, type: model.ServiceType = Type.LOAD_BALANCER, etp: model.TrafficPolicy = LOCAL,
             hc_port: int | None = 32000, cluster_ips: tuple[str, ...] = ("10.96.0.10",),
             labels: tuple[tuple[str, str], ...] = (), headless: bool = False) -> model.Service:
    return model.Service(
        namespace="shop", name="web", type=type,
        ports=(model.ServicePort("http", TCP, 80, "http", node_port=30080),),
        cluster_ips=() if headless else tuple(_ip(a) for a in cluster_ips), headless=headless,
        external_traffic_policy=etp, health_check_node_port=hc_port, labels=labels,
    )


def _ep(address: str, node: str | None = None, *, ready: bool | None = True, serving: bool | None = True,
        terminating: bool | None = False) -> model.Endpoint:
    if node is None:
        node = f"node-{address.split('.')[2]}" if "." in address else f"node-{address.split(':')[3]}"
    return model.Endpoint(addresses=(_ip(address),), ready=ready, serving=serving, terminating=terminating,
                          node_name=node)


def _slice(*endpoints: model.Endpoint, name: str = "web-abcde", address_type: str = "IPv4",
           ports: tuple[model.EndpointPort, ...] = (HTTP,)) -> model.EndpointSlice:
    return model.EndpointSlice(namespace="shop", name=name, service_name="web", address_type=address_type,
                               endpoints=endpoints, ports=ports)


# --- which Services get a health check --------------------------------------------------------

WHO = [
    ("load-balancer-local-with-port", _service(), True),
    ("load-balancer-cluster", _service(etp=CLUSTER), False),
    ("load-balancer-local-without-port", _service(hc_port=None), False),
    # kube-proxy's NeedsHealthCheck asks for a LoadBalancer: a NodePort never gets one.
    ("node-port-local-with-port", _service(type=Type.NODE_PORT), False),
    ("cluster-ip", _service(type=Type.CLUSTER_IP, etp=CLUSTER, hc_port=None), False),
    # Services kube-proxy skips altogether (ShouldSkipService) get none either.
    ("other-proxy", _service(labels=((semantics.SERVICE_PROXY_NAME_LABEL, "other"),)), False),
    ("headless", _service(headless=True), False),
]


@pytest.mark.parametrize(("service", "served"), [w[1:] for w in WHO], ids=[w[0] for w in WHO])
def test_a_health_check_is_served_only_for_a_local_load_balancer_with_a_port(
        service: model.Service, served: bool) -> None:
    check = semantics.health_check(service, slices=[_slice(_ep("10.244.1.5"))], node_name=HERE)

    assert (check is not None) == served
    if check is not None:
        assert (check.namespace, check.name, check.port) == ("shop", "web", 32000)


# --- what counts as a local endpoint ----------------------------------------------------------

COUNTS = [
    # (id, slices, count)
    ("ready-here", [_slice(_ep("10.244.1.5"))], 1),
    ("ready-unset-counts-as-ready", [_slice(_ep("10.244.1.5", ready=None, serving=None, terminating=None))], 1),
    ("not-ready", [_slice(_ep("10.244.1.5", ready=False, serving=False))], 0),
    # KEP-1669: a serving-terminating endpoint still gets traffic, but fails the health check.
    ("serving-terminating", [_slice(_ep("10.244.1.5", ready=False, serving=True, terminating=True))], 0),
    ("ready-elsewhere", [_slice(_ep("10.244.2.5"), _ep("10.244.3.5"))], 0),
    ("no-node-name", [_slice(model.Endpoint(addresses=(_ip("10.244.1.5"),), ready=True))], 0),
    ("two-here-one-elsewhere", [_slice(_ep("10.244.1.5"), _ep("10.244.1.6"), _ep("10.244.2.5"))], 2),
    # One endpoint behind two ports is one endpoint (kube-proxy squashes by IP).
    ("one-address-two-ports", [_slice(_ep("10.244.1.5"), ports=(HTTP, METRICS))], 1),
    ("one-address-two-slices", [_slice(_ep("10.244.1.5")), _slice(_ep("10.244.1.5"), name="web-fghij")], 1),
    # A slice with no port gives kube-proxy no endpoint to count.
    ("slice-without-ports", [_slice(_ep("10.244.1.5"), ports=())], 0),
    # Other-family slices are another family's count.
    ("ipv6-slice-for-an-ipv4-service", [_slice(_ep("fd00:10:244:1::5"), address_type="IPv6")], 0),
    ("fqdn-slice", [_slice(address_type="FQDN")], 0),
]


@pytest.mark.parametrize(("slices", "count"), [c[1:] for c in COUNTS], ids=[c[0] for c in COUNTS])
def test_local_endpoints_are_this_nodes_ready_addresses(slices: list[model.EndpointSlice], count: int) -> None:
    check = semantics.health_check(_service(), slices=slices, node_name=HERE)

    assert check is not None
    assert check.local_endpoints == ((IPv4, count),)


def test_without_a_node_name_nothing_is_local() -> None:
    check = semantics.health_check(_service(), slices=[_slice(_ep("10.244.1.5", node=""))], node_name="")

    assert check is not None and check.local_endpoints == ((IPv4, 0),)


def test_a_dual_stack_service_counts_each_family_apart() -> None:
    service = _service(cluster_ips=("10.96.0.10", "fd00:10:96::10"))
    slices = [_slice(_ep("10.244.1.5"), _ep("10.244.1.6")),
              _slice(_ep("fd00:10:244:1::5"), name="web-v6", address_type="IPv6")]

    check = semantics.health_check(service, slices=slices, node_name=HERE)

    assert check is not None
    assert check.local_endpoints == ((IPv4, 2), (IPv6, 1))
    assert (check.local_endpoints_for(IPv4), check.local_endpoints_for(IPv6)) == (2, 1)


def test_a_check_over_a_family_the_service_lacks_is_answered_with_its_own() -> None:
    check = semantics.health_check(_service(), slices=[_slice(_ep("10.244.1.5"))], node_name=HERE)

    assert check is not None and check.local_endpoints_for(IPv6) == 1


# --- node eligibility (/healthz) --------------------------------------------------------------

ELIGIBLE = [
    ("node", model.Node(HERE, ()), True),
    ("no-node-object", None, False),
    ("being-deleted", model.Node(HERE, (), deleting=True), False),
    ("autoscaler-will-delete", model.Node(HERE, (), taints=(semantics.TO_BE_DELETED_TAINT,)), False),
    ("other-taint", model.Node(HERE, (), taints=("node.kubernetes.io/unschedulable",)), True),
]


@pytest.mark.parametrize(("node", "eligible"), [e[1:] for e in ELIGIBLE], ids=[e[0] for e in ELIGIBLE])
def test_node_is_eligible_unless_going_away(node: model.Node | None, eligible: bool) -> None:
    assert semantics.node_eligible(node) is eligible


# --- proxy health (/healthz, /livez, serviceProxyHealthy) -------------------------------------

HEALTHY = [
    # (id, synced, oldest pending, healthy) at now=1000 with a 60 s timeout
    ("starting-up-with-changes-waiting-long", False, 100.0, True),
    ("synced-nothing-pending", True, None, True),
    ("synced-change-waiting-less-than-timeout", True, 941.0, True),
    ("synced-change-waiting-exactly-timeout", True, 940.0, False),
    ("synced-change-waiting-longer", True, 100.0, False),
]


@pytest.mark.parametrize(("synced", "pending", "healthy"), [h[1:] for h in HEALTHY], ids=[h[0] for h in HEALTHY])
def test_proxy_is_unhealthy_once_a_change_waits_longer_than_the_timeout(
        synced: bool, pending: float | None, healthy: bool) -> None:
    assert semantics.proxy_healthy(synced=synced, oldest_pending=pending, now=1000.0, timeout=60.0) is healthy


# --- the planner keeps the checks current -----------------------------------------------------


def test_planner_follows_a_health_check_as_its_service_and_endpoints_change() -> None:
    objects = store.ObjectStore()
    plan = planner.Planner(HERE)
    objects.put(model.Node(HERE, (_ip("172.18.0.3"),)))
    objects.put(_service())
    objects.put(_slice(_ep("10.244.1.5")))
    plan.update(objects, objects.take())
    seen = [plan.health_checks()[("shop", "web")].local_endpoints]

    objects.put(_slice(_ep("10.244.2.5")))  # the endpoint moved to node-2
    plan.update(objects, objects.take())
    seen.append(plan.health_checks()[("shop", "web")].local_endpoints)
    objects.put(_service(etp=CLUSTER))
    plan.update(objects, objects.take())

    assert seen == [((IPv4, 1),), ((IPv4, 0),)]
    assert plan.health_checks() == {}

