"""kube-proxy's rules, in one place: from one Service, its EndpointSlices and this node to the
desired state of its service ports.

Pure: values in, values out. It decides which Services are proxied, which frontends (cluster,
external, LoadBalancer and node-port addresses) each service port has, and which endpoints back
each kind of frontend (conditions, terminating fallback, topology, traffic policies). Each rule is
a named function. What spans Services (a frontend claimed twice) and incremental recomputation
live in `ctlb.planner`, which calls `service_port_states` per Service.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import msgspec

from ctlb import desired, model

# Labels with which a Service opts out of the default proxy (kube-proxy's ShouldSkipService).
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
_SKIP_LABELS = frozenset({SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL})

# LoadBalancer ingress modes whose IP reaches the node unchanged; "Proxy" means the load balancer
# terminates the traffic itself, so the IP must not be short-circuited.
_VIP_IP_MODES = frozenset({None, "VIP"})

_FAMILY_ORDER = (model.IPFamily.IPv4, model.IPFamily.IPv6)


class _Candidate(NamedTuple):
    """An endpoint of a service port, with the facts later eligibility rules need.

    A named tuple, not a dataclass: a 10k-Service start-up makes 40k of them, and a tuple is
    built in a third of the time.
    """

    backend: desired.Backend
    endpoint: model.Endpoint
    order: tuple[tuple[int, int], int]  # backend.sort_key(): the output order, and the backend's identity
    # The endpoint's conditions as the rules read them, decided once (see `_candidate`).
    ready: bool
    serving_terminating: bool


def is_proxied(service: model.Service) -> bool:
    """kube-proxy's ShouldSkipService, inverted."""
    if service.type is model.ServiceType.EXTERNAL_NAME or service.headless:
        return False
    return not any(key in _SKIP_LABELS for key, _ in service.labels)


def _families(service: model.Service) -> tuple[model.IPFamily, ...]:
    """The families a Service is served in: those of its cluster IPs, else of its external IPs."""
    addresses = service.cluster_ips or service.external_ips
    present = {model.family_of(address) for address in addresses}
    return tuple(family for family in _FAMILY_ORDER if family in present)


def service_port_states(
    service: model.Service,
    *,
    slices: Sequence[model.EndpointSlice],
    node: model.Node | None,
) -> list[desired.ServicePortState]:
    """kube-proxy's rules for one proxied Service: one state per (family, Service port).

    Args:
        service: the Service (one `is_proxied` accepts).
        slices: its EndpointSlices, of every address type, in any order.
        node: this node (its name says which endpoints are local, its zone label drives topology,
            its addresses carry node ports); None gives no local endpoints, no topology and no
            node-port frontends.

    Returns:
        The service ports, by family (IPv4 first), then in the Service's port order.
    """
    here = _NodeTopology.of(node)
    states: list[desired.ServicePortState] = []
    for family in _families(service):
        family_slices = _slices_of_family(slices, family)
        for port in service.ports:
            frontends = _frontends(service, port=port, family=family, node=node)
            accessible = _externally_accessible(service, port=port, family=family)
            policy = _plain_policy(service, port=port, slices=family_slices, family=family,
                                   externally_accessible=accessible)
            if policy is None:
                endpoints = _categorize(_candidates(port, family_slices, family=family), here=here)
                policy = _apply_traffic_policies(service, endpoints=endpoints, externally_accessible=accessible)
            ranges = _source_ranges(service, frontends=frontends, family=family)
            states.append(
                desired.ServicePortState(
                    name=desired.ServicePortName(
                        namespace=service.namespace,
                        name=service.name,
                        port=port.name,
                        protocol=port.protocol,
                        family=family,
                    ),
                    frontends=frontends,
                    backends=policy.backends,
                    affinity_timeout=service.affinity_timeout,
                    drop=policy.drop,
                    external_backends=policy.external_backends,
                    source_ranges=ranges,
                    source_ranges_admit_node=_admits_node(ranges, node=node),
                    local_backends=policy.local_backends,
                )
            )
    return states


# --- frontends -------------------------------------------------------------------------------


