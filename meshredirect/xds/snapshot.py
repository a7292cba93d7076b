"""Versioned snapshots: what every sidecar of the node is served, per resource type.

A snapshot holds, for each of the four types, the resources by name (packed as `Any`, ready to
send) and a version. The version of a type is a digest of its content, so it changes exactly when
that type's resources change: an endpoint change moves the EDS version only, nothing else is
re-sent, and a server that restarts with the same objects serves the same versions. The serial
counts publications, for logs.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from google.protobuf import any_pb2
from google.protobuf.message import Message

from ctlb import desired, model
from meshredirect.xds import resources

_VERSION_DIGITS = 16


class TypeUrl(enum.StrEnum):
    CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
    ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

    @property
    def short(self) -> str:
        """CDS, EDS, LDS or RDS: how logs name the type."""
        return _SHORT[self]


_SHORT = {TypeUrl.CLUSTER: "CDS", TypeUrl.ENDPOINT: "EDS", TypeUrl.LISTENER: "LDS", TypeUrl.ROUTE: "RDS"}

# The order changes go out in, make before break (as go-control-plane does): a cluster exists
# before the endpoints that fill it, both before a listener that routes to it, and a listener
# before the routes it names. Envoy keeps a new cluster warming until its endpoints arrive.
PUSH_ORDER = (TypeUrl.CLUSTER, TypeUrl.ENDPOINT, TypeUrl.LISTENER, TypeUrl.ROUTE)

# Types whose subscription with no names means "all of them" (wildcard); EDS and RDS are always
# asked for by name.
WILDCARD_TYPES = frozenset({TypeUrl.CLUSTER, TypeUrl.LISTENER})


@dataclass(frozen=True, slots=True)
class TypeSnapshot:
    """The resources of one type, by name, and their version."""

    version: str
    resources: Mapping[str, any_pb2.Any]


@dataclass(frozen=True, slots=True)
class Snapshot:
    serial: int
    types: Mapping[TypeUrl, TypeSnapshot]
    # Service ports (or frontends) that could not be served to sidecars, and why.
    problems: tuple[model.Problem, ...] = ()

    def version(self, type_url: TypeUrl) -> str:
        return self.types[type_url].version

    def versions(self) -> dict[str, str]:
        """Each type's version by its short name: for logs and status."""
        return {t.short: self.types[t].version for t in PUSH_ORDER}

    def resources(self, type_url: TypeUrl, names: frozenset[str] | None) -> list[any_pb2.Any]:
        """The resources of a type in name order: all of them (names None), or those named that
        exist (a name the snapshot lacks is left out, as a SotW answer may)."""
        held = self.types[type_url].resources
        wanted = sorted(held) if names is None else sorted(n for n in names if n in held)
        return [held[name] for name in wanted]


def from_resources(built: resources.Resources, *, serial: int) -> Snapshot:
    """Packs resources built afresh into a snapshot, each type versioned by its content."""
    named: dict[TypeUrl, list[tuple[str, Message]]] = {
        TypeUrl.CLUSTER: [(c.name, c) for c in built.clusters],
        TypeUrl.ENDPOINT: [(e.cluster_name, e) for e in built.endpoints],
        TypeUrl.LISTENER: [(listener.name, listener) for listener in built.listeners],
        TypeUrl.ROUTE: [(r.name, r) for r in built.routes],
    }
    types = {t: _digested([(name, _pack(m)) for name, m in named[t]]) for t in PUSH_ORDER}
    return Snapshot(serial=serial, types=types, problems=built.problems)


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    # Deterministic: equal content packs to equal bytes, which the version digests.
    packed.Pack(message, deterministic=True)
    return packed


