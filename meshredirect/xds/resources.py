"""Envoy v3 resources for the sidecars of this node, built from the desired state CTLB programs.

Pure: service-port states and Services in, protobuf messages out. It owns how a Kubernetes
Service port becomes Envoy config, so every sidecar on the node and CTLB agree on which backends a
frontend leads to (the state's backends, by frontend kind, as the socket programs use them).

What a sidecar gets:

- One outbound listener, ``outbound``, on port 15001 (``Options.outbound_port``) of 0.0.0.0 and
  [::], with the ``original_dst`` listener filter: the redirected connection's original
  destination (SO_ORIGINAL_DST) becomes its local address, which the filter chains match on.
- One filter chain per TCP Service frontend (ClusterIP, external IP, LoadBalancer IP,
  nodeIP:nodePort), matched on that address (/32 or /128) and port, leading to the service port's
  cluster: through the HTTP connection manager with a route (RDS) for HTTP Services, else through
  ``tcp_proxy``.
- A filter chain for destination port 15001 itself to ``BlackHoleCluster``, so a connection
  that was not redirected (its "original" destination is the listener) never loops into Envoy.
- The default filter chain: ``tcp_proxy`` to ``PassthroughCluster`` (ORIGINAL_DST), for
  destinations that are no Service.
- One EDS cluster (endpoints over ADS) and one ClusterLoadAssignment per service port, family and
  backend set; one RouteConfiguration per HTTP cluster.

Names (stable, readable, Istio-shaped; ``|`` cannot occur in Kubernetes names, so they parse):

- cluster, its ClusterLoadAssignment and (HTTP) its RouteConfiguration:
  ``outbound|<port>|<variant>|<service>.<namespace>``, with the Service port number and variant
  ``v4`` or ``v6`` (the family); ``v4-external`` / ``v6-external`` name the cluster-wide backend
  set that external, LoadBalancer and node-port frontends lead to when it differs from the
  ClusterIP one (internalTrafficPolicy Local).
- filter chain: ``<frontend address>:<port>|<service>.<namespace>`` (``[fd00::a]:80|web.default``).
- listener ``outbound``; clusters ``PassthroughCluster`` and ``BlackHoleCluster``.

Only TCP service ports are served: the sidecar captures TCP only (UDP and SCTP keep CTLB).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from ctlb import desired, model

OUTBOUND_LISTENER = "outbound"
PASSTHROUGH_CLUSTER = "PassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
DEFAULT_OUTBOUND_PORT = 15001

_ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
_TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
_HCM_FILTER = "envoy.filters.network.http_connection_manager"
_ROUTER_FILTER = "envoy.filters.http.router"
_STDOUT_ACCESS_LOG = "envoy.access_loggers.stdout"
_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Envoy's per-cluster circuit breakers default to 1024 connections and requests: a sidecar must
# not be a stricter limit than the Service itself (CTLB has none), so open them all the way.
_UNLIMITED = 2**32 - 1
# What the access log says about each connection or request: enough to tell from the sidecar's
# stdout which Service (original destination), cluster and backend served it.
_ACCESS_LOG_FIELDS = {
    "start": "%START_TIME%",
    "original_dst": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "chain": "%FILTER_CHAIN_NAME%",
    "cluster": "%UPSTREAM_CLUSTER%",
    "upstream": "%UPSTREAM_HOST%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "code": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
}


class L7(enum.StrEnum):
    """How a sidecar proxies a service port."""

    TCP = "tcp"  # tcp_proxy: bytes through, no parsing
    HTTP = "http"  # HTTP connection manager; upstream speaks what the client spoke
    HTTP2 = "http2"  # HTTP connection manager; upstream HTTP/2 (h2c, gRPC)


# appProtocol values (lower-cased) Istio proxies as HTTP, and which version upstream.
_APP_PROTOCOLS = {
    "http": L7.HTTP,
    "grpc-web": L7.HTTP,
    "kubernetes.io/ws": L7.HTTP,
    "http2": L7.HTTP2,
    "grpc": L7.HTTP2,
    "kubernetes.io/h2c": L7.HTTP2,
}
# Port name prefixes (the part before the first "-"), Istio's convention when appProtocol is unset.
_NAME_PREFIXES = {"http": L7.HTTP, "http2": L7.HTTP2, "grpc": L7.HTTP2}


def protocol_of(port: model.ServicePort) -> L7:
    """How a Service port is proxied: by its appProtocol if set, else by its name, as Istio does.

    Args:
        port: the Service port.

    Returns:
        HTTP for appProtocol http, grpc-web, kubernetes.io/ws or a name ``http``/``http-*``;
        HTTP2 for http2, grpc, kubernetes.io/h2c or a name ``http2``/``grpc`` (``-*``);
        TCP for anything else (an explicit non-HTTP appProtocol wins over the name).
    """
    if port.app_protocol:
        return _APP_PROTOCOLS.get(port.app_protocol.lower(), L7.TCP)
    name = port.name.lower()
    if name == "grpc-web" or name.startswith("grpc-web-"):
        return L7.HTTP
    return _NAME_PREFIXES.get(name.split("-", 1)[0], L7.TCP)


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """What is the same for every sidecar of the node."""

    outbound_port: int = DEFAULT_OUTBOUND_PORT
    # Where the outbound listener binds; the first is its address, the rest additional addresses.
    # Both families by default: the redirect sends IPv4 to 127.0.0.1 and IPv6 to [::1].
    bind_addresses: tuple[str, ...] = ("0.0.0.0", "::")
    connect_timeout_s: float = 5.0
    # Log each connection/request as a JSON line on the sidecar's stdout.
    access_log: bool = False


@dataclass(frozen=True, slots=True)
class Resources:
    """Everything a sidecar of this node is served, each kind in name order."""

    clusters: tuple[cluster_pb2.Cluster, ...] = ()
    endpoints: tuple[endpoint_pb2.ClusterLoadAssignment, ...] = ()
    listeners: tuple[listener_pb2.Listener, ...] = ()
    routes: tuple[route_pb2.RouteConfiguration, ...] = ()
    # Service ports (or frontends) that could not be served, and why.
    problems: tuple[model.Problem, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class _Upstream:
    """One cluster to build: a service port's backend set for one family, and its frontends."""

    name: str
    service: model.Service
    port: model.ServicePort
    l7: L7
    backends: tuple[desired.Backend, ...]
    affinity: bool
    frontends: tuple[desired.Frontend, ...]


