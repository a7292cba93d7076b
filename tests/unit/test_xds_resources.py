"""The Envoy resources a sidecar gets: from the same service-port states CTLB programs."""

from __future__ import annotations

import ipaddress
import random

import msgspec
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from ctlb import model, planner
from ctlb.sources import store
from meshredirect.xds import resources, snapshot

TCP, UDP = model.Protocol.TCP, model.Protocol.UDP
IPv4, IPv6 = model.IPFamily.IPv4, model.IPFamily.IPv6
L7 = resources.L7
NODE = "node-1"


def _ip(text: str) -> model.IPAddress:
    return ipaddress.ip_address(text)


def _service(
    name: str = "web", *, namespace: str = "shop", ips: tuple[str, ...] = ("10.96.0.10",),
    ports: tuple[model.ServicePort, ...] = (model.ServicePort("http", TCP, 80, 8080),),
    type: model.ServiceType = model.ServiceType.CLUSTER_IP, **fields: object,
) -> model.Service:
    addresses = tuple(_ip(ip) for ip in ips)
    families = tuple(dict.fromkeys(model.family_of(a) for a in addresses))
    service = model.Service(namespace=namespace, name=name, type=type, ports=ports, cluster_ips=addresses,
                            ip_families=families)
    return msgspec.structs.replace(service, **fields)


def _slice(
    *addresses: str, service: str = "web", name: str = "", port_name: str = "http", port: int = 8080,
    protocol: model.Protocol = TCP, node: str | None = None,
) -> model.EndpointSlice:
    family = "IPv6" if ":" in addresses[0] else "IPv4"
    endpoints = tuple(model.Endpoint(addresses=(_ip(a),), ready=True, node_name=node) for a in addresses)
    return model.EndpointSlice(namespace="shop", name=name or f"{service}-{family.lower()}", service_name=service,
                               address_type=family, endpoints=endpoints,
                               ports=(model.EndpointPort(port_name, protocol, port),))


def _build(services: list[model.Service], slices: list[model.EndpointSlice],
           options: resources.Options = resources.Options()) -> resources.Resources:
    node = model.Node(name=NODE, addresses=(_ip("172.18.0.2"),))
    state = planner.desired_state(services=services, endpoint_slices=slices, node=node)
    return resources.build(state.service_ports, services, options=options)


def _cluster(built: resources.Resources, name: str) -> cluster_pb2.Cluster:
    (found,) = [c for c in built.clusters if c.name == name]
    return found


def _endpoints(built: resources.Resources, name: str) -> list[str]:
    (assignment,) = [e for e in built.endpoints if e.cluster_name == name]
    return [f"{lb.endpoint.address.socket_address.address}:{lb.endpoint.address.socket_address.port_value}"
            for group in assignment.endpoints for lb in group.lb_endpoints]


def _chains(built: resources.Resources) -> dict[str, listener_components_pb2.FilterChain]:
    (listener,) = built.listeners
    return {chain.name: chain for chain in listener.filter_chains}


def _match(chain: listener_components_pb2.FilterChain) -> tuple[list[str], int]:
    match = chain.filter_chain_match
    return [f"{r.address_prefix}/{r.prefix_len.value}" for r in match.prefix_ranges], match.destination_port.value


def _tcp_proxy(chain: listener_components_pb2.FilterChain) -> tcp_proxy_pb2.TcpProxy:
    (network_filter,) = chain.filters
    assert network_filter.name == "envoy.filters.network.tcp_proxy"
    proxy = tcp_proxy_pb2.TcpProxy()
    assert network_filter.typed_config.Unpack(proxy)
    return proxy


def _hcm(chain: listener_components_pb2.FilterChain) -> hcm_pb2.HttpConnectionManager:
    (network_filter,) = chain.filters
    assert network_filter.name == "envoy.filters.network.http_connection_manager"
    manager = hcm_pb2.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(manager)
    return manager


