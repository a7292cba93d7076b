"""The plain-data model of the Kubernetes objects ctlb serves.

Sources (manifest files, the API watch) turn API objects into these values through
`ctlb.kubeobjects`; `ctlb.semantics` turns them into the desired datapath state. Nothing here
touches the kernel, the network, the clock or a file.

The values are frozen `msgspec.Struct`s, not frozen dataclasses: a 10k-Service start-up builds
some 80k of them, and a Struct is built in C (an `Endpoint` in 0.07 us; a frozen dataclass takes
0.8 us, setting each field through `object.__setattr__`). They hold only immutable values, so
they can never be part of a reference cycle and are kept out of the garbage collector (`gc=False`).
"""

from __future__ import annotations

import enum
import ipaddress

import msgspec

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Protocol(enum.StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class IPFamily(enum.StrEnum):
    IPv4 = "IPv4"
    IPv6 = "IPv6"


def family_of(address: IPAddress) -> IPFamily:
    return IPFamily.IPv4 if address.version == 4 else IPFamily.IPv6


class ServiceType(enum.StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


class TrafficPolicy(enum.StrEnum):
    CLUSTER = "Cluster"
    LOCAL = "Local"


class ObjectRef(msgspec.Struct, frozen=True, order=True, gc=False):
    """Names an object in logs and errors: `Service default/web`."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}"


class ServicePort(msgspec.Struct, frozen=True, gc=False):
    name: str  # "" when the Service has a single unnamed port
    protocol: Protocol
    port: int
    target_port: int | str  # a number, or the name of a container port
    node_port: int | None = None
    app_protocol: str | None = None


class LoadBalancerIngress(msgspec.Struct, frozen=True, gc=False):
    ip: IPAddress
    ip_mode: str | None = None  # "VIP", "Proxy" or unset


class Service(msgspec.Struct, frozen=True, gc=False):
    namespace: str
    name: str
    type: ServiceType
    ports: tuple[ServicePort, ...]
    cluster_ips: tuple[IPAddress, ...] = ()  # empty for headless ("None") and ExternalName
    headless: bool = False
    ip_families: tuple[IPFamily, ...] = ()
    external_ips: tuple[IPAddress, ...] = ()
    load_balancer_ingress: tuple[LoadBalancerIngress, ...] = ()
    # None: no session affinity; otherwise ClientIP affinity with this timeout in seconds.
    affinity_timeout: int | None = None
    external_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    internal_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    load_balancer_source_ranges: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    traffic_distribution: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    # spec.healthCheckNodePort as given (None when unset or 0); semantics decides whether it is served.
    health_check_node_port: int | None = None

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("Service", self.namespace, self.name)


class EndpointPort(msgspec.Struct, frozen=True, gc=False):
    name: str  # "" when unnamed
    protocol: Protocol
    port: int
    app_protocol: str | None = None


class Endpoint(msgspec.Struct, frozen=True, gc=False):
    addresses: tuple[IPAddress, ...]
    # Conditions as the API has them; None means unset (kube-proxy reads unset ready as true).
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None
    node_name: str | None = None
    zone: str | None = None
    hint_zones: tuple[str, ...] = ()
    hint_nodes: tuple[str, ...] = ()


class EndpointSlice(msgspec.Struct, frozen=True, gc=False):
    namespace: str
    name: str
    service_name: str  # from the kubernetes.io/service-name label
    address_type: str  # "IPv4", "IPv6" or "FQDN"
    endpoints: tuple[Endpoint, ...]
    ports: tuple[EndpointPort, ...]
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("EndpointSlice", self.namespace, self.name)


class Node(msgspec.Struct, frozen=True, gc=False):
    name: str
    addresses: tuple[IPAddress, ...]  # InternalIP and ExternalIP addresses
    labels: tuple[tuple[str, str], ...] = ()
    deleting: bool = False  # metadata.deletionTimestamp is set
    taints: tuple[str, ...] = ()  # the keys of spec.taints, in order

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("Node", "", self.name)


class Namespace(msgspec.Struct, frozen=True, gc=False):
    name: str
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("Namespace", "", self.name)


class Pod(msgspec.Struct, frozen=True, gc=False):
    namespace: str
    name: str
    uid: str
    node_name: str | None
    ips: tuple[IPAddress, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    qos_class: str | None = None
    host_network: bool = False  # shares the node's network namespace: never meshed

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("Pod", self.namespace, self.name)


KubeObject = Service | EndpointSlice | Node | Namespace | Pod


class Problem(msgspec.Struct, frozen=True, order=True, gc=False):
    """Why an object (or a part of it) is not served: shown in logs and `ctlb status`."""

    ref: str  # e.g. "Service default/web"
    reason: str

    def __str__(self) -> str:
        return f"{self.ref}: {self.reason}"


class Snapshot(msgspec.Struct, frozen=True, gc=False):
    """Every object a source currently holds, valid ones only, plus what it had to reject."""

    services: tuple[Service, ...] = ()
    endpoint_slices: tuple[EndpointSlice, ...] = ()
    nodes: tuple[Node, ...] = ()
    namespaces: tuple[Namespace, ...] = ()
    pods: tuple[Pod, ...] = ()
    problems: tuple[Problem, ...] = ()