# --- names -------------------------------------------------------------------------------------


def cluster_name(service: model.Service, *, port: int, family: model.IPFamily, external: bool = False) -> str:
    """The cluster (and endpoint and route) name of a service port's backend set: see the module."""
    variant = "v4" if family is model.IPFamily.IPv4 else "v6"
    if external:
        variant += "-external"
    return f"outbound|{port}|{variant}|{service.name}.{service.namespace}"


def filter_chain_name(frontend: desired.Frontend, service: model.Service) -> str:
    """The name of a frontend's filter chain: see the module."""
    host = f"[{frontend.address}]" if frontend.address.version == 6 else str(frontend.address)
    return f"{host}:{frontend.port}|{service.name}.{service.namespace}"


# --- per service port, and the whole set ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chain:
    """A filter chain for one frontend, with what picking among claims needs."""

    frontend: desired.Frontend
    cluster: str
    service: model.ObjectRef
    message: listener_components_pb2.FilterChain


@dataclass(frozen=True, slots=True)
class PortResources:
    """What one service port contributes: its clusters, endpoints, routes and filter chains."""

    clusters: tuple[cluster_pb2.Cluster, ...]
    endpoints: tuple[endpoint_pb2.ClusterLoadAssignment, ...]
    routes: tuple[route_pb2.RouteConfiguration, ...]
    chains: tuple[Chain, ...]


def service_port(
    name: desired.ServicePortName, services: Mapping[tuple[str, str], model.Service]
) -> tuple[model.Service, model.ServicePort] | None:
    """The Service and Service port a service-port state is of, if the Service is there."""
    service = services.get((name.namespace, name.name))
    if service is None:
        return None
    port = next((p for p in service.ports if p.name == name.port and p.protocol is name.protocol), None)
    return None if port is None else (service, port)