# --- HTTP or TCP ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "app_protocol", "expected"), [
    pytest.param("http", None, L7.HTTP, id="name-http"),
    pytest.param("http-web", None, L7.HTTP, id="name-http-suffix"),
    pytest.param("http2", None, L7.HTTP2, id="name-http2"),
    pytest.param("grpc", None, L7.HTTP2, id="name-grpc"),
    pytest.param("grpc-api", None, L7.HTTP2, id="name-grpc-suffix"),
    pytest.param("grpc-web", None, L7.HTTP, id="name-grpc-web"),
    pytest.param("httpx", None, L7.TCP, id="name-prefix-only-before-dash"),
    pytest.param("https", None, L7.TCP, id="name-https-is-tls"),
    pytest.param("", None, L7.TCP, id="unnamed"),
    pytest.param("redis", None, L7.TCP, id="name-other"),
    pytest.param("x", "http", L7.HTTP, id="app-http"),
    pytest.param("x", "HTTP", L7.HTTP, id="app-case-insensitive"),
    pytest.param("x", "http2", L7.HTTP2, id="app-http2"),
    pytest.param("x", "grpc", L7.HTTP2, id="app-grpc"),
    pytest.param("x", "kubernetes.io/h2c", L7.HTTP2, id="app-h2c"),
    pytest.param("x", "kubernetes.io/ws", L7.HTTP, id="app-websocket"),
    pytest.param("http", "mysql", L7.TCP, id="app-wins-over-name"),
    pytest.param("tcp", "kubernetes.io/wss", L7.TCP, id="app-wss-is-tls"),
])
def test_protocol_follows_app_protocol_then_port_name(name: str, app_protocol: str | None, expected: resources.L7) -> None:
    port = model.ServicePort(name, TCP, 80, 8080, app_protocol=app_protocol)
    assert resources.protocol_of(port) is expected


# --- TCP and HTTP Services ------------------------------------------------------------------------


def test_tcp_service_gets_eds_cluster_and_tcp_proxy_chain_on_its_frontend() -> None:
    built = _build([_service(ports=(model.ServicePort("redis", TCP, 6379, 6379),))],
                   [_slice("10.244.0.5", "10.244.0.6", port_name="redis", port=6379)])
    name = "outbound|6379|v4|web.shop"
    cluster = _cluster(built, name)
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert cluster.eds_cluster_config.eds_config.HasField("ads")
    assert cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert _endpoints(built, name) == ["10.244.0.5:6379", "10.244.0.6:6379"]
    chain = _chains(built)["10.96.0.10:6379|web.shop"]
    assert _match(chain) == (["10.96.0.10/32"], 6379)
    assert _tcp_proxy(chain).cluster == name
    assert built.routes == ()


@pytest.mark.parametrize(("port", "upstream_http2"), [
    pytest.param(model.ServicePort("http", TCP, 80, 8080), False, id="http"),
    pytest.param(model.ServicePort("api", TCP, 80, 8080, app_protocol="grpc"), True, id="grpc"),
])
def test_http_service_goes_through_connection_manager_and_route(port: model.ServicePort, upstream_http2: bool) -> None:
    built = _build([_service(ports=(port,))], [_slice("10.244.0.5", port_name=port.name)])
    name = "outbound|80|v4|web.shop"
    manager = _hcm(_chains(built)["10.96.0.10:80|web.shop"])
    assert manager.rds.route_config_name == name
    assert manager.rds.config_source.HasField("ads")
    (route_config,) = built.routes
    assert route_config.name == name
    (host,) = route_config.virtual_hosts
    assert list(host.domains) == ["*"]
    assert host.routes[0].route.cluster == name
    options = http_protocol_options_pb2.HttpProtocolOptions()
    assert _cluster(built, name).typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(options)
    assert options.HasField("explicit_http_config") is upstream_http2
    assert options.HasField("use_downstream_protocol_config") is not upstream_http2


def test_udp_service_ports_are_left_to_ctlb() -> None:
    ports = (model.ServicePort("dns", UDP, 53, 53), model.ServicePort("dns-tcp", TCP, 53, 53))
    built = _build([_service(ports=ports)], [])
    assert [c.name for c in built.clusters if c.name.startswith("outbound|")] == ["outbound|53|v4|web.shop"]


# --- families, kinds, affinity ---------------------------------------------------------------------


def test_dual_stack_service_gets_a_cluster_and_chains_per_family() -> None:
    built = _build([_service(ips=("10.96.0.10", "fd00:96::a"))],
                   [_slice("10.244.0.5"), _slice("fd00:10:244::5")])
    assert _endpoints(built, "outbound|80|v4|web.shop") == ["10.244.0.5:8080"]
    assert _endpoints(built, "outbound|80|v6|web.shop") == ["fd00:10:244::5:8080"]
    chains = _chains(built)
    assert _match(chains["10.96.0.10:80|web.shop"]) == (["10.96.0.10/32"], 80)
    assert _match(chains["[fd00:96::a]:80|web.shop"]) == (["fd00:96::a/128"], 80)
    assert _hcm(chains["[fd00:96::a]:80|web.shop"]).rds.route_config_name == "outbound|80|v6|web.shop"


def test_every_frontend_kind_gets_a_chain() -> None:
    service = _service(type=model.ServiceType.NODE_PORT, external_ips=(_ip("203.0.113.7"),),
                       ports=(model.ServicePort("http", TCP, 80, 8080, node_port=30080),))
    built = _build([service], [_slice("10.244.0.5")])
    assert sorted(_chains(built)) == ["10.96.0.10:80|web.shop", "172.18.0.2:30080|web.shop",
                                      "203.0.113.7:80|web.shop", "blackhole"]


