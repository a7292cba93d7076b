"""kube-proxy's rules: which Services are served, at which frontends, by which backends."""

from __future__ import annotations

import ipaddress
import itertools

import pytest

from ctlb import desired, model, planner

TCP, UDP = model.Protocol.TCP, model.Protocol.UDP
IPv4, IPv6 = model.IPFamily.IPv4, model.IPFamily.IPv6
Kind = desired.FrontendKind


def _ip(text: str) -> model.IPAddress:
    return ipaddress.ip_address(text)


def _port(
    name: str = "http", port: int = 80, *, protocol: model.Protocol = TCP, target_port: int | str = "http",
    node_port: int | None = None,
) -> model.ServicePort:
    return model.ServicePort(name=name, protocol=protocol, port=port, target_port=target_port, node_port=node_port)


def _service(
    name: str = "web",
    *,
    namespace: str = "shop",
    type: model.ServiceType = model.ServiceType.CLUSTER_IP,
    cluster_ips: tuple[str, ...] = ("10.96.0.10",),
    ports: tuple[model.ServicePort, ...] = (_port(),),
    external_ips: tuple[str, ...] = (),
    ingress: tuple[model.LoadBalancerIngress, ...] = (),
    headless: bool = False,
    labels: tuple[tuple[str, str], ...] = (),
    affinity_timeout: int | None = None,
) -> model.Service:
    return model.Service(
        namespace=namespace,
        name=name,
        type=type,
        ports=ports,
        cluster_ips=tuple(_ip(a) for a in cluster_ips),
        headless=headless,
        ip_families=tuple(model.family_of(_ip(a)) for a in cluster_ips),
        external_ips=tuple(_ip(a) for a in external_ips),
        load_balancer_ingress=ingress,
        affinity_timeout=affinity_timeout,
        labels=labels,
    )


def _endpoint(*addresses: str, ready: bool | None = True) -> model.Endpoint:
    return model.Endpoint(addresses=tuple(_ip(a) for a in addresses), ready=ready, serving=ready, terminating=False)


def _slice(
    name: str = "web-abcde",
    *,
    service: str = "web",
    namespace: str = "shop",
    address_type: str = "IPv4",
    endpoints: tuple[model.Endpoint, ...] = (),
    ports: tuple[model.EndpointPort, ...] = (model.EndpointPort("http", TCP, 8080),),
) -> model.EndpointSlice:
    return model.EndpointSlice(
        namespace=namespace, name=name, service_name=service, address_type=address_type, endpoints=endpoints,
        ports=ports, labels=(("kubernetes.io/service-name", service),),
    )


NODE = model.Node(name="node-1", addresses=(_ip("172.18.0.3"), _ip("fc00::3"), _ip("203.0.113.30")))


def _name(
    name: str = "web", port: str = "http", *, namespace: str = "shop", protocol: model.Protocol = TCP,
    family: model.IPFamily = IPv4,
) -> desired.ServicePortName:
    return desired.ServicePortName(namespace=namespace, name=name, port=port, protocol=protocol, family=family)


def _fe(address: str, port: int = 80, protocol: model.Protocol = TCP) -> desired.Frontend:
    return desired.Frontend(_ip(address), port, protocol)


def _be(address: str, port: int = 8080) -> desired.Backend:
    return desired.Backend(_ip(address), port)


def _state(
    services: tuple[model.Service, ...] | list[model.Service],
    slices: tuple[model.EndpointSlice, ...] | list[model.EndpointSlice] = (),
    node: model.Node | None = NODE,
) -> desired.DesiredState:
    return planner.desired_state(services=services, endpoint_slices=slices, node=node)


# --- service ports and frontends -------------------------------------------------------------


def test_cluster_ip_service_port_is_served_at_its_cluster_ip_by_its_ready_endpoints() -> None:
    state = _state([_service()], [_slice(endpoints=(_endpoint("10.244.1.5"), _endpoint("10.244.2.9")))])

    assert state == desired.DesiredState(
        service_ports={
            _name(): desired.ServicePortState(
                name=_name(),
                frontends={_fe("10.96.0.10"): Kind.CLUSTER_IP},
                backends=(_be("10.244.1.5"), _be("10.244.2.9")),
            )
        }
    )


def test_dual_stack_service_has_one_service_port_per_family_with_that_familys_frontends_and_backends() -> None:
    service = _service(cluster_ips=("10.96.0.10", "fd00:96::a"))
    slices = [
        _slice("web-v4", endpoints=(_endpoint("10.244.1.5"),)),
        _slice("web-v6", address_type="IPv6", endpoints=(_endpoint("fd00:244:1::5"),)),
    ]

    state = _state([service], slices)

    assert {name: (sp.frontends, sp.backends) for name, sp in state.service_ports.items()} == {
        _name(family=IPv4): ({_fe("10.96.0.10"): Kind.CLUSTER_IP}, (_be("10.244.1.5"),)),
        _name(family=IPv6): ({_fe("fd00:96::a"): Kind.CLUSTER_IP}, (_be("fd00:244:1::5"),)),
    }