def for_service_port(
    state: desired.ServicePortState, *, service: model.Service, port: model.ServicePort, options: Options
) -> PortResources:
    """The resources of one TCP service port (see the module for their shapes and names)."""
    upstreams = list(_upstreams_of(state, service=service, port=port))
    chains = []
    for upstream in upstreams:
        network_filter = _network_filter(upstream, options=options)
        chains += [Chain(frontend=frontend, cluster=upstream.name, service=service.ref,
                         message=listener_components_pb2.FilterChain(
                             name=filter_chain_name(frontend, service),
                             filter_chain_match=_destination_match(frontend.address, frontend.port),
                             filters=[network_filter]))
                   for frontend in upstream.frontends]
    return PortResources(
        clusters=tuple(_eds_cluster(u, options=options) for u in upstreams),
        endpoints=tuple(_load_assignment(u) for u in upstreams),
        routes=tuple(_route_configuration(u) for u in upstreams if u.l7 is not L7.TCP),
        chains=tuple(chains),
    )


def missing_service_problem(name: desired.ServicePortName) -> model.Problem:
    """Why a service-port state whose Service (port) is not at hand is not served."""
    ref = model.ObjectRef("Service", name.namespace, name.name)
    return model.Problem(ref=str(ref), reason=f"no Service port for {name}: not served to sidecars")


def fixed_clusters(options: Options) -> tuple[cluster_pb2.Cluster, ...]:
    """The clusters every sidecar has, whatever the Services: passthrough and black hole."""
    return (_blackhole_cluster(options), _passthrough_cluster(options))


def outbound_listener(
    parts: Iterable[PortResources], *, options: Options
) -> tuple[listener_pb2.Listener, list[model.Problem]]:
    """The outbound listener with a chain per frontend of `parts`, in frontend order.

    Envoy rejects a listener with two chains of the same match, so a frontend claimed twice (the
    planner prevents it) keeps the claim of the earlier part and the other is reported.
    """
    chains: list[Chain] = []
    claimed: dict[tuple[model.IPAddress, int], Chain] = {}
    problems: list[model.Problem] = []
    for part in parts:
        for chain in part.chains:
            owner = claimed.setdefault((chain.frontend.address, chain.frontend.port), chain)
            if owner is not chain:
                problems.append(model.Problem(
                    ref=str(chain.service), reason=f"frontend {chain.frontend} already used by {owner.cluster}"))
            else:
                chains.append(chain)
    chains.sort(key=lambda chain: chain.frontend)
    return _outbound_listener([chain.message for chain in chains], options=options), problems


def build(
    states: Mapping[desired.ServicePortName, desired.ServicePortState],
    services: Iterable[model.Service],
    *,
    options: Options = Options(),
) -> Resources:
    """The resources every sidecar of this node gets, built afresh.

    Args:
        states: the planner's service-port states (`Planner.state().service_ports`).
        services: the Services those states came from (their ports' names and appProtocols
            decide HTTP or TCP and the names).
        options: listener port and addresses, timeouts, access log.

    Returns:
        Clusters, endpoints, the outbound listener and HTTP routes; a problem for each TCP
        service port whose Service is missing and each frontend claimed twice.
    """
    by_key = {(s.namespace, s.name): s for s in services}
    parts: list[PortResources] = []
    problems: list[model.Problem] = []
    for name in sorted(states):
        if name.protocol is not model.Protocol.TCP:
            continue
        found = service_port(name, by_key)
        if found is None:
            problems.append(missing_service_problem(name))
            continue
        parts.append(for_service_port(states[name], service=found[0], port=found[1], options=options))
    listener, chain_problems = outbound_listener(parts, options=options)
    clusters = [c for part in parts for c in part.clusters] + list(fixed_clusters(options))
    return Resources(
        clusters=tuple(sorted(clusters, key=lambda c: c.name)),
        endpoints=tuple(sorted((e for part in parts for e in part.endpoints), key=lambda e: e.cluster_name)),
        listeners=(listener,),
        routes=tuple(sorted((r for part in parts for r in part.routes), key=lambda r: r.name)),
        problems=tuple(sorted(problems + chain_problems)),
    )


