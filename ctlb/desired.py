"""The desired datapath state: what `semantics` decides and the datapath programs.

A *service port* (kube-proxy's ServicePortName, per address family) owns a set of frontends
(the addresses clients dial) and the backends each kind of frontend leads to. The datapath gives
each service port a stable id; in the common case every frontend points at one backend set.

Values are frozen `msgspec.Struct`s, as in `ctlb.model` and for the same reason: a 10k-Service
start-up builds some 70k of them.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from typing import NamedTuple

import msgspec

from ctlb import model


class FrontendKind(enum.StrEnum):
    CLUSTER_IP = "ClusterIP"
    EXTERNAL_IP = "ExternalIP"
    LOAD_BALANCER = "LoadBalancer"
    NODE_PORT = "NodePort"


def _address_key(address: model.IPAddress) -> tuple[int, int]:
    """IPv4 before IPv6: ipaddress refuses to compare addresses of two versions."""
    return (address.version, int(address))


# cache_hash: a frontend keys the planner's claims, the reconciler's shadow and the tables' slots,
# and is hashed ten times over at start-up; its address hashes in Python, as text. msgspec keeps
# the hash in a hidden slot, no field: not compared, not in repr or asdict, not passed, not copied.
class Frontend(msgspec.Struct, frozen=True, gc=False, cache_hash=True):
    address: model.IPAddress
    port: int
    protocol: model.Protocol

    def sort_key(self) -> tuple[tuple[int, int], int, str]:
        """The order of frontends, as a key: sorting by it calls no Python per comparison."""
        return (_address_key(self.address), self.port, self.protocol)

    def __lt__(self, other: Frontend) -> bool:
        return self.sort_key() < other.sort_key()

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.protocol}"


class Backend(msgspec.Struct, frozen=True, gc=False):
    address: model.IPAddress
    port: int

    def sort_key(self) -> tuple[tuple[int, int], int]:
        """The order of backends, as a key; equal keys mean equal backends."""
        return (_address_key(self.address), self.port)

    def __lt__(self, other: Backend) -> bool:
        return self.sort_key() < other.sort_key()

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


# cache_hash: a name keys the planner's, the reconciler's and the agent's maps, and is hashed about
# fifteen times over at start-up; a cached hash is read in half the time of five fields' hashes.
# order: field by field, compared in C, so the reconciler sorts 10k names calling no Python.
class ServicePortName(msgspec.Struct, frozen=True, order=True, gc=False, cache_hash=True):
    namespace: str
    name: str
    port: str  # the Service port's name, "" when unnamed
    protocol: model.Protocol
    family: model.IPFamily

    def __str__(self) -> str:
        port = f":{self.port}" if self.port else ""
        return f"{self.namespace}/{self.name}{port}/{self.protocol}/{self.family}"


SourceRange = ipaddress.IPv4Network | ipaddress.IPv6Network


class FrontendGroup(NamedTuple):
    """Frontends of one service port that lead to the same backends, with the same verdict when
    there are none: dropped (`drop`) or refused; and the same gate: `restricted` frontends (the
    LoadBalancer IPs of a service port with source ranges) drop clients outside the ranges."""

    backends: tuple[Backend, ...]
    drop: bool
    frontends: tuple[Frontend, ...]
    restricted: bool = False


# Tracked by the garbage collector, unlike the values above: `frontends` is a mutable mapping.
class ServicePortState(msgspec.Struct, frozen=True):
    """One service port of one family: its frontends and what a connection to each gets.

    Which backends a connection made by a socket on this node gets depends on the frontend's kind:

    - ClusterIP frontends: `backends`. Empty means refuse (ECONNREFUSED, kube-proxy's REJECT),
      unless `drop` is set: then the connection is dropped (the client times out, kube-proxy's DROP).
    - ExternalIP, LoadBalancer and NodePort frontends: `external_backends`, or `backends` (and
      `drop`) when it is None. Empty means refuse. kube-proxy sends node-local clients of these
      frontends to the cluster-wide set whatever the externalTrafficPolicy (its short-circuit).

    LoadBalancer frontends of a service port with `source_ranges` admit only clients whose address
    is in one of them (a pod's address; the node's own processes when `source_ranges_admit_node`),
    once there are backends: kube-proxy's firewall drops the others, and refuses all alike when
    there are none.

    Every tuple of backends is sorted and de-duplicated. `local_backends` is for traffic arriving
    from outside the node (a tc path); nothing consumes it yet.
    """

    name: ServicePortName
    frontends: Mapping[Frontend, FrontendKind]
    # What a socket on this node gets at a ClusterIP frontend: internalTrafficPolicy and topology
    # applied.
    backends: tuple[Backend, ...]
    affinity_timeout: int | None = None  # seconds of ClientIP affinity, None for none
    # `backends` is empty only because internalTrafficPolicy is Local and this node has no endpoint
    # while other nodes do: drop, do not refuse.
    drop: bool = False
    # What a socket on this node gets at ExternalIP, LoadBalancer and NodePort frontends (the
    # cluster-wide, topology-filtered set); None when equal to `backends` (the common case), or
    # when the Service is not externally accessible in this family (no external IP, LoadBalancer
    # IP or node port).
    external_backends: tuple[Backend, ...] | None = None
    # loadBalancerSourceRanges of this family, for the LoadBalancer frontends; () when the service
    # port has no LoadBalancer frontend of this family or no ranges of this family (no restriction).
    source_ranges: tuple[SourceRange, ...] = ()
    # Some range holds one of this node's addresses of this family: a connection from the node
    # itself leaves with such an address, so it passes.
    source_ranges_admit_node: bool = False
    # This node's endpoints, for external traffic under externalTrafficPolicy Local (the tc NodePort
    # path); None when externalTrafficPolicy is Cluster or the service port is not externally
    # accessible. When empty: drop such traffic if the cluster-wide set (`external_backends`, else
    # `backends`) has endpoints, refuse it if not.
    local_backends: tuple[Backend, ...] | None = None

    def backends_for(self, kind: FrontendKind) -> tuple[Backend, ...]:
        """What a socket on this node gets at a frontend of this kind."""
        if kind is FrontendKind.CLUSTER_IP or self.external_backends is None:
            return self.backends
        return self.external_backends

    def drops_at(self, kind: FrontendKind) -> bool:
        """Whether a connection at a frontend of this kind is dropped (not refused) for want of
        backends: `drop` applies wherever `backends` does."""
        return self.drop and not self.backends_for(kind) and (
            kind is FrontendKind.CLUSTER_IP or self.external_backends is None)

    def restricts(self, kind: FrontendKind) -> bool:
        """Whether frontends of this kind admit only clients within `source_ranges`."""
        return bool(self.source_ranges) and kind is FrontendKind.LOAD_BALANCER

    def frontend_groups(self) -> list[FrontendGroup]:
        """The frontends grouped by the backend set they point at and how they gate clients: one
        group in the common case."""
        if self.external_backends is None and not self.source_ranges:
            # Every kind gets `backends` and drops alike: one group, without hashing the sets.
            return [FrontendGroup(self.backends, self.drops_at(FrontendKind.CLUSTER_IP), tuple(self.frontends))
                    ] if self.frontends else []
        groups: dict[tuple[tuple[Backend, ...], bool, bool], list[Frontend]] = {}
        for frontend, kind in self.frontends.items():
            key = (self.backends_for(kind), self.drops_at(kind), self.restricts(kind))
            groups.setdefault(key, []).append(frontend)
        return [FrontendGroup(backends, drop, tuple(frontends), restricted)
                for (backends, drop, restricted), frontends in groups.items()]


class DesiredState(msgspec.Struct, frozen=True):
    service_ports: Mapping[ServicePortName, ServicePortState] = msgspec.field(default_factory=dict)
    problems: tuple[model.Problem, ...] = ()

    def frontend_count(self) -> int:
        return sum(len(sp.frontends) for sp in self.service_ports.values())