def test_each_service_port_is_its_own_service_port_name() -> None:
    service = _service(ports=(_port("dns", 53, protocol=UDP, target_port=53),
                              _port("dns-tcp", 53, protocol=TCP, target_port=53)))

    state = _state([service])

    assert list(state.service_ports) == [_name(port="dns", protocol=UDP), _name(port="dns-tcp", protocol=TCP)]


def test_frontends_carry_the_service_ports_protocol() -> None:
    service = _service(ports=(_port("dns", 53, protocol=UDP, target_port=53),))

    (state,) = _state([service]).service_ports.values()

    assert list(state.frontends) == [_fe("10.96.0.10", 53, UDP)]


@pytest.mark.parametrize(
    "service",
    [
        _service(labels=(("service.kubernetes.io/service-proxy-name", "cilium"),)),
        _service(labels=(("service.kubernetes.io/service-proxy-name", ""),)),
        _service(labels=(("service.kubernetes.io/headless", ""),)),
        _service(cluster_ips=(), headless=True),
        _service(type=model.ServiceType.EXTERNAL_NAME, cluster_ips=()),
        _service(cluster_ips=()),
    ],
    ids=["service-proxy-name-label", "service-proxy-name-label-empty", "headless-label", "headless",
         "external-name", "no-cluster-or-external-ip"],
)
def test_services_kube_proxy_skips_are_not_served(service: model.Service) -> None:
    assert _state([service], [_slice(endpoints=(_endpoint("10.244.1.5"),))]).service_ports == {}


def test_external_ips_are_frontends_of_their_family() -> None:
    service = _service(external_ips=("192.0.2.10", "2001:db8::10"))

    (state,) = _state([service]).service_ports.values()

    assert state.frontends == {_fe("10.96.0.10"): Kind.CLUSTER_IP, _fe("192.0.2.10"): Kind.EXTERNAL_IP}


def test_service_without_cluster_ip_is_served_in_the_families_of_its_external_ips() -> None:
    service = _service(cluster_ips=(), external_ips=("2001:db8::10",))

    state = _state([service])

    assert {name: sp.frontends for name, sp in state.service_ports.items()} == {
        _name(family=IPv6): {_fe("2001:db8::10"): Kind.EXTERNAL_IP}
    }


@pytest.mark.parametrize(
    ("ip_mode", "served"),
    [(None, True), ("VIP", True), ("Proxy", False)],
    ids=["ip-mode-unset", "ip-mode-vip", "ip-mode-proxy"],
)
def test_load_balancer_ingress_ip_is_a_frontend_unless_the_load_balancer_proxies(
    ip_mode: str | None, served: bool
) -> None:
    service = _service(
        type=model.ServiceType.LOAD_BALANCER,
        ports=(_port(node_port=30080),),
        ingress=(model.LoadBalancerIngress(_ip("198.51.100.7"), ip_mode),),
    )

    (state,) = _state([service], node=None).service_ports.values()

    assert (_fe("198.51.100.7") in state.frontends) is served


def test_load_balancer_ingress_of_a_service_that_is_no_longer_a_load_balancer_is_ignored() -> None:
    service = _service(ingress=(model.LoadBalancerIngress(_ip("198.51.100.7"), "VIP"),))

    (state,) = _state([service]).service_ports.values()

    assert list(state.frontends) == [_fe("10.96.0.10")]


@pytest.mark.parametrize(
    "service_type",
    [model.ServiceType.NODE_PORT, model.ServiceType.LOAD_BALANCER],
    ids=["node-port", "load-balancer"],
)
def test_node_port_is_a_frontend_on_each_node_address_of_the_family(service_type: model.ServiceType) -> None:
    service = _service(type=service_type, ports=(_port(node_port=30080),))

    (state,) = _state([service]).service_ports.values()

    assert state.frontends == {
        _fe("10.96.0.10"): Kind.CLUSTER_IP,
        _fe("172.18.0.3", 30080): Kind.NODE_PORT,
        _fe("203.0.113.30", 30080): Kind.NODE_PORT,
    }