def _frontends(
    service: model.Service,
    *,
    port: model.ServicePort,
    family: model.IPFamily,
    node: model.Node | None,
) -> dict[desired.Frontend, desired.FrontendKind]:
    frontends: dict[desired.Frontend, desired.FrontendKind] = {}
    # First kind wins when one address plays two roles (an LB IP also listed in externalIPs).
    for address, port_number, kind in (
        *_cluster_ip_frontends(service, port=port),
        *_external_ip_frontends(service, port=port),
        *_load_balancer_frontends(service, port=port),
        *_node_port_frontends(service, port=port, node=node),
    ):
        if model.family_of(address) == family:
            frontends.setdefault(desired.Frontend(address, port_number, port.protocol), kind)
    # One frontend (a ClusterIP Service's, per family) is in order already: nothing to sort.
    return frontends if len(frontends) < 2 else dict(sorted(frontends.items()))


_FrontendRow = tuple[model.IPAddress, int, desired.FrontendKind]


def _cluster_ip_frontends(service: model.Service, *, port: model.ServicePort) -> list[_FrontendRow]:
    return [(address, port.port, desired.FrontendKind.CLUSTER_IP) for address in service.cluster_ips]


def _external_ip_frontends(service: model.Service, *, port: model.ServicePort) -> list[_FrontendRow]:
    return [(address, port.port, desired.FrontendKind.EXTERNAL_IP) for address in service.external_ips]


def _load_balancer_frontends(service: model.Service, *, port: model.ServicePort) -> list[_FrontendRow]:
    if service.type is not model.ServiceType.LOAD_BALANCER:
        return []
    return [
        (ingress.ip, port.port, desired.FrontendKind.LOAD_BALANCER)
        for ingress in service.load_balancer_ingress
        if ingress.ip_mode in _VIP_IP_MODES
    ]


def _has_node_port(service: model.Service, *, port: model.ServicePort) -> bool:
    has_node_ports = service.type in (model.ServiceType.NODE_PORT, model.ServiceType.LOAD_BALANCER)
    return has_node_ports and port.node_port is not None


def _node_port_frontends(
    service: model.Service,
    *,
    port: model.ServicePort,
    node: model.Node | None,
) -> list[_FrontendRow]:
    if not _has_node_port(service, port=port) or node is None or port.node_port is None:
        return []
    return [(address, port.node_port, desired.FrontendKind.NODE_PORT) for address in node.addresses]


def _externally_accessible(service: model.Service, *, port: model.ServicePort, family: model.IPFamily) -> bool:
    """kube-proxy's ExternallyAccessible, per family: a node port, an external IP or a VIP-mode LB IP.

    Decided from the Service, not from the frontends made: a node port counts even while this
    node (and so its addresses) is unknown.
    """
    if _has_node_port(service, port=port):
        return True
    rows = (*_external_ip_frontends(service, port=port), *_load_balancer_frontends(service, port=port))
    return any(model.family_of(address) == family for address, _, _ in rows)


def _source_ranges(
    service: model.Service,
    *,
    frontends: Mapping[desired.Frontend, desired.FrontendKind],
    family: model.IPFamily,
) -> tuple[desired.SourceRange, ...]:
    """loadBalancerSourceRanges of this family, carried only when there is a LoadBalancer frontend.

    kube-proxy keeps each family's ranges apart and restricts only LoadBalancer IPs (never node
    ports or external IPs); a family with no range of its own is not restricted, even when the
    other family has ranges.
    """
    if desired.FrontendKind.LOAD_BALANCER not in frontends.values():
        return ()
    version = 4 if family is model.IPFamily.IPv4 else 6
    return tuple(network for network in service.load_balancer_source_ranges if network.version == version)


def _admits_node(ranges: Sequence[desired.SourceRange], *, node: model.Node | None) -> bool:
    """Whether the node's own connections pass the ranges: kube-proxy lets the node through when a
    range holds its node IP (a connection from the node leaves with it, or with the LoadBalancer
    IP itself, which kube-proxy then admits too). Any address of the node counts here, since a
    connection may leave with any of them."""
    if node is None:
        return False
    return any(address in network for network in ranges for address in node.addresses
               if address.version == network.version)


# --- endpoints -------------------------------------------------------------------------------
#
# Followed: kube-proxy's pkg/proxy/endpointslicecache.go (conditions, de-duplication) and
# pkg/proxy/topology.go (CategorizeEndpoints, topologyModeFromHints, availableForTopology) as of
# Kubernetes 1.34 (kubernetes/kubernetes master at 008b3652, with PreferSameTrafficDistribution on,
# its default since 1.34). Since 1.33 kube-proxy applies whatever hints the EndpointSlices carry:
# it no longer reads the Service's trafficDistribution nor its topology-mode / topology-aware-hints
# annotations (the EndpointSlice controller only writes hints when those ask for them).