def test_external_frontends_lead_to_cluster_wide_backends_under_local_internal_policy() -> None:
    service = _service(external_ips=(_ip("203.0.113.7"),), internal_traffic_policy=model.TrafficPolicy.LOCAL)
    slices = [_slice("10.244.0.5", node=NODE), _slice("10.244.1.5", name="web-remote", node="node-2")]
    built = _build([service], slices)
    assert _endpoints(built, "outbound|80|v4|web.shop") == ["10.244.0.5:8080"]
    assert _endpoints(built, "outbound|80|v4-external|web.shop") == ["10.244.0.5:8080", "10.244.1.5:8080"]
    chains = _chains(built)
    assert _hcm(chains["10.96.0.10:80|web.shop"]).rds.route_config_name == "outbound|80|v4|web.shop"
    assert _hcm(chains["203.0.113.7:80|web.shop"]).rds.route_config_name == "outbound|80|v4-external|web.shop"


def test_client_ip_affinity_hashes_on_the_source_address() -> None:
    ports = (model.ServicePort("http", TCP, 80, 8080), model.ServicePort("redis", TCP, 6379, 6379))
    built = _build([_service(ports=ports, affinity_timeout=600)],
                   [_slice("10.244.0.5", port_name="http"), _slice("10.244.0.5", name="w2", port_name="redis")])
    assert _cluster(built, "outbound|80|v4|web.shop").lb_policy == cluster_pb2.Cluster.RING_HASH
    (route_config,) = built.routes
    assert route_config.virtual_hosts[0].routes[0].route.hash_policy[0].connection_properties.source_ip
    assert _tcp_proxy(_chains(built)["10.96.0.10:6379|web.shop"]).hash_policy[0].HasField("source_ip")


def test_service_without_endpoints_gets_an_empty_assignment() -> None:
    built = _build([_service()], [])
    assert _endpoints(built, "outbound|80|v4|web.shop") == []


# --- the listener -----------------------------------------------------------------------------------


def test_outbound_listener_restores_original_destination_on_both_families() -> None:
    built = _build([], [], resources.Options(outbound_port=15006))
    (listener,) = built.listeners
    assert listener.name == "outbound"
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.original_dst"]
    addresses = [listener.address] + [a.address for a in listener.additional_addresses]
    assert [(a.socket_address.address, a.socket_address.port_value) for a in addresses] == [
        ("0.0.0.0", 15006), ("::", 15006)]


def test_destinations_that_are_no_service_pass_through_to_the_original_destination() -> None:
    built = _build([_service()], [])
    (listener,) = built.listeners
    assert _tcp_proxy(listener.default_filter_chain).cluster == "PassthroughCluster"
    passthrough = _cluster(built, "PassthroughCluster")
    assert passthrough.type == cluster_pb2.Cluster.ORIGINAL_DST
    assert passthrough.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED


def test_connection_to_the_outbound_port_itself_is_black_holed_not_looped() -> None:
    built = _build([], [])
    chain = _chains(built)["blackhole"]
    assert _match(chain) == ([], 15001)
    assert _tcp_proxy(chain).cluster == "BlackHoleCluster"
    assert not _cluster(built, "BlackHoleCluster").HasField("load_assignment")


def test_access_log_is_optional() -> None:
    quiet = _build([_service()], [])
    logged = _build([_service()], [], resources.Options(access_log=True))
    assert not _hcm(_chains(quiet)["10.96.0.10:80|web.shop"]).access_log
    assert _hcm(_chains(logged)["10.96.0.10:80|web.shop"]).access_log[0].name == "envoy.access_loggers.stdout"


# --- names and problems -----------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "external", "expected"), [
    pytest.param(IPv4, False, "outbound|8080|v4|api.prod", id="v4"),
    pytest.param(IPv6, False, "outbound|8080|v6|api.prod", id="v6"),
    pytest.param(IPv4, True, "outbound|8080|v4-external|api.prod", id="v4-external"),
])
def test_cluster_names_carry_port_family_service_and_namespace(
    family: model.IPFamily, external: bool, expected: str
) -> None:
    service = _service("api", namespace="prod")
    assert resources.cluster_name(service, port=8080, family=family, external=external) == expected


def test_state_without_its_service_is_reported_not_served() -> None:
    service = _service()
    state = planner.desired_state(services=[service], endpoint_slices=[], node=None)
    built = resources.build(state.service_ports, [])
    assert [c.name for c in built.clusters] == ["BlackHoleCluster", "PassthroughCluster"]
    assert [p.ref for p in built.problems] == ["Service shop/web"]