@pytest.mark.parametrize(
    ("service_type", "node"),
    [(model.ServiceType.NODE_PORT, None), (model.ServiceType.CLUSTER_IP, NODE)],
    ids=["node-unknown", "cluster-ip-type-with-stale-node-port"],
)
def test_no_node_port_frontends_without_a_node_or_a_node_port_type(
    service_type: model.ServiceType, node: model.Node | None
) -> None:
    service = _service(type=service_type, ports=(_port(node_port=30080),))

    (state,) = _state([service], node=node).service_ports.values()

    assert list(state.frontends) == [_fe("10.96.0.10")]


def test_address_in_two_roles_of_one_service_is_one_frontend_of_the_first_role() -> None:
    service = _service(type=model.ServiceType.LOAD_BALANCER, external_ips=("198.51.100.7",),
                       ingress=(model.LoadBalancerIngress(_ip("198.51.100.7"), "VIP"),))

    state = _state([service])

    assert (state.service_ports[_name()].frontends[_fe("198.51.100.7")], state.problems) == (Kind.EXTERNAL_IP, ())


def test_affinity_timeout_is_carried_to_every_service_port() -> None:
    service = _service(cluster_ips=("10.96.0.10", "fd00:96::a"), affinity_timeout=600)

    assert [sp.affinity_timeout for sp in _state([service]).service_ports.values()] == [600, 600]


# --- backends --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target_port", "slice_ports", "expected"),
    [
        ("http", (model.EndpointPort("http", TCP, 8080),), (_be("10.244.1.5", 8080),)),
        (9999, (model.EndpointPort("http", TCP, 8080),), (_be("10.244.1.5", 8080),)),
        ("http", (model.EndpointPort("metrics", TCP, 9090), model.EndpointPort("http", TCP, 8080)),
         (_be("10.244.1.5", 8080),)),
        ("http", (model.EndpointPort("http", UDP, 8080),), ()),
        ("http", (model.EndpointPort("", TCP, 8080),), ()),
        ("http", (), ()),
    ],
    ids=["target-port-by-name", "slice-port-wins-over-target-port-number", "slice-port-chosen-by-name",
         "same-name-other-protocol", "unnamed-slice-port-for-named-service-port", "slice-without-ports"],
)
def test_backend_port_is_the_slice_port_named_like_the_service_port(
    target_port: int | str, slice_ports: tuple[model.EndpointPort, ...], expected: tuple[desired.Backend, ...]
) -> None:
    service = _service(ports=(_port("http", 80, target_port=target_port),))
    endpoint_slice = _slice(endpoints=(_endpoint("10.244.1.5"),), ports=slice_ports)

    (state,) = _state([service], [endpoint_slice]).service_ports.values()

    assert state.backends == expected


def test_unnamed_service_port_uses_the_unnamed_slice_port() -> None:
    service = _service(ports=(_port("", 80, target_port=8080),))
    endpoint_slice = _slice(endpoints=(_endpoint("10.244.1.5"),), ports=(model.EndpointPort("", TCP, 8080),))

    assert _state([service], [endpoint_slice]).service_ports[_name(port="")].backends == (_be("10.244.1.5"),)


@pytest.mark.parametrize(
    ("ready", "eligible"),
    [(True, True), (None, True), (False, False)],
    ids=["ready", "ready-unset-counts-as-ready", "not-ready"],
)
def test_endpoint_is_a_backend_only_when_ready(ready: bool | None, eligible: bool) -> None:
    endpoint_slice = _slice(endpoints=(_endpoint("10.244.1.5", ready=ready),))

    (state,) = _state([_service()], [endpoint_slice]).service_ports.values()

    assert state.backends == ((_be("10.244.1.5"),) if eligible else ())


def test_slices_of_a_service_are_merged_deduplicated_and_sorted() -> None:
    slices = [
        _slice("web-b", endpoints=(_endpoint("10.244.3.1"), _endpoint("10.244.1.5"))),
        _slice("web-a", endpoints=(_endpoint("10.244.1.5"), _endpoint("10.244.2.9"), _endpoint("10.244.1.10"))),
    ]

    (state,) = _state([_service()], slices).service_ports.values()

    assert state.backends == (_be("10.244.1.5"), _be("10.244.1.10"), _be("10.244.2.9"), _be("10.244.3.1"))


def test_same_address_at_two_slice_ports_is_two_backends() -> None:
    slices = [
        _slice("web-a", endpoints=(_endpoint("10.244.1.5"),), ports=(model.EndpointPort("http", TCP, 8080),)),
        _slice("web-b", endpoints=(_endpoint("10.244.1.5"),), ports=(model.EndpointPort("http", TCP, 8081),)),
    ]

    (state,) = _state([_service()], slices).service_ports.values()

    assert state.backends == (_be("10.244.1.5", 8080), _be("10.244.1.5", 8081))