def _digested(items: Iterable[tuple[str, any_pb2.Any]]) -> TypeSnapshot:
    """The resources by name, versioned by a digest of their names and content."""
    digest = hashlib.blake2b(digest_size=_VERSION_DIGITS // 2)
    held: dict[str, any_pb2.Any] = {}
    for name, packed in sorted(items, key=lambda item: item[0]):
        held[name] = packed
        # Length-prefixed, so no two different sets feed the digest the same byte stream.
        for part in (name.encode(), packed.value):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return TypeSnapshot(version=digest.hexdigest(), resources=held)

@dataclass(slots=True)
class _Entry:
    """One service port's share of the snapshot, and what it was built from."""

    state: desired.ServicePortState
    port: model.ServicePort
    part: resources.PortResources
    packed: dict[TypeUrl, tuple[tuple[str, any_pb2.Any], ...]]


class SnapshotBuilder:
    """Builds snapshots from the planner's state, rebuilding only the service ports that moved.

    The planner keeps an unchanged service port's state as the same object, so a publication
    after one EndpointSlice changed rebuilds one service port and re-digests only the endpoint
    type; the 3 MB listener of 10k Services is rebuilt only when a filter chain changed. The
    result equals `from_resources(resources.build(...))` of the same input (a unit test holds
    this). Not thread-safe: the server calls it under its publish lock.
    """

    def __init__(self, options: resources.Options) -> None:
        self.options = options
        self._entries: dict[desired.ServicePortName, _Entry] = {}
        fixed = resources.fixed_clusters(options)
        self._fixed_clusters = tuple((c.name, _pack(c)) for c in fixed)
        self._types: dict[TypeUrl, TypeSnapshot] = {}
        self._listener_problems: list[model.Problem] = []

    def build(
        self,
        states: Mapping[desired.ServicePortName, desired.ServicePortState],
        services: Iterable[model.Service],
        *,
        serial: int,
    ) -> Snapshot:
        """The snapshot of `states`, reusing what did not change since the last build."""
        by_key = {(s.namespace, s.name): s for s in services}
        dirty: set[TypeUrl] = set() if self._types else set(PUSH_ORDER)
        problems: list[model.Problem] = []
        seen: set[desired.ServicePortName] = set()
        for name, state in states.items():
            if name.protocol is not model.Protocol.TCP:
                continue
            found = resources.service_port(name, by_key)
            if found is None:
                problems.append(resources.missing_service_problem(name))
                continue
            seen.add(name)
            dirty |= self._update(name, state, service=found[0], port=found[1])
        for name in self._entries.keys() - seen:
            del self._entries[name]
            dirty |= set(PUSH_ORDER)
        for type_url in dirty:
            self._types[type_url] = self._rebuild(type_url)
        return Snapshot(serial=serial, types=dict(self._types),
                        problems=tuple(sorted(problems + self._listener_problems)))

    def _update(
        self, name: desired.ServicePortName, state: desired.ServicePortState, *,
        service: model.Service, port: model.ServicePort,
    ) -> set[TypeUrl]:
        """Rebuilds one service port if its input moved; returns the types whose content did."""
        old = self._entries.get(name)
        if old is not None and (old.state is state or old.state == state) and old.port == port:
            old.state = state  # equal: keep the newer object, so the next `is` test is the quick one
            return set()
        part = resources.for_service_port(state, service=service, port=port, options=self.options)
        packed = {
            TypeUrl.CLUSTER: tuple((c.name, _pack(c)) for c in part.clusters),
            TypeUrl.ENDPOINT: tuple((e.cluster_name, _pack(e)) for e in part.endpoints),
            TypeUrl.ROUTE: tuple((r.name, _pack(r)) for r in part.routes),
        }
        changed = {TypeUrl.LISTENER} if old is None or not _same_chains(old.part, part) else set()
        for type_url, items in packed.items():
            if old is not None and _same_packed(old.packed[type_url], items):
                packed[type_url] = old.packed[type_url]
            else:
                changed.add(type_url)
        self._entries[name] = _Entry(state=state, port=port, part=part, packed=packed)
        return changed

    def _rebuild(self, type_url: TypeUrl) -> TypeSnapshot:
        if type_url is TypeUrl.LISTENER:
            parts = [self._entries[name].part for name in sorted(self._entries)]
            listener, self._listener_problems = resources.outbound_listener(parts, options=self.options)
            return _digested([(listener.name, _pack(listener))])
        items = [item for entry in self._entries.values() for item in entry.packed[type_url]]
        if type_url is TypeUrl.CLUSTER:
            items += self._fixed_clusters
        return _digested(items)


def _same_chains(old: resources.PortResources, new: resources.PortResources) -> bool:
    return len(old.chains) == len(new.chains) and all(
        a.frontend == b.frontend and a.message == b.message for a, b in zip(old.chains, new.chains))


def _same_packed(old: tuple[tuple[str, any_pb2.Any], ...], new: tuple[tuple[str, any_pb2.Any], ...]) -> bool:
    return len(old) == len(new) and all(a[0] == b[0] and a[1].value == b[1].value for a, b in zip(old, new))