def _upstreams_of(
    state: desired.ServicePortState, *, service: model.Service, port: model.ServicePort
) -> Iterator[_Upstream]:
    """One upstream for the ClusterIP backends, and one more for external frontends when their
    backend set differs (CTLB's rule: `backends_for(kind)`)."""
    by_variant: dict[bool, list[desired.Frontend]] = {}
    for frontend in sorted(state.frontends):
        kind = state.frontends[frontend]
        external = kind is not desired.FrontendKind.CLUSTER_IP and state.external_backends is not None
        by_variant.setdefault(external, []).append(frontend)
    for external, frontends in sorted(by_variant.items()):
        name = cluster_name(service, port=port.port, family=state.name.family, external=external)
        backends = state.external_backends if external and state.external_backends is not None else state.backends
        yield _Upstream(name=name, service=service, port=port, l7=protocol_of(port), backends=backends,
                        affinity=state.affinity_timeout is not None, frontends=tuple(frontends))


# --- clusters and endpoints --------------------------------------------------------------------


def _ads() -> config_source_pb2.ConfigSource:
    """Resources that come over the same ADS stream as the one that named them."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _unlimited_circuit_breakers() -> circuit_breaker_pb2.CircuitBreakers:
    limit = wrappers_pb2.UInt32Value(value=_UNLIMITED)
    threshold = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        max_connections=limit, max_pending_requests=limit, max_requests=limit, max_retries=limit
    )
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[threshold])


def _http_protocol_options(l7: L7) -> http_protocol_options_pb2.HttpProtocolOptions:
    options = http_protocol_options_pb2.HttpProtocolOptions
    if l7 is L7.HTTP2:
        return options(explicit_http_config=options.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()))
    # An HTTP/1.1 client stays HTTP/1.1 upstream, an h2c client stays HTTP/2.
    return options(use_downstream_protocol_config=options.UseDownstreamHttpConfig(
        http_protocol_options=protocol_pb2.Http1ProtocolOptions(),
        http2_protocol_options=protocol_pb2.Http2ProtocolOptions()))


def _eds_cluster(upstream: _Upstream, *, options: Options) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=upstream.name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(), service_name=upstream.name),
        connect_timeout=_duration(options.connect_timeout_s),
        # ClientIP affinity: the same client (this pod's address) keeps its backend, by a hash of
        # its address; the hash policy is on the tcp_proxy or the route.
        lb_policy=cluster_pb2.Cluster.RING_HASH if upstream.affinity else cluster_pb2.Cluster.ROUND_ROBIN,
        circuit_breakers=_unlimited_circuit_breakers(),
    )
    if upstream.l7 is not L7.TCP:
        cluster.typed_extension_protocol_options[_HTTP_PROTOCOL_OPTIONS].CopyFrom(
            _pack(_http_protocol_options(upstream.l7)))
    return cluster


def _passthrough_cluster(options: Options) -> cluster_pb2.Cluster:
    """Connects to the connection's original destination: for addresses that are no Service."""
    return cluster_pb2.Cluster(
        name=PASSTHROUGH_CLUSTER,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=_duration(options.connect_timeout_s),
        circuit_breakers=_unlimited_circuit_breakers(),
    )


def _blackhole_cluster(options: Options) -> cluster_pb2.Cluster:
    """No endpoints: a connection sent here is closed at once."""
    return cluster_pb2.Cluster(
        name=BLACKHOLE_CLUSTER, type=cluster_pb2.Cluster.STATIC, connect_timeout=_duration(options.connect_timeout_s)
    )


def _socket_address(address: str | model.IPAddress, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=str(address), port_value=port))


def _load_assignment(upstream: _Upstream) -> endpoint_pb2.ClusterLoadAssignment:
    """The backends as one locality: CTLB's rules already chose them (topology, policies)."""
    endpoints = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(address=_socket_address(b.address, b.port)))
        for b in upstream.backends
    ]
    locality = endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=endpoints)
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=upstream.name, endpoints=[locality] if endpoints else [])


# --- routes ------------------------------------------------------------------------------------