ZONE_LABEL = "topology.kubernetes.io/zone"

# kube-proxy's topology modes (the values topologyModeFromHints returns).
_NO_TOPOLOGY = ""
_PREFER_SAME_ZONE = "PreferSameZone"
_PREFER_SAME_NODE = "PreferSameNode"


# The private values here are msgspec Structs, as `model`'s are: a 10k-Service start-up builds a
# _NodeTopology and a _PolicyResult per Service, 10 ms (of semantics' 90) faster than as frozen
# dataclasses. HealthCheck, made only for Services with a health-check node port, stays one.
class _NodeTopology(msgspec.Struct, frozen=True, gc=False):
    """Where this node is, as kube-proxy sees it: its name and its zone label ("" when unknown)."""

    name: str
    zone: str

    @classmethod
    def of(cls, node: model.Node | None) -> _NodeTopology:
        if node is None:
            return cls(name="", zone="")
        return cls(name=node.name, zone=dict(node.labels).get(ZONE_LABEL, ""))


# Endpoint conditions as kube-proxy reads them (endpointslicecache.go): an unset ready or serving
# is true (serving even when ready is false), an unset terminating is false.


def _ready(endpoint: model.Endpoint) -> bool:
    return endpoint.ready is not False


def _serving(endpoint: model.Endpoint) -> bool:
    return endpoint.serving is not False


def _terminating(endpoint: model.Endpoint) -> bool:
    return endpoint.terminating is True


def _candidate(backend: desired.Backend, endpoint: model.Endpoint) -> _Candidate:
    return _Candidate(backend, endpoint, backend.sort_key(), ready=_ready(endpoint),
                      # KEP-1669: a terminating endpoint that still serves is a last resort.
                      serving_terminating=_serving(endpoint) and _terminating(endpoint))


def _is_local(candidate: _Candidate, *, here: _NodeTopology) -> bool:
    return bool(here.name) and candidate.endpoint.node_name == here.name


def _slices_of_family(slices: Iterable[model.EndpointSlice], family: model.IPFamily) -> list[model.EndpointSlice]:
    """Only slices whose addressType is the frontend's family (FQDN slices never are)."""
    return [s for s in slices if s.address_type == family]


def _candidates(
    port: model.ServicePort, slices: Iterable[model.EndpointSlice], *, family: model.IPFamily
) -> list[_Candidate]:
    """Every endpoint of the port's slices, at the slice port that carries this Service port.

    The EndpointSlice controller has already resolved targetPort (by number or by container-port
    name) into a slice port named like the Service port: matching by name and protocol is how
    kube-proxy finds the backend port, so target_port is never read here.
    """
    candidates: list[_Candidate] = []
    for endpoint_slice in slices:
        slice_port = _slice_port_for(port, endpoint_slice)
        if slice_port is None:
            continue
        for endpoint in endpoint_slice.endpoints:
            # Addresses of another family cannot be sorted with these, nor dialled from this frontend.
            if not endpoint.addresses or model.family_of(endpoint.addresses[0]) != family:
                continue
            # kube-proxy uses only the first address: the others are the same endpoint, not more.
            backend = desired.Backend(endpoint.addresses[0], slice_port.port)
            candidates.append(_candidate(backend, endpoint))
    return _deduplicate(candidates)


def _slice_port_for(port: model.ServicePort, endpoint_slice: model.EndpointSlice) -> model.EndpointPort | None:
    for slice_port in endpoint_slice.ports:
        if slice_port.name == port.name and slice_port.protocol == port.protocol:
            return slice_port
    return None


def _deduplicate(candidates: Iterable[_Candidate]) -> list[_Candidate]:
    """One candidate per backend, before any rule looks at conditions.

    Slices of one Service may list the same address and port: an endpoint moving between slices,
    or a new pod reusing a terminating pod's IP. kube-proxy keeps a non-terminating copy over a
    terminating one and leaves the choice among non-terminating copies undefined (Go map order);
    here the most usable copy wins (ready, then serving), so the result never depends on order.

    Returns the candidates in backend order: every later rule is a filter, so their results
    come out sorted as the desired state wants them.
    """
    best: dict[tuple[tuple[int, int], int], _Candidate] = {}
    for candidate in candidates:
        kept = best.get(candidate.order)  # equal sort keys are equal backends, and cheaper to hash
        if kept is None or _preference(candidate) < _preference(kept):
            best[candidate.order] = candidate
    return [best[order] for order in sorted(best)]