def test_frontend_claimed_twice_keeps_one_chain_and_reports_the_other() -> None:
    # The planner never hands out a frontend twice; the builder must still not make Envoy reject
    # the whole listener if it ever did.
    a, b = _service("a"), _service("b")
    state_a = planner.desired_state(services=[a], endpoint_slices=[], node=None).service_ports
    state_b = planner.desired_state(services=[b], endpoint_slices=[], node=None).service_ports
    built = resources.build({**state_a, **state_b}, [a, b])
    assert "10.96.0.10:80|a.shop" in _chains(built)
    assert "10.96.0.10:80|b.shop" not in _chains(built)
    assert [p.ref for p in built.problems] == ["Service shop/b"]


# --- snapshots ----------------------------------------------------------------------------------------


def _random_objects(rng: random.Random, objects: store.ObjectStore) -> None:
    name = f"s{rng.randint(0, 5)}"
    roll = rng.random()
    if roll < 0.4:
        port_name = rng.choice(("http", "tcp", "grpc"))
        ports = (model.ServicePort(port_name, TCP, rng.choice((80, 81)), 8080),
                 model.ServicePort("dns", UDP, 53, 53))
        ips = rng.choice((("10.96.0.1",), (f"10.96.0.{rng.randint(1, 9)}", "fd00:96::1")))
        objects.put(_service(name, ips=ips, ports=ports))
    elif roll < 0.85:
        addresses = [f"10.244.0.{rng.randint(2, 6)}" for _ in range(rng.randint(1, 3))]
        objects.put(_slice(*addresses, service=name, port_name=rng.choice(("http", "tcp", "grpc"))))
    else:
        keys = objects.keys("Service") + objects.keys("EndpointSlice")
        if keys:
            objects.delete(rng.choice(sorted(keys)))


@pytest.mark.parametrize("seed", range(15))
def test_incremental_snapshot_equals_building_afresh(seed: int) -> None:
    rng = random.Random(seed)
    objects = store.ObjectStore()
    plan = planner.Planner(NODE)
    builder = snapshot.SnapshotBuilder(resources.Options())
    for serial in range(1, 40):
        _random_objects(rng, objects)
        plan.update(objects, objects.take())
        services = objects.objects("Service")
        incremental = builder.build(plan.state().service_ports, services, serial=serial)
        fresh = snapshot.from_resources(resources.build(plan.state().service_ports, services), serial=serial)
        assert incremental.versions() == fresh.versions()
        assert incremental.problems == fresh.problems
        for type_url in snapshot.PUSH_ORDER:
            assert incremental.resources(type_url, None) == fresh.resources(type_url, None)


def test_endpoint_change_moves_only_the_endpoint_version() -> None:
    services = [_service()]
    before = planner.desired_state(services=services, endpoint_slices=[_slice("10.244.0.5")], node=None)
    after = planner.desired_state(services=services, endpoint_slices=[_slice("10.244.0.6")], node=None)
    builder = snapshot.SnapshotBuilder(resources.Options())
    first = builder.build(before.service_ports, services, serial=1).versions()
    second = builder.build(after.service_ports, services, serial=2).versions()
    assert {t for t in first if first[t] != second[t]} == {"EDS"}


def test_versions_are_content_digests_shared_by_equal_snapshots() -> None:
    services = [_service()]
    state = planner.desired_state(services=services, endpoint_slices=[_slice("10.244.0.5")], node=None)
    one = snapshot.SnapshotBuilder(resources.Options()).build(state.service_ports, services, serial=1)
    other = snapshot.SnapshotBuilder(resources.Options()).build(state.service_ports, services, serial=7)
    assert one.versions() == other.versions()
    renamed = msgspec.structs.replace(services[0], ports=(model.ServicePort("http", TCP, 81, 8080),))
    moved = planner.desired_state(services=[renamed], endpoint_slices=[_slice("10.244.0.5")], node=None)
    third = snapshot.SnapshotBuilder(resources.Options()).build(moved.service_ports, [renamed], serial=1)
    assert all(one.versions()[t] != third.versions()[t] for t in ("CDS", "EDS", "LDS", "RDS"))


def test_snapshot_answers_named_subscriptions_with_what_it_has() -> None:
    services = [_service(ips=("10.96.0.10", "fd00:96::a"))]
    state = planner.desired_state(services=services, endpoint_slices=[], node=None)
    snap = snapshot.SnapshotBuilder(resources.Options()).build(state.service_ports, services, serial=1)
    names = frozenset({"outbound|80|v6|web.shop", "outbound|80|v4|gone.shop"})
    (packed,) = snap.resources(snapshot.TypeUrl.ENDPOINT, names)
    assert packed.type_url == snapshot.TypeUrl.ENDPOINT.value
    assert len(snap.resources(snapshot.TypeUrl.CLUSTER, None)) == 4