def test_only_the_first_address_of_an_endpoint_is_a_backend() -> None:
    endpoint_slice = _slice(endpoints=(_endpoint("10.244.1.5", "10.244.1.6"),))

    (state,) = _state([_service()], [endpoint_slice]).service_ports.values()

    assert state.backends == (_be("10.244.1.5"),)


@pytest.mark.parametrize(
    "endpoint_slice",
    [
        _slice(service="api", endpoints=(_endpoint("10.244.1.5"),)),
        _slice(namespace="other", endpoints=(_endpoint("10.244.1.5"),)),
        _slice(address_type="FQDN", endpoints=()),
    ],
    ids=["other-service", "same-name-other-namespace", "fqdn-slice"],
)
def test_slices_of_other_services_give_no_backends(endpoint_slice: model.EndpointSlice) -> None:
    (state,) = _state([_service()], [endpoint_slice]).service_ports.values()

    assert state.backends == ()


def test_service_without_endpoints_is_served_with_no_backends() -> None:
    (state,) = _state([_service()]).service_ports.values()

    assert (list(state.frontends), state.backends) == ([_fe("10.96.0.10")], ())


# --- conflicts and determinism ---------------------------------------------------------------


def test_frontend_claimed_twice_stays_with_the_service_that_sorts_first() -> None:
    first = _service("api", ports=(_port("http", 80), _port("grpc", 9000)), cluster_ips=("10.96.0.10",))
    second = _service("web", ports=(_port("http", 80), _port("metrics", 9090)), cluster_ips=("10.96.0.10",))

    state = _state([second, first])

    assert {name: list(sp.frontends) for name, sp in state.service_ports.items()} == {
        _name("api", "grpc"): [_fe("10.96.0.10", 9000)],
        _name("api", "http"): [_fe("10.96.0.10", 80)],
        _name("web", "metrics"): [_fe("10.96.0.10", 9090)],
    }
    assert state.problems == (
        model.Problem(ref="Service shop/web", reason="frontend 10.96.0.10:80/TCP already used by Service shop/api"),
    )


def test_node_port_claimed_by_two_services_stays_with_the_first_namespace() -> None:
    first = _service("web", namespace="alpha", type=model.ServiceType.NODE_PORT, cluster_ips=("10.96.0.1",),
                     ports=(_port(node_port=30080),))
    second = _service("web", namespace="beta", type=model.ServiceType.NODE_PORT, cluster_ips=("10.96.0.2",),
                      ports=(_port(node_port=30080),))

    state = _state([second, first])

    assert list(state.service_ports[_name(namespace="beta")].frontends) == [_fe("10.96.0.2")]
    assert [str(problem) for problem in state.problems] == [
        "Service beta/web: frontend 172.18.0.3:30080/TCP already used by Service alpha/web",
        "Service beta/web: frontend 203.0.113.30:30080/TCP already used by Service alpha/web",
    ]


def test_same_address_and_port_with_another_protocol_is_no_conflict() -> None:
    dns_udp = _service("dns-udp", ports=(_port("dns", 53, protocol=UDP),))
    dns_tcp = _service("dns-tcp", ports=(_port("dns", 53, protocol=TCP),))

    state = _state([dns_udp, dns_tcp])

    assert (len(state.service_ports), state.problems) == (2, ())


def test_service_port_left_without_frontends_is_dropped() -> None:
    state = _state([_service("web"), _service("api")])

    assert list(state.service_ports) == [_name("api")]


def test_output_does_not_depend_on_input_order() -> None:
    services = [
        _service("web", cluster_ips=("10.96.0.10", "fd00:96::a"), type=model.ServiceType.NODE_PORT,
                 ports=(_port(node_port=30080), _port("metrics", 9090, target_port="metrics"))),
        _service("api", cluster_ips=("10.96.0.11",), ports=(_port(),)),
        _service("clash", namespace="zzz", cluster_ips=("10.96.0.11",), ports=(_port(),)),
    ]
    slices = [
        _slice("web-a", endpoints=(_endpoint("10.244.1.5"), _endpoint("10.244.2.9"))),
        _slice("web-b", endpoints=(_endpoint("10.244.2.9"), _endpoint("10.244.0.3"))),
        _slice("web-c", address_type="IPv6", endpoints=(_endpoint("fd00:244::5"),)),
        _slice("api-a", service="api", endpoints=(_endpoint("10.244.4.4"),)),
    ]
    baseline = _state(services, slices)

    for service_order, slice_order in itertools.product(itertools.permutations(services),
                                                         itertools.permutations(slices)):
        state = _state(service_order, slice_order)
        assert (state, list(state.service_ports), [list(sp.frontends) for sp in state.service_ports.values()]) == (
            baseline, list(baseline.service_ports), [list(sp.frontends) for sp in baseline.service_ports.values()])
