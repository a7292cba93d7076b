"""Which pods of this node are in the mesh, and what their sidecars capture: the mesh's rules.

A namespace opts in with a label (`ctlb.io/mesh=enabled`; Istio's `istio-injection=enabled` is
honoured too); a pod opts out with `sidecar.istio.io/inject: "false"` (annotation, or the label
newer Istio uses). In a meshed pod, outbound TCP goes to the sidecar, except what Istio's own
capture rules would leave alone, which the pod can widen with Istio's annotations:

- `traffic.sidecar.istio.io/excludeOutboundPorts`: ports never captured;
- `traffic.sidecar.istio.io/includeOutboundIPRanges`: "*" (the default) captures every
  destination, "" none, else only those CIDRs;
- `traffic.sidecar.istio.io/excludeOutboundIPRanges`: CIDRs never captured.

Everything here is pure: the datapath writer (`podmap`) and the cgroup finder (`cgroups`) act on
what it decides. A malformed annotation is reported against the pod; its valid entries are kept.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ctlb import model

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

EXCLUDE_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
INCLUDE_RANGES = "traffic.sidecar.istio.io/includeOutboundIPRanges"
EXCLUDE_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"

_Report = Callable[[str], None]  # takes the reason an annotation entry was ignored


@dataclass(frozen=True, slots=True)
class Label:
    """A `key=value` a namespace carries to switch the mesh on."""

    key: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Label:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ValueError(f"{text!r} is not KEY=VALUE")
        return cls(key, value)

    def __str__(self) -> str:
        return f"{self.key}={self.value}"


@dataclass(frozen=True, slots=True)
class MeshSettings:
    namespace_labels: tuple[Label, ...] = (Label("ctlb.io/mesh", "enabled"), Label("istio-injection", "enabled"))
    # A pod with this key set to "false" (annotation or label) stays out of the mesh.
    opt_out_key: str = "sidecar.istio.io/inject"
    sidecar_uid: int = 1337  # Istio's proxy uid: its connections are never captured
    outbound_port: int = 15001  # the sidecar's outbound listener


@dataclass(frozen=True, slots=True)
class Capture:
    """What a meshed pod's sidecar captures. `include` None means every destination."""

    include: tuple[Network, ...] | None = None
    exclude: tuple[Network, ...] = ()
    exclude_ports: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class PodMode:
    """A pod of this node as the datapath sees it: its addresses, and its capture if meshed."""

    namespace: str
    name: str
    uid: str
    ips: tuple[model.IPAddress, ...] = ()
    capture: Capture | None = None  # None: not meshed (connect-time load balancing)

    @property
    def meshed(self) -> bool:
        return self.capture is not None


@dataclass(frozen=True, slots=True)
class Decision:
    pods: dict[str, PodMode] = field(default_factory=dict)  # by pod UID
    problems: tuple[model.Problem, ...] = ()


def pod_modes(pods: Iterable[model.Pod], namespaces: Mapping[str, model.Namespace], *,
              node_name: str, settings: MeshSettings) -> Decision:
    """The mode of every pod of `node_name` that has its own network namespace and a UID."""
    modes: dict[str, PodMode] = {}
    problems: list[model.Problem] = []
    for pod in pods:
        if pod.node_name != node_name or pod.host_network or not pod.uid:
            continue
        capture = None
        if _meshed(pod, namespaces.get(pod.namespace), settings):
            capture, found = _capture(pod)
            problems.extend(found)
        modes[pod.uid] = PodMode(namespace=pod.namespace, name=pod.name, uid=pod.uid, ips=pod.ips,
                                 capture=capture)
    return Decision(pods=modes, problems=tuple(sorted(problems)))


def _meshed(pod: model.Pod, namespace: model.Namespace | None, settings: MeshSettings) -> bool:
    if namespace is None:
        return False
    labels = dict(namespace.labels)
    if not any(labels.get(label.key) == label.value for label in settings.namespace_labels):
        return False
    return not _opted_out(pod, settings.opt_out_key)


def _opted_out(pod: model.Pod, key: str) -> bool:
    # Istio compares case-insensitively after trimming ("False", " false").
    return any(k == key and v.strip().lower() == "false" for k, v in (*pod.annotations, *pod.labels))


def _capture(pod: model.Pod) -> tuple[Capture, list[model.Problem]]:
    annotations = dict(pod.annotations)
    problems: list[model.Problem] = []
    ref = f"Pod {pod.namespace}/{pod.name}"

    def report(annotation: str, reason: str) -> None:
        problems.append(model.Problem(ref, f"annotation {annotation}: {reason}"))

    include: tuple[Network, ...] | None = None
    # As Istio's iptables set-up: "*" anywhere in the list captures everything.
    if INCLUDE_RANGES in annotations and "*" not in _items(annotations[INCLUDE_RANGES]):
        include = _ranges(annotations[INCLUDE_RANGES], lambda r: report(INCLUDE_RANGES, r))
    exclude = _ranges(annotations.get(EXCLUDE_RANGES, ""), lambda r: report(EXCLUDE_RANGES, r))
    ports = _ports(annotations.get(EXCLUDE_PORTS, ""), lambda r: report(EXCLUDE_PORTS, r))
    return Capture(include=include, exclude=exclude, exclude_ports=ports), problems


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _ranges(text: str, report: _Report) -> tuple[Network, ...]:
    found: list[Network] = []
    for item in _items(text):
        if item == "*":
            report("'*' is only meaningful in includeOutboundIPRanges; ignored")
            continue
        try:
            # strict=False: Istio accepts a CIDR with host bits set and uses its network.
            found.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            report(f"{item!r} is not an IP range (CIDR); ignored")
    return tuple(sorted(set(found), key=lambda n: (n.version, n)))


def _ports(text: str, report: _Report) -> frozenset[int]:
    found: set[int] = set()
    for item in _items(text):
        if item.isdigit() and 1 <= int(item) <= 65535:
            found.add(int(item))
        else:
            report(f"{item!r} is not a port (1-65535); ignored")
    return frozenset(found)
