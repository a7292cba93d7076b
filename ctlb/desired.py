"""The desired datapath state: what `semantics` decides and the datapath programs.

A *service port* (kube-proxy's ServicePortName, per address family) owns a set of frontends
(the addresses clients dial) and one ordered backend list. The datapath gives each service port a
stable id and points all its frontends at one backend set.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from ctlb import model


class FrontendKind(enum.StrEnum):
    CLUSTER_IP = "ClusterIP"
    EXTERNAL_IP = "ExternalIP"
    LOAD_BALANCER = "LoadBalancer"
    NODE_PORT = "NodePort"


def _address_key(address: model.IPAddress) -> tuple[int, int]:
    """IPv4 before IPv6: ipaddress refuses to compare addresses of two versions."""
    return (address.version, int(address))


@dataclass(frozen=True, slots=True)
class Frontend:
    address: model.IPAddress
    port: int
    protocol: model.Protocol

    def __lt__(self, other: Frontend) -> bool:
        return (_address_key(self.address), self.port, self.protocol) < (
            _address_key(other.address), other.port, other.protocol)

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class Backend:
    address: model.IPAddress
    port: int

    def __lt__(self, other: Backend) -> bool:
        return (_address_key(self.address), self.port) < (_address_key(other.address), other.port)

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    namespace: str
    name: str
    port: str  # the Service port's name, "" when unnamed
    protocol: model.Protocol
    family: model.IPFamily

    def __str__(self) -> str:
        port = f":{self.port}" if self.port else ""
        return f"{self.namespace}/{self.name}{port}/{self.protocol}/{self.family}"


@dataclass(frozen=True, slots=True)
class ServicePortState:
    name: ServicePortName
    frontends: Mapping[Frontend, FrontendKind]
    backends: tuple[Backend, ...]  # sorted, de-duplicated; empty means refuse
    affinity_timeout: int | None = None  # seconds of ClientIP affinity, None for none


@dataclass(frozen=True, slots=True)
class DesiredState:
    service_ports: Mapping[ServicePortName, ServicePortState] = field(default_factory=dict)
    problems: tuple[model.Problem, ...] = ()

    def frontend_count(self) -> int:
        return sum(len(sp.frontends) for sp in self.service_ports.values())