def _preference(candidate: _Candidate) -> tuple[bool, bool, bool, str, tuple[str, ...], tuple[str, ...]]:
    endpoint = candidate.endpoint
    return (_terminating(endpoint), not _ready(endpoint), not _serving(endpoint), endpoint.node_name or "",
            tuple(sorted(endpoint.hint_zones)), tuple(sorted(endpoint.hint_nodes)))


class _Categories(msgspec.Struct, frozen=True, gc=False):
    """kube-proxy's CategorizeEndpoints result (clusterEndpoints, localEndpoints, hasAnyEndpoints)."""

    cluster: tuple[desired.Backend, ...]  # ready and topologically available; else serving-terminating
    local: tuple[desired.Backend, ...]  # this node's ready ones; else this node's serving-terminating
    has_any: bool  # a usable endpoint exists somewhere in the cluster


def _categorize(candidates: Sequence[_Candidate], *, here: _NodeTopology) -> _Categories:
    """Cluster-wide and node-local endpoints, each with its own terminating fallback (KEP-1669).

    Topology narrows only the cluster-wide set; the local set is this node's whatever the hints.
    Both sets are computed whatever the traffic policies: which one a frontend uses is decided by
    `_apply_traffic_policies`.
    """
    return _Categories(
        cluster=_backends(_cluster_endpoints(candidates, here=here)),
        local=_backends(_local_endpoints(candidates, here=here)),
        has_any=_has_any_endpoints(candidates),
    )


def _cluster_endpoints(candidates: Sequence[_Candidate], *, here: _NodeTopology) -> list[_Candidate]:
    mode = _topology_mode(candidates, here=here)
    if mode == _NO_TOPOLOGY:
        ready = [c for c in candidates if c.ready]
    else:
        ready = [c for c in candidates if c.ready and _available_for_topology(c, mode=mode, here=here)]
    if ready:
        return ready
    # No ready endpoint anywhere (a topology mode is only chosen when a ready endpoint fits it), so
    # fall back to the serving-terminating ones, without topology: a best effort not to refuse.
    return [c for c in candidates if c.serving_terminating]


def _local_endpoints(candidates: Sequence[_Candidate], *, here: _NodeTopology) -> list[_Candidate]:
    local = [c for c in candidates if _is_local(c, here=here)]
    ready = [c for c in local if c.ready]
    return ready or [c for c in local if c.serving_terminating]


def _has_any_endpoints(candidates: Sequence[_Candidate]) -> bool:
    """kube-proxy's hasAnyEndpoints: some endpoint, on any node, is ready or serving-terminating."""
    return any(c.ready or c.serving_terminating for c in candidates)


def _topology_mode(candidates: Sequence[_Candidate], *, here: _NodeTopology) -> str:
    """kube-proxy's topologyModeFromHints: which hints, if any, narrow the cluster-wide set.

    Only ready endpoints are looked at. Node hints apply when every ready endpoint has one and at
    least one names this node; else zone hints apply when every ready endpoint has one and at least
    one names this node's zone (never when the node has no zone label, unless a hint names the
    empty zone, as in kube-proxy); else none do and every ready endpoint is used.
    """
    ready = [c.endpoint for c in candidates if c.ready]
    if not ready:
        return _NO_TOPOLOGY
    if all(e.hint_nodes for e in ready) and any(here.name in e.hint_nodes for e in ready):
        return _PREFER_SAME_NODE
    if all(e.hint_zones for e in ready) and any(here.zone in e.hint_zones for e in ready):
        return _PREFER_SAME_ZONE
    return _NO_TOPOLOGY


def _available_for_topology(candidate: _Candidate, *, mode: str, here: _NodeTopology) -> bool:
    """kube-proxy's availableForTopology: no fallback here, that happened in choosing the mode."""
    if mode == _PREFER_SAME_NODE:
        return here.name in candidate.endpoint.hint_nodes
    if mode == _PREFER_SAME_ZONE:
        return here.zone in candidate.endpoint.hint_zones
    return True


def _backends(selected: Iterable[_Candidate]) -> tuple[desired.Backend, ...]:
    # Candidates come de-duplicated and sorted (`_deduplicate`), and every rule is a filter.
    return tuple([candidate.backend for candidate in selected])


