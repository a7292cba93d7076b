"""kube-proxy's rules, in one place: from Services and EndpointSlices to the desired state.

Pure: values in, values out. It decides which Services are proxied, which frontends (cluster,
external, LoadBalancer and node-port addresses) each service port has, and which endpoints back it.
Each rule is a named function, so traffic policies, topology and terminating endpoints slot in as
further steps of `_select_endpoints` without touching the rest.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ctlb import desired, model

# Labels with which a Service opts out of the default proxy (kube-proxy's ShouldSkipService).
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
_SKIP_LABELS = frozenset({SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL})

# LoadBalancer ingress modes whose IP reaches the node unchanged; "Proxy" means the load balancer
# terminates the traffic itself, so the IP must not be short-circuited.
_VIP_IP_MODES = frozenset({None, "VIP"})

_FAMILY_ORDER = (model.IPFamily.IPv4, model.IPFamily.IPv6)


@dataclass(frozen=True, slots=True)
class _Candidate:
    """An endpoint of a service port, with the facts later eligibility rules need."""

    backend: desired.Backend
    endpoint: model.Endpoint


class Memo:
    """Remembers each Service's service-port states, keyed by the identity of its inputs.

    Sources hand on unchanged objects as the same values, so a Service whose object, slices and
    node are the very same objects as last time gets last time's states without recomputing:
    one changed EndpointSlice costs one Service, not all of them. The result never depends on
    the memo, only the work does.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _MemoEntry] = {}
        self._next: dict[tuple[str, str], _MemoEntry] = {}

    def states(
        self,
        service: model.Service,
        *,
        slices: Sequence[model.EndpointSlice],
        node: model.Node | None,
    ) -> list[desired.ServicePortState]:
        key = (service.namespace, service.name)
        entry = self._entries.get(key)
        if entry is None or not entry.matches(service, slices, node):
            entry = _MemoEntry(service, tuple(slices), node, service_port_states(service, slices=slices, node=node))
        self._next[key] = entry
        return entry.states

    def rotate(self) -> None:
        """Forgets the Services the last pass did not ask about (deleted ones)."""
        self._entries, self._next = self._next, {}


@dataclass(frozen=True, slots=True)
class _MemoEntry:
    service: model.Service
    slices: tuple[model.EndpointSlice, ...]
    node: model.Node | None
    states: list[desired.ServicePortState]

    def matches(self, service: model.Service, slices: Sequence[model.EndpointSlice], node: model.Node | None) -> bool:
        return (self.service is service and self.node is node and len(self.slices) == len(slices)
                and all(a is b for a, b in zip(self.slices, slices)))


def desired_state(
    *,
    services: Iterable[model.Service],
    endpoint_slices: Iterable[model.EndpointSlice],
    node: model.Node | None,
    memo: Memo | None = None,
) -> desired.DesiredState:
    """Apply kube-proxy's rules to what the source holds.

    Args:
        services: every valid Service.
        endpoint_slices: every valid EndpointSlice.
        node: this node, for node-port frontends; None gives no node-port frontends.
        memo: per-Service results of the last pass, to skip unchanged Services (optional).

    Returns:
        The service ports to program, keyed and ordered by name, and the problems found (a
        frontend claimed by two Services stays with the one that sorts first by namespace/name).
    """
    slices = _slices_by_service(endpoint_slices)
    states: list[desired.ServicePortState] = []
    for service in sorted(services, key=lambda s: (s.namespace, s.name)):
        if not is_proxied(service):
            continue
        service_slices = slices.get((service.namespace, service.name), ())
        if memo is None:
            states.extend(service_port_states(service, slices=service_slices, node=node))
        else:
            states.extend(memo.states(service, slices=service_slices, node=node))
    if memo is not None:
        memo.rotate()
    kept, problems = _resolve_frontend_conflicts(states)
    return desired.DesiredState(
        service_ports={state.name: state for state in sorted(kept, key=lambda state: state.name)},
        problems=tuple(sorted(set(problems))),
    )


