"""kube-proxy's endpoint rules, one table per rule: what a socket on this node gets at each frontend.

The cluster below: this node is node-1 in zone-a; node-2 is also in zone-a; node-3 and node-4 are in
zone-b. Pod addresses say their node: 10.244.<node>.x and fd00:10:244:<node>::x.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest

from ctlb import desired, model, planner, semantics

TCP, UDP, SCTP = model.Protocol.TCP, model.Protocol.UDP, model.Protocol.SCTP
IPv4, IPv6 = model.IPFamily.IPv4, model.IPFamily.IPv6
CLUSTER, LOCAL = model.TrafficPolicy.CLUSTER, model.TrafficPolicy.LOCAL
Type = model.ServiceType
Kind = desired.FrontendKind

ZONES = {"node-1": "zone-a", "node-2": "zone-a", "node-3": "zone-b", "node-4": "zone-b"}
HTTP = model.EndpointPort("http", TCP, 8080)


# --- builders --------------------------------------------------------------------------------


def _ip(text: str) -> model.IPAddress:
    return ipaddress.ip_address(text)


def _node(name: str = "node-1", *, zone: str | None = "zone-a") -> model.Node:
    labels = [("kubernetes.io/hostname", name)]
    if zone is not None:
        labels.append(("topology.kubernetes.io/zone", zone))
    return model.Node(name=name, addresses=(_ip("172.18.0.3"), _ip("fc00::3")), labels=tuple(sorted(labels)))


THIS_NODE = _node()


def _port(name: str = "http", port: int = 80, *, protocol: model.Protocol = TCP,
          node_port: int | None = None) -> model.ServicePort:
    return model.ServicePort(name=name, protocol=protocol, port=port, target_port=name, node_port=node_port)


def _service(
    *,
    type: model.ServiceType = Type.CLUSTER_IP,
    cluster_ips: tuple[str, ...] = ("10.96.0.10",),
    ports: tuple[model.ServicePort, ...] | None = None,
    external_ips: tuple[str, ...] = (),
    ingress: tuple[tuple[str, str | None], ...] = (),
    itp: model.TrafficPolicy = CLUSTER,
    etp: model.TrafficPolicy = CLUSTER,
    source_ranges: tuple[str, ...] = (),
    traffic_distribution: str | None = None,
) -> model.Service:
    if ports is None:
        has_node_port = type in (Type.NODE_PORT, Type.LOAD_BALANCER)
        ports = (_port(node_port=30080 if has_node_port else None),)
    return model.Service(
        namespace="shop",
        name="web",
        type=type,
        ports=ports,
        cluster_ips=tuple(_ip(a) for a in cluster_ips),
        ip_families=tuple(model.family_of(_ip(a)) for a in cluster_ips),
        external_ips=tuple(_ip(a) for a in external_ips),
        load_balancer_ingress=tuple(model.LoadBalancerIngress(_ip(a), mode) for a, mode in ingress),
        external_traffic_policy=etp,
        internal_traffic_policy=itp,
        load_balancer_source_ranges=tuple(ipaddress.ip_network(r) for r in source_ranges),
        traffic_distribution=traffic_distribution,
    )


def _ep(
    address: str,
    node: str | None = None,
    *,
    ready: bool | None = True,
    serving: bool | None = True,
    terminating: bool | None = False,
    zones: tuple[str, ...] = (),
    nodes: tuple[str, ...] = (),
) -> model.Endpoint:
    """An endpoint as the EndpointSlice controller writes it; its node is read from the address."""
    if node is None:
        node = f"node-{address.split('.')[2]}" if "." in address else f"node-{address.split(':')[3]}"
    return model.Endpoint(
        addresses=(_ip(address),), ready=ready, serving=serving, terminating=terminating,
        node_name=node, zone=ZONES.get(node), hint_zones=zones, hint_nodes=nodes,
    )


def _terminating(address: str, node: str | None = None, *, serving: bool | None = True,
                 zones: tuple[str, ...] = ()) -> model.Endpoint:
    """A pod being deleted: not ready, terminating, serving while its readiness probe passes."""
    return _ep(address, node, ready=False, serving=serving, terminating=True, zones=zones)


def _not_ready(address: str, node: str | None = None) -> model.Endpoint:
    return _ep(address, node, ready=False, serving=False, terminating=False)


def _slice(*endpoints: model.Endpoint, name: str = "web-abcde", address_type: str = "IPv4",
           ports: tuple[model.EndpointPort, ...] = (HTTP,)) -> model.EndpointSlice:
    return model.EndpointSlice(
        namespace="shop", name=name, service_name="web", address_type=address_type, endpoints=endpoints,
        ports=ports, labels=(("kubernetes.io/service-name", "web"),),
    )


def _be(address: str, port: int = 8080) -> desired.Backend:
    return desired.Backend(_ip(address), port)


def _bes(*addresses: str) -> tuple[desired.Backend, ...]:
    return tuple(sorted(_be(a) for a in addresses))


def _states(service: model.Service, slices: Sequence[model.EndpointSlice],
            node: model.Node | None = THIS_NODE) -> list[desired.ServicePortState]:
    return semantics.service_port_states(service, slices=slices, node=node)


def _only(service: model.Service, slices: Sequence[model.EndpointSlice],
          node: model.Node | None = THIS_NODE) -> desired.ServicePortState:
    (state,) = _states(service, slices, node)
    return state


# --- 1. endpoint conditions, with kube-proxy's defaults ----------------------------------------

# How an endpoint with these conditions is used: "ready" (always), "fallback" (only when no endpoint
# anywhere is ready: KEP-1669's serving-terminating fallback) or "never".
CONDITIONS = [
    ((None, None, None), "ready"),
    ((True, True, False), "ready"),
    ((True, None, None), "ready"),
    ((None, None, True), "ready"),
    ((False, None, None), "never"),
    ((False, False, False), "never"),
    ((False, True, None), "never"),
    ((False, True, True), "fallback"),
    ((False, None, True), "fallback"),
    ((False, False, True), "never"),
]
CONDITION_IDS = [
    "all-unset-is-ready", "ready", "ready-serving-terminating-unset", "ready-unset-while-terminating",
    "not-ready-serving-unset-not-terminating", "not-ready-not-serving", "terminating-unset-is-false",
    "serving-terminating", "serving-unset-is-true-when-terminating", "terminating-not-serving",
]


@pytest.mark.parametrize(("conditions", "use"), CONDITIONS, ids=CONDITION_IDS)
def test_endpoint_alone_is_used_when_ready_or_serving_and_terminating(
    conditions: tuple[bool | None, bool | None, bool | None], use: str
) -> None:
    ready, serving, terminating = conditions
    endpoint = _ep("10.244.2.5", ready=ready, serving=serving, terminating=terminating)

    state = _only(_service(), [_slice(endpoint)])

    assert state.backends == (_bes("10.244.2.5") if use in ("ready", "fallback") else ())


@pytest.mark.parametrize(("conditions", "use"), CONDITIONS, ids=CONDITION_IDS)
def test_endpoint_beside_a_ready_one_is_used_only_when_ready(
    conditions: tuple[bool | None, bool | None, bool | None], use: str
) -> None:
    ready, serving, terminating = conditions
    endpoint = _ep("10.244.2.5", ready=ready, serving=serving, terminating=terminating)

    state = _only(_service(), [_slice(endpoint, _ep("10.244.3.7"))])

    assert state.backends == (_bes("10.244.2.5", "10.244.3.7") if use == "ready" else _bes("10.244.3.7"))


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (_ep("10.244.2.5"), _terminating("10.244.2.5"), _bes("10.244.2.5", "10.244.3.7")),
        (_terminating("10.244.2.5"), _ep("10.244.2.5"), _bes("10.244.2.5", "10.244.3.7")),
        (_not_ready("10.244.2.5"), _ep("10.244.2.5"), _bes("10.244.2.5", "10.244.3.7")),
        (_terminating("10.244.2.5", serving=False), _terminating("10.244.2.5"), _bes("10.244.3.7")),
    ],
    ids=["ready-then-terminating", "terminating-then-ready", "not-ready-then-ready", "both-terminating"],
)
def test_backend_listed_twice_takes_its_non_terminating_copy_whatever_the_slice_order(
    first: model.Endpoint, second: model.Endpoint, expected: tuple[desired.Backend, ...]
) -> None:
    for names in (("web-a", "web-b"), ("web-b", "web-a")):
        slices = [_slice(first, name=names[0]), _slice(second, _ep("10.244.3.7"), name=names[1])]

        assert _only(_service(), slices).backends == expected


# --- 2. slices of the frontend's family only -------------------------------------------------


@pytest.mark.parametrize(
    ("cluster_ips", "slices", "expected"),
    [
        (("10.96.0.10",), [_slice(_ep("fd00:10:244:2::5"), address_type="IPv6")], {IPv4: ()}),
        (("fd00:10:96::a",), [_slice(_ep("10.244.2.5"))], {IPv6: ()}),
        (("10.96.0.10", "fd00:10:96::a"),
         [_slice(_ep("10.244.2.5"), name="web-v4"), _slice(_ep("fd00:10:244:2::5"), name="web-v6", address_type="IPv6")],
         {IPv4: _bes("10.244.2.5"), IPv6: _bes("fd00:10:244:2::5")}),
        (("10.96.0.10",), [_slice(address_type="FQDN")], {IPv4: ()}),
    ],
    ids=["ipv4-service-ignores-ipv6-slice", "ipv6-service-ignores-ipv4-slice", "dual-stack-each-family-its-own",
         "fqdn-slice-ignored"],
)
def test_only_slices_of_the_service_ports_family_give_backends(
    cluster_ips: tuple[str, ...], slices: list[model.EndpointSlice],
    expected: dict[model.IPFamily, tuple[desired.Backend, ...]],
) -> None:
    states = _states(_service(cluster_ips=cluster_ips), slices)

    assert {state.name.family: state.backends for state in states} == expected


# --- 3. terminating fallback, cluster-wide and node-local independently -----------------------

# Endpoints of one Service; this node is node-1.
READY_REMOTE = _ep("10.244.3.7")
READY_LOCAL = _ep("10.244.1.4")
TERMINATING_REMOTE = _terminating("10.244.3.8")
TERMINATING_LOCAL = _terminating("10.244.1.5")
TERMINATING_LOCAL_NOT_SERVING = _terminating("10.244.1.6", serving=False)


@pytest.mark.parametrize(
    ("endpoints", "itp", "expected"),
    [
        ((READY_REMOTE, TERMINATING_REMOTE, TERMINATING_LOCAL), CLUSTER, _bes("10.244.3.7")),
        ((TERMINATING_REMOTE, TERMINATING_LOCAL), CLUSTER, _bes("10.244.3.8", "10.244.1.5")),
        ((TERMINATING_REMOTE, TERMINATING_LOCAL_NOT_SERVING), CLUSTER, _bes("10.244.3.8")),
        ((READY_LOCAL, TERMINATING_LOCAL, READY_REMOTE), LOCAL, _bes("10.244.1.4")),
        ((TERMINATING_LOCAL, READY_REMOTE), LOCAL, _bes("10.244.1.5")),
        ((TERMINATING_LOCAL, TERMINATING_LOCAL_NOT_SERVING, READY_REMOTE), LOCAL, _bes("10.244.1.5")),
        ((TERMINATING_LOCAL_NOT_SERVING, READY_REMOTE), LOCAL, ()),
    ],
    ids=["cluster-ready-wins-over-terminating", "cluster-falls-back-to-serving-terminating",
         "cluster-fallback-skips-not-serving", "local-ready-wins-over-terminating",
         "local-falls-back-although-ready-elsewhere", "local-fallback-skips-not-serving",
         "local-terminating-not-serving-is-no-fallback"],
)
def test_terminating_endpoints_are_a_fallback_for_each_policy_on_its_own(
    endpoints: tuple[model.Endpoint, ...], itp: model.TrafficPolicy, expected: tuple[desired.Backend, ...]
) -> None:
    assert _only(_service(itp=itp), [_slice(*endpoints)]).backends == expected


def test_local_and_cluster_wide_sets_fall_back_independently() -> None:
    # This node has only a terminating pod; another node has a ready one. ClusterIP traffic under
    # iTP Local uses the local terminating pod; external frontends use the cluster-wide ready one.
    service = _service(itp=LOCAL, external_ips=("192.0.2.10",))

    state = _only(service, [_slice(TERMINATING_LOCAL, READY_REMOTE)])

    assert (state.backends, state.external_backends, state.drop) == (_bes("10.244.1.5"), _bes("10.244.3.7"), False)


# --- 4, 6. internalTrafficPolicy Local: drop versus refuse ------------------------------------


@pytest.mark.parametrize(
    ("itp", "endpoints", "node", "expected"),
    [
        (LOCAL, (READY_LOCAL, READY_REMOTE), THIS_NODE, (_bes("10.244.1.4"), False)),
        (LOCAL, (READY_REMOTE,), THIS_NODE, ((), True)),
        (LOCAL, (TERMINATING_REMOTE,), THIS_NODE, ((), True)),
        (LOCAL, (_not_ready("10.244.3.9"),), THIS_NODE, ((), False)),
        (LOCAL, (), THIS_NODE, ((), False)),
        (LOCAL, (READY_LOCAL,), None, ((), True)),
        (LOCAL, (READY_LOCAL,), _node("node-3", zone="zone-b"), ((), True)),
        (CLUSTER, (), THIS_NODE, ((), False)),
        (CLUSTER, (_not_ready("10.244.3.9"),), THIS_NODE, ((), False)),
    ],
    ids=["local-endpoint-serves", "only-remote-ready-drops", "only-remote-terminating-drops",
         "only-not-ready-refuses", "no-endpoints-refuses", "unknown-node-has-nothing-local-drops",
         "endpoint-of-another-node-drops", "cluster-policy-no-endpoints-refuses",
         "cluster-policy-only-not-ready-refuses"],
)
def test_internal_traffic_policy_local_drops_when_only_other_nodes_have_endpoints(
    itp: model.TrafficPolicy, endpoints: tuple[model.Endpoint, ...], node: model.Node | None,
    expected: tuple[tuple[desired.Backend, ...], bool],
) -> None:
    state = _only(_service(itp=itp), [_slice(*endpoints)], node)

    assert (state.backends, state.drop) == expected


# --- 5. externalTrafficPolicy and node-local sockets at external frontends --------------------

LB = (("198.51.100.7", "VIP"),)


@pytest.mark.parametrize(
    ("service", "endpoints", "expected"),
    [
        # (backends, external_backends, local_backends)
        (_service(type=Type.NODE_PORT, etp=LOCAL), (READY_REMOTE,), (_bes("10.244.3.7"), None, ())),
        (_service(type=Type.LOAD_BALANCER, ingress=LB, etp=LOCAL), (READY_REMOTE,), (_bes("10.244.3.7"), None, ())),
        (_service(external_ips=("192.0.2.10",), etp=LOCAL), (READY_REMOTE,), (_bes("10.244.3.7"), None, ())),
        (_service(type=Type.NODE_PORT, etp=LOCAL), (READY_LOCAL, READY_REMOTE),
         (_bes("10.244.1.4", "10.244.3.7"), None, _bes("10.244.1.4"))),
        (_service(type=Type.NODE_PORT, etp=LOCAL), (TERMINATING_LOCAL, READY_REMOTE),
         (_bes("10.244.3.7"), None, _bes("10.244.1.5"))),
        (_service(type=Type.NODE_PORT, etp=CLUSTER), (READY_LOCAL, READY_REMOTE),
         (_bes("10.244.1.4", "10.244.3.7"), None, None)),
        (_service(etp=LOCAL), (READY_LOCAL, READY_REMOTE), (_bes("10.244.1.4", "10.244.3.7"), None, None)),
        (_service(type=Type.NODE_PORT, itp=LOCAL), (READY_LOCAL, READY_REMOTE),
         (_bes("10.244.1.4"), _bes("10.244.1.4", "10.244.3.7"), None)),
        (_service(type=Type.LOAD_BALANCER, ingress=LB, itp=LOCAL, etp=LOCAL), (READY_REMOTE,),
         ((), _bes("10.244.3.7"), ())),
        (_service(itp=LOCAL), (READY_REMOTE,), ((), None, None)),
        (_service(type=Type.LOAD_BALANCER, ingress=(("198.51.100.7", "Proxy"),), itp=LOCAL), (READY_REMOTE,),
         ((), _bes("10.244.3.7"), None)),
    ],
    ids=["etp-local-node-port-short-circuits-to-cluster", "etp-local-load-balancer-short-circuits-to-cluster",
         "etp-local-external-ip-short-circuits-to-cluster", "etp-local-keeps-this-nodes-set-for-outside-traffic",
         "etp-local-set-falls-back-to-terminating", "etp-cluster-has-no-local-set",
         "etp-local-without-external-frontends-has-no-local-set", "itp-local-external-frontends-get-cluster-set",
         "itp-and-etp-local-external-frontends-get-cluster-set", "itp-local-cluster-ip-only-needs-no-external-set",
         "proxy-mode-ingress-still-has-its-node-port"],
)
def test_sockets_on_this_node_get_the_cluster_wide_set_at_external_frontends(
    service: model.Service, endpoints: tuple[model.Endpoint, ...],
    expected: tuple[tuple[desired.Backend, ...], tuple[desired.Backend, ...] | None, tuple[desired.Backend, ...] | None],
) -> None:
    state = _only(service, [_slice(*endpoints)])

    assert (state.backends, state.external_backends, state.local_backends) == expected


def test_external_frontends_with_no_endpoints_anywhere_refuse() -> None:
    state = _only(_service(type=Type.NODE_PORT, itp=LOCAL, etp=LOCAL), [_slice(_not_ready("10.244.3.9"))])

    assert (state.backends, state.drop, state.external_backends, state.local_backends) == ((), False, None, ())


def test_node_port_counts_as_external_access_even_without_a_node() -> None:
    state = _only(_service(type=Type.NODE_PORT, itp=LOCAL, etp=LOCAL), [_slice(READY_REMOTE)], node=None)

    assert (list(state.frontends.values()), state.external_backends, state.local_backends) == (
        [Kind.CLUSTER_IP], _bes("10.244.3.7"), ())


# --- topology hints -----------------------------------------------------------------------------

A, B = ("zone-a",), ("zone-b",)


@pytest.mark.parametrize(
    ("endpoints", "node", "expected"),
    [
        ((_ep("10.244.2.5", zones=A), _ep("10.244.3.7", zones=B)), THIS_NODE, _bes("10.244.2.5")),
        ((_ep("10.244.2.5", zones=("zone-a", "zone-b")), _ep("10.244.3.7", zones=B)), THIS_NODE, _bes("10.244.2.5")),
        ((_ep("10.244.2.5", zones=A), _ep("10.244.3.7")), THIS_NODE, _bes("10.244.2.5", "10.244.3.7")),
        ((_ep("10.244.3.6", zones=B), _ep("10.244.3.7", zones=B)), THIS_NODE, _bes("10.244.3.6", "10.244.3.7")),
        ((_ep("10.244.2.5", zones=A), _ep("10.244.3.7", zones=B)), _node(zone=None),
         _bes("10.244.2.5", "10.244.3.7")),
        ((_ep("10.244.2.5", zones=A), _ep("10.244.3.7", zones=B)), None, _bes("10.244.2.5", "10.244.3.7")),
        ((_ep("10.244.2.5", zones=A), _ep("10.244.3.7", zones=B), _not_ready("10.244.3.9")), THIS_NODE,
         _bes("10.244.2.5")),
        ((_terminating("10.244.2.5", zones=A), _terminating("10.244.3.7", zones=B)), THIS_NODE,
         _bes("10.244.2.5", "10.244.3.7")),
        ((_ep("10.244.2.5", zones=A), _ep("10.244.3.7", zones=B), _terminating("10.244.2.6", zones=A)), THIS_NODE,
         _bes("10.244.2.5")),
    ],
    ids=["zone-hints-applied", "endpoint-hinted-for-several-zones", "ignored-when-a-ready-endpoint-lacks-a-hint",
         "ignored-when-no-hint-names-this-zone", "ignored-when-node-has-no-zone-label", "ignored-when-node-unknown",
         "not-ready-endpoints-need-no-hint", "terminating-fallback-ignores-hints",
         "terminating-endpoint-in-zone-not-used-while-ready-ones-are"],
)
def test_zone_hints_narrow_the_cluster_wide_set_as_kube_proxy_applies_them(
    endpoints: tuple[model.Endpoint, ...], node: model.Node | None, expected: tuple[desired.Backend, ...]
) -> None:
    assert _only(_service(), [_slice(*endpoints)], node).backends == expected


N1, N3 = ("node-1",), ("node-3",)


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        ((_ep("10.244.1.4", zones=A, nodes=N1), _ep("10.244.2.5", zones=A, nodes=("node-2",)),
          _ep("10.244.3.7", zones=B, nodes=N3)), _bes("10.244.1.4")),
        ((_ep("10.244.2.5", zones=A, nodes=("node-2",)), _ep("10.244.3.7", zones=B, nodes=N3)), _bes("10.244.2.5")),
        ((_ep("10.244.1.4", zones=A, nodes=N1), _ep("10.244.2.5", zones=A), _ep("10.244.3.7", zones=B, nodes=N3)),
         _bes("10.244.1.4", "10.244.2.5")),
        ((_ep("10.244.1.4", nodes=N1), _ep("10.244.3.7", nodes=N3)), _bes("10.244.1.4")),
        ((_ep("10.244.3.6", nodes=N3), _ep("10.244.3.7", nodes=N3)), _bes("10.244.3.6", "10.244.3.7")),
    ],
    ids=["node-hints-applied-first", "no-node-hint-for-this-node-falls-to-zone-hints",
         "an-endpoint-without-node-hint-falls-to-zone-hints", "node-hints-without-zone-hints",
         "no-node-or-zone-match-uses-every-endpoint"],
)
def test_node_hints_narrow_the_cluster_wide_set_before_zone_hints(
    endpoints: tuple[model.Endpoint, ...], expected: tuple[desired.Backend, ...]
) -> None:
    assert _only(_service(), [_slice(*endpoints)]).backends == expected


def test_topology_narrows_neither_the_local_set_nor_the_drop_decision() -> None:
    # iTP Local: this node's endpoint is used although its hint names another zone.
    endpoints = (_ep("10.244.1.4", zones=B), _ep("10.244.2.5", zones=A), _ep("10.244.3.7", zones=B))

    state = _only(_service(itp=LOCAL, external_ips=("192.0.2.10",)), [_slice(*endpoints)])

    assert (state.backends, state.external_backends) == (_bes("10.244.1.4"), _bes("10.244.2.5"))


def test_topology_applies_to_external_frontends_through_the_shared_cluster_set() -> None:
    endpoints = (_ep("10.244.2.5", zones=A), _ep("10.244.3.7", zones=B))

    state = _only(_service(type=Type.LOAD_BALANCER, ingress=LB), [_slice(*endpoints)])

    assert (state.backends, state.external_backends) == (_bes("10.244.2.5"), None)


# --- trafficDistribution ---------------------------------------------------------------------


def _hinted_by_controller(traffic_distribution: str | None, *addresses: str) -> tuple[model.Endpoint, ...]:
    """Endpoints with the hints the EndpointSlice controller writes for a trafficDistribution value
    (KEP-4444, KEP-3015): its own zone for PreferClose/PreferSameZone, plus its own node for
    PreferSameNode; none otherwise."""
    endpoints = []
    for address in addresses:
        node = f"node-{address.split('.')[2]}"
        zones = (ZONES[node],) if traffic_distribution in ("PreferClose", "PreferSameZone", "PreferSameNode") else ()
        nodes = (node,) if traffic_distribution == "PreferSameNode" else ()
        endpoints.append(_ep(address, node, zones=zones, nodes=nodes))
    return tuple(endpoints)


@pytest.mark.parametrize(
    ("traffic_distribution", "addresses", "expected"),
    [
        (None, ("10.244.1.4", "10.244.2.5", "10.244.3.7"), _bes("10.244.1.4", "10.244.2.5", "10.244.3.7")),
        ("PreferClose", ("10.244.1.4", "10.244.2.5", "10.244.3.7"), _bes("10.244.1.4", "10.244.2.5")),
        ("PreferClose", ("10.244.3.7", "10.244.4.2"), _bes("10.244.3.7", "10.244.4.2")),
        ("PreferSameZone", ("10.244.2.5", "10.244.3.7"), _bes("10.244.2.5")),
        ("PreferSameNode", ("10.244.1.4", "10.244.2.5", "10.244.3.7"), _bes("10.244.1.4")),
        ("PreferSameNode", ("10.244.2.5", "10.244.2.6", "10.244.3.7"), _bes("10.244.2.5", "10.244.2.6")),
        ("PreferSameNode", ("10.244.3.7", "10.244.4.2"), _bes("10.244.3.7", "10.244.4.2")),
    ],
    ids=["unset-no-hints-every-endpoint", "prefer-close-same-zone", "prefer-close-none-in-zone-every-endpoint",
         "prefer-same-zone", "prefer-same-node", "prefer-same-node-none-here-same-zone",
         "prefer-same-node-none-in-zone-every-endpoint"],
)
def test_traffic_distribution_works_through_the_hints_the_controller_writes(
    traffic_distribution: str | None, addresses: tuple[str, ...], expected: tuple[desired.Backend, ...]
) -> None:
    service = _service(traffic_distribution=traffic_distribution)

    assert _only(service, [_slice(*_hinted_by_controller(traffic_distribution, *addresses))]).backends == expected


def test_hints_are_applied_whatever_the_services_traffic_distribution() -> None:
    # kube-proxy reads only the hints since 1.33: a Service without trafficDistribution (or one
    # whose hints come from the topology-mode annotation, or a third-party controller) is narrowed.
    endpoints = _hinted_by_controller("PreferClose", "10.244.2.5", "10.244.3.7")

    assert _only(_service(traffic_distribution=None), [_slice(*endpoints)]).backends == _bes("10.244.2.5")


# --- dual-stack --------------------------------------------------------------------------------


def test_dual_stack_families_apply_the_policies_each_to_its_own_endpoints() -> None:
    service = _service(cluster_ips=("10.96.0.10", "fd00:10:96::a"), itp=LOCAL)
    slices = [
        _slice(_ep("10.244.1.4"), _ep("10.244.3.7"), name="web-v4"),
        _slice(_ep("fd00:10:244:3::7"), name="web-v6", address_type="IPv6"),
    ]

    states = _states(service, slices)

    assert {s.name.family: (s.backends, s.drop) for s in states} == {
        IPv4: (_bes("10.244.1.4"), False),
        IPv6: ((), True),
    }


# --- protocols -----------------------------------------------------------------------------------


def test_tcp_udp_and_sctp_ports_are_separate_service_ports_with_their_own_slice_ports() -> None:
    service = _service(ports=(_port("dns", 53, protocol=UDP), _port("dns-tcp", 53, protocol=TCP),
                              _port("sig", 3868, protocol=SCTP)))
    slice_ports = (model.EndpointPort("dns", UDP, 5353), model.EndpointPort("dns-tcp", TCP, 5354),
                   model.EndpointPort("sig", SCTP, 3869), model.EndpointPort("sig", TCP, 3870))

    states = _states(service, [_slice(_ep("10.244.2.5"), ports=slice_ports)])

    assert {(s.name.port, s.name.protocol): (list(s.frontends), s.backends) for s in states} == {
        ("dns", UDP): ([desired.Frontend(_ip("10.96.0.10"), 53, UDP)], (_be("10.244.2.5", 5353),)),
        ("dns-tcp", TCP): ([desired.Frontend(_ip("10.96.0.10"), 53, TCP)], (_be("10.244.2.5", 5354),)),
        ("sig", SCTP): ([desired.Frontend(_ip("10.96.0.10"), 3868, SCTP)], (_be("10.244.2.5", 3869),)),
    }


# --- 7. loadBalancerSourceRanges ---------------------------------------------------------------

RANGES = ("203.0.113.0/24", "198.51.100.0/25", "2001:db8::/32")
DUAL_LB = (("198.51.100.7", "VIP"), ("2001:db8:7::7", "VIP"))


def _nets(*ranges: str) -> tuple[desired.SourceRange, ...]:
    return tuple(ipaddress.ip_network(r) for r in ranges)


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        (_service(type=Type.LOAD_BALANCER, cluster_ips=("10.96.0.10", "fd00:10:96::a"), ingress=DUAL_LB,
                  source_ranges=RANGES),
         {IPv4: _nets("203.0.113.0/24", "198.51.100.0/25"), IPv6: _nets("2001:db8::/32")}),
        (_service(type=Type.LOAD_BALANCER, cluster_ips=("10.96.0.10", "fd00:10:96::a"), ingress=DUAL_LB,
                  source_ranges=("203.0.113.0/24",)),
         {IPv4: _nets("203.0.113.0/24"), IPv6: ()}),
        (_service(type=Type.LOAD_BALANCER, cluster_ips=("10.96.0.10", "fd00:10:96::a"), ingress=LB,
                  source_ranges=RANGES),
         {IPv4: _nets("203.0.113.0/24", "198.51.100.0/25"), IPv6: ()}),
        (_service(type=Type.LOAD_BALANCER, ingress=(("198.51.100.7", "Proxy"),), source_ranges=RANGES), {IPv4: ()}),
        (_service(type=Type.LOAD_BALANCER, source_ranges=RANGES), {IPv4: ()}),
        (_service(type=Type.NODE_PORT, external_ips=("192.0.2.10",), source_ranges=RANGES), {IPv4: ()}),
        (_service(type=Type.LOAD_BALANCER, ingress=LB), {IPv4: ()}),
    ],
    ids=["each-family-gets-its-own-ranges", "family-without-ranges-is-unrestricted",
         "family-without-load-balancer-ip-carries-none", "proxy-mode-ingress-carries-none",
         "no-ingress-yet-carries-none", "node-ports-and-external-ips-are-never-restricted", "no-ranges"],
)
def test_source_ranges_are_carried_per_family_for_load_balancer_frontends(
    service: model.Service, expected: dict[model.IPFamily, tuple[desired.SourceRange, ...]]
) -> None:
    assert {s.name.family: s.source_ranges for s in _states(service, [])} == expected


@pytest.mark.parametrize(
    ("ranges", "node", "expected"),
    [
        (("172.18.0.0/16",), THIS_NODE, {IPv4: True, IPv6: False}),
        (("203.0.113.0/24", "172.18.0.3/32", "fc00::/64"), THIS_NODE, {IPv4: True, IPv6: True}),
        (("203.0.113.0/24", "2001:db8::/32"), THIS_NODE, {IPv4: False, IPv6: False}),
        (("0.0.0.0/0",), THIS_NODE, {IPv4: True, IPv6: False}),
        (("172.18.0.0/16",), None, {IPv4: False, IPv6: False}),
    ],
    ids=["node-ip-in-a-range", "each-family-by-its-own-address", "node-outside", "everything", "node-unknown"],
)
def test_the_node_is_admitted_when_a_range_of_the_family_holds_one_of_its_addresses(
    ranges: tuple[str, ...], node: model.Node | None, expected: dict[model.IPFamily, bool]
) -> None:
    service = _service(type=Type.LOAD_BALANCER, cluster_ips=("10.96.0.10", "fd00:10:96::a"), ingress=DUAL_LB,
                       source_ranges=ranges)
    assert {s.name.family: s.source_ranges_admit_node for s in _states(service, [], node)} == expected


# --- conflicts keep the decisions --------------------------------------------------------------


def test_service_port_losing_a_frontend_keeps_its_traffic_decisions() -> None:
    first = model.Service(namespace="alpha", name="web", type=Type.CLUSTER_IP, ports=(_port(),),
                          cluster_ips=(_ip("10.96.0.1"),), external_ips=(_ip("192.0.2.10"),))
    second = _service(type=Type.LOAD_BALANCER, ingress=LB, external_ips=("192.0.2.10",), itp=LOCAL, etp=LOCAL,
                      source_ranges=RANGES)
    slices = [_slice(READY_REMOTE)]

    state = planner.desired_state(services=[first, second], endpoint_slices=slices, node=THIS_NODE)

    kept = state.service_ports[desired.ServicePortName("shop", "web", "http", TCP, IPv4)]
    assert desired.Frontend(_ip("192.0.2.10"), 80, TCP) not in kept.frontends
    assert (kept.backends, kept.drop, kept.external_backends, kept.local_backends, kept.source_ranges) == (
        (), True, _bes("10.244.3.7"), (), _nets("203.0.113.0/24", "198.51.100.0/25"))