# --- traffic policies ------------------------------------------------------------------------


class _PolicyResult(msgspec.Struct, frozen=True, gc=False):
    backends: tuple[desired.Backend, ...]
    drop: bool
    external_backends: tuple[desired.Backend, ...] | None
    local_backends: tuple[desired.Backend, ...] | None


def _apply_traffic_policies(
    service: model.Service, *, endpoints: _Categories, externally_accessible: bool
) -> _PolicyResult:
    """Which endpoint set each kind of frontend leads to, as kube-proxy's iptables proxier wires it.

    - ClusterIP frontends follow internalTrafficPolicy: Local means this node's endpoints only.
      With none here while other nodes have some, kube-proxy DROPs (the client times out); with
      none anywhere it REJECTs (refused), as it does under either policy.
    - A socket on this node reaching an ExternalIP, LoadBalancer IP or node port is short-circuited
      to the cluster-wide set (kube-proxy's EXT chain jumps pod and host traffic to the cluster
      policy chain) whatever the externalTrafficPolicy and the internalTrafficPolicy.
    - externalTrafficPolicy Local restricts only traffic from outside the node: `local_backends`.
    """
    internal_local = service.internal_traffic_policy is model.TrafficPolicy.LOCAL
    backends = endpoints.local if internal_local else endpoints.cluster
    drop = internal_local and not backends and endpoints.has_any
    external = endpoints.cluster if externally_accessible and endpoints.cluster != backends else None
    external_local = service.external_traffic_policy is model.TrafficPolicy.LOCAL
    local = endpoints.local if external_local and externally_accessible else None
    return _PolicyResult(backends=backends, drop=drop, external_backends=external, local_backends=local)


def _plain_policy(
    service: model.Service,
    *,
    port: model.ServicePort,
    slices: Iterable[model.EndpointSlice],
    family: model.IPFamily,
    externally_accessible: bool,
) -> _PolicyResult | None:
    """The common case in one pass over the endpoints, or None when the rules above must decide.

    The common case: internalTrafficPolicy Cluster, not externally accessible in this family,
    and every endpoint of the family's slices ready (or unset) and without hints. Its result is
    the one `_apply_traffic_policies(_categorize(_candidates(...)))` gives, because there:
    - only the cluster-wide set is read: ClusterIP frontends take it under internalTrafficPolicy
      Cluster, `drop` needs Local, and `external_backends` and `local_backends` both need the
      port to be externally accessible;
    - `_topology_mode` finds no mode (no ready endpoint has a hint), so `_cluster_endpoints`
      keeps every ready candidate: all of them;
    - `_deduplicate` keeps one copy of a backend listed twice, and which one does not matter
      when every copy is ready: the backends are the distinct ones, in backend order.
    At 10k Services this skips building 40k candidates and their categories at start-up.
    """
    if externally_accessible or service.internal_traffic_policy is model.TrafficPolicy.LOCAL:
        return None
    found: dict[tuple[tuple[int, int], int], desired.Backend] = {}
    for endpoint_slice in slices:
        slice_port = _slice_port_for(port, endpoint_slice)
        if slice_port is None:
            continue
        for endpoint in endpoint_slice.endpoints:
            if not _ready(endpoint) or endpoint.hint_zones or endpoint.hint_nodes:
                return None
            # As `_candidates`: the first address only, and only of this family.
            if not endpoint.addresses or model.family_of(endpoint.addresses[0]) != family:
                continue
            backend = desired.Backend(endpoint.addresses[0], slice_port.port)
            found[backend.sort_key()] = backend
    backends = tuple([found[order] for order in sorted(found)])
    return _PolicyResult(backends=backends, drop=False, external_backends=None, local_backends=None)


# --- health checks ---------------------------------------------------------------------------
#
# Followed: kube-proxy's pkg/proxy/healthcheck (service_health.go, proxy_health.go) and the
# local-endpoint count the proxiers hand it (pkg/proxy/endpoints.go, EndpointsMap.
# LocalReadyEndpoints), as of Kubernetes 1.34 (kubernetes/kubernetes master).