def _slices_by_service(
    endpoint_slices: Iterable[model.EndpointSlice],
) -> dict[tuple[str, str], tuple[model.EndpointSlice, ...]]:
    grouped: defaultdict[tuple[str, str], list[model.EndpointSlice]] = defaultdict(list)
    for endpoint_slice in endpoint_slices:
        grouped[(endpoint_slice.namespace, endpoint_slice.service_name)].append(endpoint_slice)
    # Sorted by slice name so the result never depends on the order the source listed them in.
    return {key: tuple(sorted(group, key=lambda s: s.name)) for key, group in grouped.items()}


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
    states: list[desired.ServicePortState] = []
    for family in _families(service):
        family_slices = [s for s in slices if s.address_type == family]
        for port in service.ports:
            states.append(
                desired.ServicePortState(
                    name=desired.ServicePortName(
                        namespace=service.namespace,
                        name=service.name,
                        port=port.name,
                        protocol=port.protocol,
                        family=family,
                    ),
                    frontends=_frontends(service, port=port, family=family, node=node),
                    backends=_backends(_select_endpoints(_candidates(port, family_slices, family=family))),
                    affinity_timeout=service.affinity_timeout,
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
    return dict(sorted(frontends.items()))


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


def _node_port_frontends(
    service: model.Service,
    *,
    port: model.ServicePort,
    node: model.Node | None,
) -> list[_FrontendRow]:
    has_node_ports = service.type in (model.ServiceType.NODE_PORT, model.ServiceType.LOAD_BALANCER)
    if not has_node_ports or port.node_port is None or node is None:
        return []
    return [(address, port.node_port, desired.FrontendKind.NODE_PORT) for address in node.addresses]


# --- backends --------------------------------------------------------------------------------


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
            candidates.append(_Candidate(backend=backend, endpoint=endpoint))
    return candidates


def _slice_port_for(port: model.ServicePort, endpoint_slice: model.EndpointSlice) -> model.EndpointPort | None:
    for slice_port in endpoint_slice.ports:
        if slice_port.name == port.name and slice_port.protocol == port.protocol:
            return slice_port
    return None


def _select_endpoints(candidates: Sequence[_Candidate]) -> list[_Candidate]:
    """The endpoints that receive traffic; later rules (policies, topology) filter here too."""
    return _ready_endpoints(candidates)


def _ready_endpoints(candidates: Sequence[_Candidate]) -> list[_Candidate]:
    # An unset ready condition counts as ready, as kube-proxy reads it.
    return [c for c in candidates if c.endpoint.ready is not False]


def _backends(selected: Iterable[_Candidate]) -> tuple[desired.Backend, ...]:
    # Slices of one Service may list the same endpoint (e.g. while the controller moves it).
    return tuple(sorted({candidate.backend for candidate in selected}))


# --- conflicts -------------------------------------------------------------------------------


def _resolve_frontend_conflicts(
    states: Sequence[desired.ServicePortState],
) -> tuple[list[desired.ServicePortState], list[model.Problem]]:
    """Give each frontend to the first service port (in Service order) that claims it.

    The loser keeps its other frontends; a service port left with none is dropped, since nothing
    could reach it.
    """
    owners: dict[desired.Frontend, desired.ServicePortName] = {}
    kept: list[desired.ServicePortState] = []
    problems: list[model.Problem] = []
    for state in states:
        frontends: dict[desired.Frontend, desired.FrontendKind] = {}
        for frontend, kind in state.frontends.items():
            owner = owners.setdefault(frontend, state.name)
            if owner == state.name:
                frontends[frontend] = kind
            else:
                problems.append(_conflict_problem(state.name, frontend=frontend, owner=owner))
        if frontends:
            kept.append(_with_frontends(state, frontends))
    return kept, problems


def _conflict_problem(
    loser: desired.ServicePortName, *, frontend: desired.Frontend, owner: desired.ServicePortName
) -> model.Problem:
    ref = model.ObjectRef("Service", loser.namespace, loser.name)
    reason = f"frontend {frontend} already used by Service {owner.namespace}/{owner.name}"
    return model.Problem(ref=str(ref), reason=reason)


def _with_frontends(
    state: desired.ServicePortState, frontends: Mapping[desired.Frontend, desired.FrontendKind]
) -> desired.ServicePortState:
    if frontends == state.frontends:
        return state
    return desired.ServicePortState(
        name=state.name,
        frontends=dict(frontends),
        backends=state.backends,
        affinity_timeout=state.affinity_timeout,
    )