def _route_configuration(upstream: _Upstream) -> route_pb2.RouteConfiguration:
    """Every request to the frontend goes to its cluster: the filter chain already chose the
    Service by address and port, so the route needs no Host matching."""
    action = route_components_pb2.RouteAction(
        cluster=upstream.name,
        # No per-request deadline: gRPC streams and long polls live as long as the client wants,
        # as they do with CTLB.
        timeout=_duration(0),
    )
    if upstream.affinity:
        action.hash_policy.append(route_components_pb2.RouteAction.HashPolicy(
            connection_properties=route_components_pb2.RouteAction.HashPolicy.ConnectionProperties(source_ip=True)))
    route = route_components_pb2.Route(name="default", match=route_components_pb2.RouteMatch(prefix="/"), route=action)
    host = route_components_pb2.VirtualHost(
        name=f"{upstream.service.name}.{upstream.service.namespace}:{upstream.port.port}",
        domains=["*"], routes=[route])
    return route_pb2.RouteConfiguration(name=upstream.name, virtual_hosts=[host])


# --- the outbound listener ---------------------------------------------------------------------


def _access_logs(options: Options) -> list[accesslog_pb2.AccessLog]:
    if not options.access_log:
        return []
    json_format = struct_pb2.Struct()
    json_format.update(_ACCESS_LOG_FIELDS)
    stdout = stream_pb2.StdoutAccessLog(log_format=substitution_format_string_pb2.SubstitutionFormatString(
        json_format=json_format))
    return [accesslog_pb2.AccessLog(name=_STDOUT_ACCESS_LOG, typed_config=_pack(stdout))]


def _tcp_proxy(cluster: str, *, affinity: bool, options: Options) -> listener_components_pb2.Filter:
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=cluster, cluster=cluster, access_log=_access_logs(options))
    if affinity:
        proxy.hash_policy.add().source_ip.SetInParent()
    return listener_components_pb2.Filter(name=_TCP_PROXY_FILTER, typed_config=_pack(proxy))


def _http_connection_manager(upstream: _Upstream, *, options: Options) -> listener_components_pb2.Filter:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=upstream.name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,  # HTTP/1.1, or HTTP/2 by its preface (h2c)
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=upstream.name),
        http_filters=[hcm_pb2.HttpFilter(name=_ROUTER_FILTER, typed_config=_pack(router_pb2.Router()))],
        upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="websocket")],
        access_log=_access_logs(options),
    )
    return listener_components_pb2.Filter(name=_HCM_FILTER, typed_config=_pack(manager))


def _network_filter(upstream: _Upstream, *, options: Options) -> listener_components_pb2.Filter:
    if upstream.l7 is L7.TCP:
        return _tcp_proxy(upstream.name, affinity=upstream.affinity, options=options)
    return _http_connection_manager(upstream, options=options)


def _destination_match(
    address: model.IPAddress | None, port: int
) -> listener_components_pb2.FilterChainMatch:
    match = listener_components_pb2.FilterChainMatch(destination_port=wrappers_pb2.UInt32Value(value=port))
    if address is not None:
        match.prefix_ranges.add(address_prefix=str(address),
                                prefix_len=wrappers_pb2.UInt32Value(value=address.max_prefixlen))
    return match


def _outbound_listener(
    chains: list[listener_components_pb2.FilterChain], *, options: Options
) -> listener_pb2.Listener:
    port = options.outbound_port
    first, *more = options.bind_addresses
    # Not redirected (its original destination is the listener itself): close, never loop back.
    blackhole = listener_components_pb2.FilterChain(
        name="blackhole", filter_chain_match=_destination_match(None, port),
        filters=[_tcp_proxy(BLACKHOLE_CLUSTER, affinity=False, options=options)])
    passthrough = listener_components_pb2.FilterChain(
        name="passthrough", filters=[_tcp_proxy(PASSTHROUGH_CLUSTER, affinity=False, options=options)])
    return listener_pb2.Listener(
        name=OUTBOUND_LISTENER,
        address=_socket_address(first, port),
        additional_addresses=[listener_pb2.AdditionalAddress(address=_socket_address(a, port)) for a in more],
        listener_filters=[listener_components_pb2.ListenerFilter(
            name=_ORIGINAL_DST_FILTER, typed_config=_pack(original_dst_pb2.OriginalDst()))],
        filter_chains=[*chains, blackhole],
        default_filter_chain=passthrough,
        traffic_direction=base_pb2.OUTBOUND,
    )