# The taint the Cluster Autoscaler puts on a node it is about to delete (kube-proxy's ToBeDeletedTaint).
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """A Service's healthCheckNodePort, and how many ready endpoints it has on this node.

    `local_endpoints` holds one count per family the Service is served in, IPv4 first: kube-proxy
    runs one proxier, with its own health server and count, per family.
    """

    namespace: str
    name: str
    port: int
    local_endpoints: tuple[tuple[model.IPFamily, int], ...]

    def local_endpoints_for(self, family: model.IPFamily) -> int:
        """The count a health check arriving over `family` is answered with.

        kube-proxy's per-family servers each answer with their own family's count (each on its
        family's node addresses when --nodeport-addresses names them; with the default, both
        want the same all-address port and the first to listen serves it). ctlb listens once, on
        both families, so it answers each with its own family's count, and a family the Service
        is not served in with the first family's.
        """
        counts = dict(self.local_endpoints)
        if family in counts:
            return counts[family]
        return self.local_endpoints[0][1] if self.local_endpoints else 0


def needs_health_check(service: model.Service) -> bool:
    """kube-proxy's NeedsHealthCheck (a LoadBalancer with externalTrafficPolicy Local) and a port.

    A NodePort Service with externalTrafficPolicy Local gets no health check, even with a
    healthCheckNodePort (the API server allocates none for it anyway). kube-proxy logs a
    LoadBalancer Service without one and serves it without a health check: so does ctlb.
    """
    return (service.type is model.ServiceType.LOAD_BALANCER
            and service.external_traffic_policy is model.TrafficPolicy.LOCAL
            and service.health_check_node_port is not None
            and is_proxied(service))


def health_check(
    service: model.Service, *, slices: Sequence[model.EndpointSlice], node_name: str
) -> HealthCheck | None:
    """The health check kube-proxy serves for a Service on this node, or None if it serves none.

    Args:
        service: the Service.
        slices: its EndpointSlices, of every address type, in any order.
        node_name: this node's name ("" counts no endpoint as local).

    Returns:
        The port and the local endpoint counts; None unless `needs_health_check`.
    """
    if not needs_health_check(service) or service.health_check_node_port is None:
        return None
    counts = tuple((family, local_ready_endpoints(_slices_of_family(slices, family), node_name=node_name))
                   for family in _families(service))
    return HealthCheck(namespace=service.namespace, name=service.name, port=service.health_check_node_port,
                       local_endpoints=counts)


def local_ready_endpoints(slices: Iterable[model.EndpointSlice], *, node_name: str) -> int:
    """kube-proxy's LocalReadyEndpoints: distinct addresses of this node's ready endpoints.

    - Ready only (unset counts as ready): a serving-terminating endpoint still gets traffic
      (KEP-1669) but fails the health check, so the load balancer drains the node before the
      last endpoint goes ("Only add ready endpoints for health checking", endpoints.go).
    - Local: the endpoint's nodeName is this node's.
    - Counted by address, not by address and port: an endpoint behind two Service ports is one.
      kube-proxy counts the first address of every endpoint in a slice port it read (one with a
      port number), whether or not the Service has that port: so does this.
    - An address listed twice (an endpoint moving between slices) counts when any copy is local
      and ready; kube-proxy keeps one copy, which one depending on map order.
    """
    if not node_name:
        return 0
    addresses = {endpoint.addresses[0]
                 for endpoint_slice in slices if endpoint_slice.ports
                 for endpoint in endpoint_slice.endpoints
                 if endpoint.addresses and endpoint.node_name == node_name and _ready(endpoint)}
    return len(addresses)


def node_eligible(node: model.Node | None) -> bool:
    """kube-proxy's NodeEligible, which /healthz (not /livez) answers 503 without.

    A node is eligible unless it is being deleted or the Cluster Autoscaler tainted it for
    deletion. Without its Node object it is not eligible either (kube-proxy 1.34's NodeManager
    has no node to report then).
    """
    if node is None or node.deleting:
        return False
    return TO_BE_DELETED_TAINT not in node.taints


def proxy_healthy(*, synced: bool, oldest_pending: float | None, now: float, timeout: float) -> bool:
    """kube-proxy's proxy health: no change has waited longer than `timeout` for a sync.

    Args:
        synced: a sync has completed since start. Until then the proxy counts as healthy
            (kube-proxy: "the proxier is healthy while it's starting up").
        oldest_pending: when the oldest change not yet programmed arrived (seconds on the same
            clock as `now`), None when everything is programmed.
        now: the current time.
        timeout: kube-proxy's healthTimeout (twice its sync period, 60 s by default).
    """
    if not synced or oldest_pending is None:
        return True
    return now - oldest_pending < timeout
