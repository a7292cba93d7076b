"""The one conversion from Kubernetes API objects to `ctlb.model` values.

Both sources (manifest files and the API watch) hand this module the same shapes: the dicts that
`kubectl get -o yaml` prints and the API serves as JSON (apiVersion, kind, metadata, spec, status).
It owns validation of those shapes: whatever is malformed becomes `errors.InvalidObject` naming
the object and the offending field, never a KeyError, TypeError or ValueError.

Two ways in, one result: the field readers convert any object and name any fault; a typed pass
(msgspec) converts the common shapes of Services and EndpointSlices several times faster, from
a decoded document or straight from JSON, and steps aside for everything else.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from ctlb import errors, model

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DEFAULT_NAMESPACE = "default"
# kube-apiserver's default for sessionAffinityConfig.clientIP.timeoutSeconds, and its upper bound.
DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400

_MISSING_NAME = "<no name>"
_UNKNOWN_KIND = "object"
_ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")
_INGRESS_IP_MODES = ("VIP", "Proxy")
_NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP")
# IANA_SVC_NAME as the API server checks it (k8s.io/apimachinery validation.IsValidPortName).
_PORT_NAME_CHARS = re.compile(r"^[a-z0-9-]{1,15}$")


_E = TypeVar("_E", bound=enum.StrEnum)


class _FieldError(Exception):
    """A malformed field; `parse` turns it into `errors.InvalidObject` with the object's ref."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def expand(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Flatten a list object into its items; anything else is a list of itself.

    Items of a typed list (`ServiceList`) may lack `kind` and `apiVersion`, as the API serves
    them; they get the list's item kind and apiVersion.

    Args:
        obj: one decoded document.

    Returns:
        The objects it holds, in order.

    Raises:
        errors.InvalidObject: a list whose `items` is not a list.
    """
    kind = obj.get("kind") if isinstance(obj, Mapping) else None
    if not isinstance(kind, str) or not kind.endswith("List"):
        return [obj]
    items = obj.get("items")
    if items is None:
        return []
    if not isinstance(items, list):
        raise errors.InvalidObject(kind, f"items is {_type_name(items)}, not a list")
    item_kind = kind.removesuffix("List")
    expanded: list[Mapping[str, Any]] = []
    for item in items:
        if item_kind and isinstance(item, Mapping):
            item = _with_type(item, kind=item_kind, api_version=obj.get("apiVersion"))
        expanded.extend(expand(item))
    return expanded


def parse(obj: Mapping[str, Any]) -> model.KubeObject:
    """Convert one API object to its model value.

    Args:
        obj: a Service (v1), EndpointSlice (discovery.k8s.io/v1), Node, Namespace or Pod (v1).

    Returns:
        The model value.

    Raises:
        errors.InvalidObject: the object is malformed or of an unsupported kind; `ref` names it
            (`Service default/web`) and `reason` the field and value at fault.
    """
    converted = _parse_common(obj)
    if converted is not None:
        return converted
    try:
        return _parse(obj)
    except _FieldError as bad:
        raise errors.InvalidObject(str(_ref_of(obj)), bad.reason) from None


def _parse(obj: Mapping[str, Any]) -> model.KubeObject:
    if not isinstance(obj, Mapping):
        raise _FieldError(f"the document is {_type_name(obj)}, not a mapping")
    kind = obj.get("kind")
    if kind is None:
        raise _FieldError("kind is missing")
    if not isinstance(kind, str) or kind not in _PARSERS:
        raise _FieldError(f"kind {_show(kind)} is not supported (supported: {', '.join(_PARSERS)})")
    api_version, parser = _PARSERS[kind]
    given = obj.get("apiVersion")
    if given is None:
        raise _FieldError(f"apiVersion is missing (expected {api_version})")
    if given != api_version:
        raise _FieldError(f"apiVersion {_show(given)} is not supported for {kind} (expected {api_version})")
    meta = _mapping(obj, "metadata", path="", required=True)
    name = _required_string(meta, "name", path="metadata")
    if not name:
        raise _FieldError("metadata.name is empty")
    return parser(obj, meta)


def _ref_of(obj: object) -> model.ObjectRef:
    """Best-effort name of a possibly malformed object, for error messages; never raises."""
    if not isinstance(obj, Mapping):
        return model.ObjectRef(_UNKNOWN_KIND, "", _MISSING_NAME)
    kind = obj.get("kind")
    kind = kind if isinstance(kind, str) and kind else _UNKNOWN_KIND
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name = meta.get("name")
    name = name if isinstance(name, str) and name else _MISSING_NAME
    namespace = meta.get("namespace")
    if kind in _CLUSTER_SCOPED:
        namespace = ""
    elif not isinstance(namespace, str) or not namespace:
        namespace = DEFAULT_NAMESPACE
    return model.ObjectRef(kind, namespace, name)


def _with_type(item: Mapping[str, Any], *, kind: str, api_version: object) -> Mapping[str, Any]:
    filled = dict(item)
    filled.setdefault("kind", kind)
    if api_version is not None:
        filled.setdefault("apiVersion", api_version)
    return filled


# --- Service ---------------------------------------------------------------------------------


def _service(obj: Mapping[str, Any], meta: Mapping[str, Any]) -> model.Service:
    spec = _mapping(obj, "spec", path="", required=True)
    status = _mapping(obj, "status", path="")
    service_type = _enum(spec, "type", path="spec", choices=model.ServiceType, default=model.ServiceType.CLUSTER_IP)
    if service_type is model.ServiceType.EXTERNAL_NAME:
        # An ExternalName Service is a DNS alias: its cluster IP fields mean nothing to a proxy.
        _required_string(spec, "externalName", path="spec")
        cluster_ips: tuple[model.IPAddress, ...] = ()
        headless = False
    else:
        cluster_ips, headless = _cluster_ips(spec)
    ports = _service_ports(spec, needed=not headless and service_type is not model.ServiceType.EXTERNAL_NAME)
    return model.Service(
        namespace=_namespace_of(meta),
        name=meta["name"],
        type=service_type,
        ports=ports,
        cluster_ips=cluster_ips,
        headless=headless,
        ip_families=_ip_families(spec, cluster_ips=cluster_ips),
        external_ips=_ip_list(spec, "externalIPs", path="spec"),
        load_balancer_ingress=_load_balancer_ingress(status),
        affinity_timeout=_affinity_timeout(spec),
        external_traffic_policy=_traffic_policy(spec, "externalTrafficPolicy"),
        internal_traffic_policy=_traffic_policy(spec, "internalTrafficPolicy"),
        load_balancer_source_ranges=_source_ranges(spec),
        traffic_distribution=_string(spec, "trafficDistribution", path="spec"),
        labels=_string_pairs(meta, "labels"),
        health_check_node_port=_node_port(spec.get("healthCheckNodePort"), path="spec.healthCheckNodePort"),
    )


def _cluster_ips(spec: Mapping[str, Any]) -> tuple[tuple[model.IPAddress, ...], bool]:
    """Return (cluster IPs, headless); `clusterIPs` wins over the older single `clusterIP`."""
    single = _string(spec, "clusterIP", path="spec")
    many = _list(spec, "clusterIPs", path="spec")
    if many:
        raw = [_string_item(value, path=f"spec.clusterIPs[{i}]") for i, value in enumerate(many)]
        paths = [f"spec.clusterIPs[{i}]" for i in range(len(raw))]
        if single and single != raw[0]:
            raise _FieldError(f"spec.clusterIP {_show(single)} differs from spec.clusterIPs[0] {_show(raw[0])}")
    elif single:
        raw, paths = [single], ["spec.clusterIP"]
    else:
        # Not allocated yet (a hand-written manifest): the Service has no cluster IP.
        return (), False
    if "None" in raw:
        if len(raw) > 1:
            raise _FieldError(f"spec.clusterIPs {_show(raw)}: \"None\" (headless) must be the only value")
        return (), True
    ips = tuple(_ip(value, path=path) for value, path in zip(raw, paths, strict=True))
    if len(ips) > 2 or len({model.family_of(ip) for ip in ips}) != len(ips):
        raise _FieldError(f"spec.clusterIPs {_show(raw)} must hold at most one IPv4 and one IPv6 address")
    return ips, False


def _ip_families(spec: Mapping[str, Any], *, cluster_ips: tuple[model.IPAddress, ...]) -> tuple[model.IPFamily, ...]:
    raw = _list(spec, "ipFamilies", path="spec")
    if not raw:
        return tuple(model.family_of(ip) for ip in cluster_ips)
    families = tuple(
        _enum_value(value, path=f"spec.ipFamilies[{i}]", choices=model.IPFamily) for i, value in enumerate(raw)
    )
    if len(set(families)) != len(families):
        raise _FieldError(f"spec.ipFamilies {_show(raw)} names a family twice")
    return families


def _service_ports(spec: Mapping[str, Any], *, needed: bool) -> tuple[model.ServicePort, ...]:
    raw = _list(spec, "ports", path="spec")
    if not raw and needed:
        raise _FieldError("spec.ports is missing: a Service with a cluster IP needs at least one port")
    ports: list[model.ServicePort] = []
    for i, value in enumerate(raw):
        port = _service_port(_mapping_item(value, path=f"spec.ports[{i}]"), path=f"spec.ports[{i}]")
        for j, earlier in enumerate(ports):
            # The name and the (port, protocol) pair each identify a port: both must be unique.
            if earlier.name == port.name:
                what = f"has name {_show(port.name)}" if port.name else "is unnamed"
                reason = f"spec.ports[{i}] {what}, like spec.ports[{j}]: the ports of a Service need unique names"
                raise _FieldError(reason)
            if (earlier.port, earlier.protocol) == (port.port, port.protocol):
                raise _FieldError(f"spec.ports[{i}] {port.port}/{port.protocol} repeats spec.ports[{j}]")
        ports.append(port)
    return tuple(ports)


def _service_port(raw: Mapping[str, Any], *, path: str) -> model.ServicePort:
    port = _port(raw.get("port"), path=f"{path}.port")
    return model.ServicePort(
        name=_string(raw, "name", path=path) or "",
        protocol=_protocol(raw, path=path),
        port=port,
        target_port=_target_port(raw.get("targetPort"), path=f"{path}.targetPort", default=port),
        node_port=_node_port(raw.get("nodePort"), path=f"{path}.nodePort"),
        app_protocol=_string(raw, "appProtocol", path=path),
    )


def _target_port(value: object, *, path: str, default: int) -> int | str:
    # The API server defaults an unset, 0 or "" targetPort to the port itself.
    if value is None or value == 0 or value == "":
        return default
    if isinstance(value, str):
        if not _is_port_name(value):
            raise _FieldError(f"{path} {_show(value)} is neither a port number nor a valid port name (IANA_SVC_NAME)")
        return value
    return _port(value, path=path)


def _node_port(value: object, *, path: str) -> int | None:
    # 0 is how the API spells "not allocated".
    if value is None or value == 0:
        return None
    return _port(value, path=path)


def _is_port_name(value: str) -> bool:
    return (
        _PORT_NAME_CHARS.match(value) is not None
        and re.search(r"[a-z]", value) is not None
        and "--" not in value
        and not value.startswith("-")
        and not value.endswith("-")
    )


def _load_balancer_ingress(status: Mapping[str, Any]) -> tuple[model.LoadBalancerIngress, ...]:
    load_balancer = _mapping(status, "loadBalancer", path="status")
    ingress: list[model.LoadBalancerIngress] = []
    for i, value in enumerate(_list(load_balancer, "ingress", path="status.loadBalancer")):
        path = f"status.loadBalancer.ingress[{i}]"
        entry = _mapping_item(value, path=path)
        raw_ip = _string(entry, "ip", path=path)
        if not raw_ip:
            continue  # hostname-only ingress (AWS ELB): nothing a socket can be aimed at
        ip_mode = _string(entry, "ipMode", path=path)
        if ip_mode is not None and ip_mode not in _INGRESS_IP_MODES:
            raise _FieldError(f"{path}.ipMode {_show(ip_mode)} is not one of {', '.join(_INGRESS_IP_MODES)}")
        ingress.append(model.LoadBalancerIngress(ip=_ip(raw_ip, path=f"{path}.ip"), ip_mode=ip_mode))
    return tuple(ingress)


def _affinity_timeout(spec: Mapping[str, Any]) -> int | None:
    affinity = _string(spec, "sessionAffinity", path="spec")
    if affinity is None or affinity == "None":
        return None
    if affinity != "ClientIP":
        raise _FieldError(f"spec.sessionAffinity {_show(affinity)} is not one of None, ClientIP")
    config = _mapping(spec, "sessionAffinityConfig", path="spec")
    client_ip = _mapping(config, "clientIP", path="spec.sessionAffinityConfig")
    path = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    timeout = client_ip.get("timeoutSeconds")
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    return _int_in_range(timeout, path=path, low=1, high=MAX_AFFINITY_TIMEOUT)


def _traffic_policy(spec: Mapping[str, Any], key: str) -> model.TrafficPolicy:
    return _enum(spec, key, path="spec", choices=model.TrafficPolicy, default=model.TrafficPolicy.CLUSTER)


def _source_ranges(spec: Mapping[str, Any]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    ranges: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for i, value in enumerate(_list(spec, "loadBalancerSourceRanges", path="spec")):
        path = f"spec.loadBalancerSourceRanges[{i}]"
        text = _string_item(value, path=path).strip()  # kube-proxy trims blanks around a range
        try:
            if "/" not in text:
                raise ValueError(text)
            # strict=False: Go's net.ParseCIDR, which the API server uses, accepts host bits.
            ranges.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise _FieldError(f"{path} {_show(value)} is not a CIDR") from None
    return tuple(ranges)


# --- EndpointSlice ---------------------------------------------------------------------------


def _endpoint_slice(obj: Mapping[str, Any], meta: Mapping[str, Any]) -> model.EndpointSlice:
    labels = _string_pairs(meta, "labels")
    service_name = dict(labels).get(SERVICE_NAME_LABEL)
    if not service_name:
        raise _FieldError(f"metadata.labels has no {SERVICE_NAME_LABEL} label: the slice belongs to no Service")
    address_type = _required_string(obj, "addressType", path="")
    if address_type not in _ADDRESS_TYPES:
        raise _FieldError(f"addressType {_show(address_type)} is not one of {', '.join(_ADDRESS_TYPES)}")
    raw_endpoints = _list(obj, "endpoints", path="")
    if address_type == "FQDN":
        # Hostnames have no place in the model, and kube-proxy ignores FQDN slices: keep the slice only.
        endpoints: tuple[model.Endpoint, ...] = ()
    else:
        endpoints = tuple(
            _endpoint(_mapping_item(value, path=f"endpoints[{i}]"), path=f"endpoints[{i}]", address_type=address_type)
            for i, value in enumerate(raw_endpoints)
        )
    return model.EndpointSlice(
        namespace=_namespace_of(meta),
        name=meta["name"],
        service_name=service_name,
        address_type=address_type,
        endpoints=endpoints,
        ports=_endpoint_ports(obj),
        labels=labels,
    )


def _endpoint(raw: Mapping[str, Any], *, path: str, address_type: str) -> model.Endpoint:
    addresses = _list(raw, "addresses", path=path)
    if not addresses:
        raise _FieldError(f"{path}.addresses is missing: an endpoint needs at least one address")
    conditions = _mapping(raw, "conditions", path=path)
    hints = _mapping(raw, "hints", path=path)
    return model.Endpoint(
        addresses=tuple(
            _ip_of_family(value, path=f"{path}.addresses[{i}]", address_type=address_type)
            for i, value in enumerate(addresses)
        ),
        ready=_bool(conditions, "ready", path=f"{path}.conditions"),
        serving=_bool(conditions, "serving", path=f"{path}.conditions"),
        terminating=_bool(conditions, "terminating", path=f"{path}.conditions"),
        node_name=_string(raw, "nodeName", path=path),
        zone=_string(raw, "zone", path=path),
        hint_zones=_hint_names(hints, "forZones", path=f"{path}.hints"),
        hint_nodes=_hint_names(hints, "forNodes", path=f"{path}.hints"),
    )


def _ip_of_family(value: object, *, path: str, address_type: str) -> model.IPAddress:
    ip = _ip(value, path=path)
    if model.family_of(ip) != address_type:
        raise _FieldError(f"{path} {_show(value)} is not an {address_type} address (addressType is {address_type})")
    return ip


def _hint_names(hints: Mapping[str, Any], key: str, *, path: str) -> tuple[str, ...]:
    names: list[str] = []
    for i, value in enumerate(_list(hints, key, path=path)):
        entry = _mapping_item(value, path=f"{path}.{key}[{i}]")
        names.append(_required_string(entry, "name", path=f"{path}.{key}[{i}]"))
    return tuple(names)


def _endpoint_ports(obj: Mapping[str, Any]) -> tuple[model.EndpointPort, ...]:
    ports: list[model.EndpointPort] = []
    for i, value in enumerate(_list(obj, "ports", path="")):
        path = f"ports[{i}]"
        raw = _mapping_item(value, path=path)
        if raw.get("port") is None:
            # The API's "all ports" form: no Service port can resolve to it, so nothing to serve.
            continue
        ports.append(
            model.EndpointPort(
                name=_string(raw, "name", path=path) or "",
                protocol=_protocol(raw, path=path),
                port=_port(raw["port"], path=f"{path}.port"),
                app_protocol=_string(raw, "appProtocol", path=path),
            )
        )
    return tuple(ports)


# --- Node, Namespace, Pod --------------------------------------------------------------------


def _node(obj: Mapping[str, Any], meta: Mapping[str, Any]) -> model.Node:
    status = _mapping(obj, "status", path="")
    addresses: list[model.IPAddress] = []
    for i, value in enumerate(_list(status, "addresses", path="status")):
        path = f"status.addresses[{i}]"
        entry = _mapping_item(value, path=path)
        if _string(entry, "type", path=path) not in _NODE_ADDRESS_TYPES:
            continue  # Hostname, InternalDNS, ExternalDNS: not addresses a NodePort listens on
        ip = _ip(entry.get("address"), path=f"{path}.address")
        if ip not in addresses:
            addresses.append(ip)
    return model.Node(name=meta["name"], addresses=tuple(addresses), labels=_string_pairs(meta, "labels"),
                      deleting=_string(meta, "deletionTimestamp", path="metadata") is not None,
                      taints=_taint_keys(_mapping(obj, "spec", path="")))


def _taint_keys(spec: Mapping[str, Any]) -> tuple[str, ...]:
    keys: list[str] = []
    for i, value in enumerate(_list(spec, "taints", path="spec")):
        path = f"spec.taints[{i}]"
        keys.append(_required_string(_mapping_item(value, path=path), "key", path=path))
    return tuple(keys)


def _namespace(obj: Mapping[str, Any], meta: Mapping[str, Any]) -> model.Namespace:
    return model.Namespace(name=meta["name"], labels=_string_pairs(meta, "labels"))


def _pod(obj: Mapping[str, Any], meta: Mapping[str, Any]) -> model.Pod:
    spec = _mapping(obj, "spec", path="")
    status = _mapping(obj, "status", path="")
    return model.Pod(
        namespace=_namespace_of(meta),
        name=meta["name"],
        uid=_string(meta, "uid", path="metadata") or "",  # server-assigned: absent in a hand-written manifest
        node_name=_string(spec, "nodeName", path="spec") or None,
        ips=_pod_ips(status),
        labels=_string_pairs(meta, "labels"),
        annotations=_string_pairs(meta, "annotations"),
        qos_class=_string(status, "qosClass", path="status"),
        host_network=spec.get("hostNetwork") is True,
    )


def _pod_ips(status: Mapping[str, Any]) -> tuple[model.IPAddress, ...]:
    pod_ips = _list(status, "podIPs", path="status")
    if pod_ips:
        return tuple(
            _ip(_mapping_item(value, path=f"status.podIPs[{i}]").get("ip"), path=f"status.podIPs[{i}].ip")
            for i, value in enumerate(pod_ips)
        )
    pod_ip = _string(status, "podIP", path="status")
    return (_ip(pod_ip, path="status.podIP"),) if pod_ip else ()


_PARSERS: dict[str, tuple[str, Callable[[Mapping[str, Any], Mapping[str, Any]], model.KubeObject]]] = {
    "Service": ("v1", _service),
    "EndpointSlice": ("discovery.k8s.io/v1", _endpoint_slice),
    "Node": ("v1", _node),
    "Namespace": ("v1", _namespace),
    "Pod": ("v1", _pod),
}
_CLUSTER_SCOPED = frozenset({"Node", "Namespace"})


# --- the common shapes, read in one pass ------------------------------------------------------
#
# A start-up lists every Service and EndpointSlice of the cluster: 20k objects at 10k Services.
# The field readers below check one field per call and prepare every field's path for an error
# that almost never comes: about 25 us an object, and from JSON the whole document is decoded
# first, managedFields and all. Nearly every object has one of a few common shapes: well-formed,
# with no LoadBalancer status, session affinity or source ranges, and not ExternalName. msgspec
# reads those straight into the typed structs below (from JSON bytes, or from a decoded
# document), checking in C every type exactly as the readers check it and skipping the fields
# ctlb does not read; the `_from_common_*` functions add the checks a type cannot express and
# build the model value. Whatever does not fit (an uncommon shape or any malformed field) gets
# None, and the readers convert it or name its fault: the meaning of each field stays theirs.
# tests/unit/test_kubeobjects.py checks that both ways give the same values wherever this one
# answers, over every malformation its mutation tests make.


class _NotCommon(Exception):
    """The object is not of a shape the common pass vouches for: the field readers take it."""


class _Meta(msgspec.Struct):
    name: str
    namespace: str | None = None
    labels: dict[str, str] | None = None


class _ServicePort(msgspec.Struct, rename="camel"):
    port: int
    name: str | None = None
    protocol: model.Protocol | None = None
    target_port: int | str | None = None
    node_port: int | None = None
    app_protocol: str | None = None


class _ServiceSpec(msgspec.Struct, rename="camel"):
    type: model.ServiceType | None = None
    cluster_ip: str | None = msgspec.field(default=None, name="clusterIP")
    cluster_ips: list[str] | None = msgspec.field(default=None, name="clusterIPs")
    ip_families: list[model.IPFamily] | None = None
    ports: list[_ServicePort] | None = None
    external_ips: list[str] | None = msgspec.field(default=None, name="externalIPs")
    session_affinity: str | None = None
    load_balancer_source_ranges: list[object] | None = None
    external_traffic_policy: model.TrafficPolicy | None = None
    internal_traffic_policy: model.TrafficPolicy | None = None
    traffic_distribution: str | None = None
    health_check_node_port: int | None = None


class _LoadBalancerStatus(msgspec.Struct):
    ingress: list[object] | None = None


class _ServiceStatus(msgspec.Struct, rename="camel"):
    load_balancer: _LoadBalancerStatus | None = None


class _Typed(msgspec.Struct, rename="camel", kw_only=True):
    # A list item's own kind and apiVersion, when it has them, must be the list's: unset, not null.
    kind: str | msgspec.UnsetType = msgspec.UNSET
    api_version: str | msgspec.UnsetType = msgspec.UNSET


class _Service(_Typed, kw_only=True):
    metadata: _Meta
    spec: _ServiceSpec
    status: _ServiceStatus | None = None


class _Conditions(msgspec.Struct):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class _Hint(msgspec.Struct):
    name: str


class _Hints(msgspec.Struct, rename="camel"):
    for_zones: list[_Hint] | None = None
    for_nodes: list[_Hint] | None = None


class _Endpoint(msgspec.Struct, rename="camel"):
    addresses: list[str]
    conditions: _Conditions | None = None
    hints: _Hints | None = None
    node_name: str | None = None
    zone: str | None = None


class _EndpointPort(msgspec.Struct, rename="camel"):
    # Only read when the port is set: a portless entry (the API's "all ports") is skipped
    # unread, so one with, say, a numeric name is valid and left to the readers.
    port: int | None = None
    name: str | None = None
    protocol: model.Protocol | None = None
    app_protocol: str | None = None


class _EndpointSlice(_Typed, kw_only=True):
    metadata: _Meta
    address_type: str
    endpoints: list[_Endpoint] | None = None
    ports: list[_EndpointPort] | None = None


_NO_CONDITIONS = _Conditions()


def _from_common_service(value: _Service) -> model.Service:
    namespace, name, labels = _common_meta(value.metadata)
    spec = value.spec
    ingress = value.status.load_balancer.ingress if value.status and value.status.load_balancer else None
    if spec.type is model.ServiceType.EXTERNAL_NAME or spec.session_affinity not in (None, "None") \
            or spec.load_balancer_source_ranges or ingress:
        raise _NotCommon
    cluster_ips, headless = _common_cluster_ips(spec)
    ports = tuple([_from_common_service_port(port) for port in spec.ports or ()])
    if not ports and not headless:
        raise _NotCommon
    if len(ports) > 1 and (len({p.name for p in ports}) != len(ports)
                           or len({(p.port, p.protocol) for p in ports}) != len(ports)):
        raise _NotCommon  # a repeated name or port/protocol: the readers name it
    families = tuple(spec.ip_families or ()) or tuple(model.family_of(ip) for ip in cluster_ips)
    if len(set(families)) != len(families):
        raise _NotCommon
    return model.Service(
        namespace=namespace,
        name=name,
        type=spec.type or model.ServiceType.CLUSTER_IP,
        ports=ports,
        cluster_ips=cluster_ips,
        headless=headless,
        ip_families=families,
        external_ips=tuple([_ip(address, path="") for address in spec.external_ips]) if spec.external_ips else (),
        external_traffic_policy=spec.external_traffic_policy or model.TrafficPolicy.CLUSTER,
        internal_traffic_policy=spec.internal_traffic_policy or model.TrafficPolicy.CLUSTER,
        traffic_distribution=spec.traffic_distribution,
        labels=labels,
        health_check_node_port=_common_node_port(spec.health_check_node_port),
    )


def _common_meta(meta: _Meta) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    if not meta.name:
        raise _NotCommon
    labels = tuple(sorted(meta.labels.items())) if meta.labels else ()
    return meta.namespace or DEFAULT_NAMESPACE, meta.name, labels


def _common_cluster_ips(spec: _ServiceSpec) -> tuple[tuple[model.IPAddress, ...], bool]:
    """As `_cluster_ips`, for a Service whose clusterIP and clusterIPs agree."""
    single = spec.cluster_ip
    raw = spec.cluster_ips or ([single] if single else [])
    if single and single != raw[0]:
        raise _NotCommon
    if raw == ["None"]:
        return (), True
    if len(raw) > 2 or "None" in raw:
        raise _NotCommon
    ips = tuple([_ip(address, path="") for address in raw])
    if len(ips) == 2 and ips[0].version == ips[1].version:
        raise _NotCommon
    return ips, False


def _from_common_service_port(value: _ServicePort) -> model.ServicePort:
    port = _common_port(value.port)
    target = value.target_port
    if target is None or target == 0 or target == "":
        target = port
    elif isinstance(target, str):
        if not _is_port_name(target):
            raise _NotCommon
    else:
        target = _common_port(target)
    node_port = value.node_port
    return model.ServicePort(
        name=value.name or "",
        protocol=value.protocol or model.Protocol.TCP,
        port=port,
        target_port=target,
        node_port=None if node_port is None or node_port == 0 else _common_port(node_port),
        app_protocol=value.app_protocol,
    )


def _common_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise _NotCommon
    return value


def _common_node_port(value: int | None) -> int | None:
    # As `_node_port`: 0 is how the API spells "not allocated".
    return None if value is None or value == 0 else _common_port(value)


def _from_common_endpoint_slice(value: _EndpointSlice) -> model.EndpointSlice:
    namespace, name, labels = _common_meta(value.metadata)
    service_name = value.metadata.labels.get(SERVICE_NAME_LABEL) if value.metadata.labels else None
    version = _ADDRESS_VERSIONS.get(value.address_type)  # FQDN slices go to the readers
    if not service_name or version is None:
        raise _NotCommon
    return model.EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=service_name,
        address_type=value.address_type,
        endpoints=tuple([_from_common_endpoint(endpoint, version=version) for endpoint in value.endpoints or ()]),
        ports=tuple([model.EndpointPort(name=port.name or "", protocol=port.protocol or model.Protocol.TCP,
                                        port=_common_port(port.port), app_protocol=port.app_protocol)
                     for port in value.ports or () if port.port is not None]),
        labels=labels,
    )


_ADDRESS_VERSIONS = {"IPv4": 4, "IPv6": 6}


def _from_common_endpoint(value: _Endpoint, *, version: int) -> model.Endpoint:
    conditions = value.conditions or _NO_CONDITIONS
    hints = value.hints
    return model.Endpoint(
        addresses=_common_addresses(value.addresses, version=version),
        ready=conditions.ready,
        serving=conditions.serving,
        terminating=conditions.terminating,
        node_name=value.node_name,
        zone=value.zone,
        hint_zones=tuple([hint.name for hint in hints.for_zones]) if hints and hints.for_zones else (),
        hint_nodes=tuple([hint.name for hint in hints.for_nodes]) if hints and hints.for_nodes else (),
    )


def _common_addresses(addresses: list[str], *, version: int) -> tuple[model.IPAddress, ...]:
    """The addresses of an endpoint, all of the slice's family (at least one)."""
    if not addresses:
        raise _NotCommon
    if version == 4:
        # What `_ip` accepts first, without its fallbacks: 40k endpoint addresses at 10k Services.
        try:
            return tuple([ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, a)) for a in addresses])
        except OSError:
            raise _NotCommon from None
    parsed = tuple([_ip(address, path="") for address in addresses])
    if any(address.version != version for address in parsed):
        raise _NotCommon
    return parsed


@dataclass(frozen=True, slots=True)
class _CommonShape:
    shape: type[_Service] | type[_EndpointSlice]
    convert: Callable[[Any], model.KubeObject]
    json: msgspec.json.Decoder[Any]


_COMMON: dict[tuple[str, str], _CommonShape] = {
    ("Service", "v1"): _CommonShape(_Service, _from_common_service, msgspec.json.Decoder(_Service)),
    ("EndpointSlice", "discovery.k8s.io/v1"): _CommonShape(
        _EndpointSlice, _from_common_endpoint_slice, msgspec.json.Decoder(_EndpointSlice)),
}


def _parse_common(obj: object) -> model.KubeObject | None:
    """A decoded Service or EndpointSlice of a common shape, converted; None for anything else."""
    if type(obj) is not dict:
        return None
    kind, api_version = obj.get("kind"), obj.get("apiVersion")
    common = _COMMON.get((kind, api_version)) if type(kind) is str and type(api_version) is str else None
    if common is None:
        return None
    try:
        return common.convert(msgspec.convert(obj, common.shape))
    except (msgspec.ValidationError, _NotCommon, _FieldError):
        return None


def parse_json_common(data: bytes | msgspec.Raw, *, kind: str, api_version: str) -> model.KubeObject | None:
    """Converts one object straight from its JSON, when it has a common shape.

    For list items, which come without kind and apiVersion: the list says what they are.

    Args:
        data: the JSON text of one object.
        kind: its kind.
        api_version: its apiVersion.

    Returns:
        The model value; None when the object is not of a common shape (or not valid): decode it
        and `parse` it then, which converts it or names what is wrong.
    """
    common = _COMMON.get((kind, api_version))
    if common is None:
        return None
    try:
        value = common.json.decode(data)
        if value.kind not in (msgspec.UNSET, kind) or value.api_version not in (msgspec.UNSET, api_version):
            return None
        return common.convert(value)
    except (msgspec.DecodeError, _NotCommon, _FieldError):
        return None


# --- field readers: each checks the type before use and names the field when it is wrong ------


def _namespace_of(meta: Mapping[str, Any]) -> str:
    # kubectl apply puts an object without a namespace into "default"; so do we.
    return _string(meta, "namespace", path="metadata") or DEFAULT_NAMESPACE


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _mapping(parent: Mapping[str, Any], key: str, *, path: str, required: bool = False) -> Mapping[str, Any]:
    value = parent.get(key)
    if value is None:
        if required:
            raise _FieldError(f"{_join(path, key)} is missing")
        return {}
    return _mapping_item(value, path=_join(path, key))


def _mapping_item(value: object, *, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _FieldError(f"{path} is {_type_name(value)}, not a mapping")
    return value


def _list(parent: Mapping[str, Any], key: str, *, path: str) -> list[Any]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _FieldError(f"{_join(path, key)} is {_type_name(value)}, not a list")
    return value


def _string(parent: Mapping[str, Any], key: str, *, path: str) -> str | None:
    value = parent.get(key)
    if value is None:
        return None
    return _string_item(value, path=_join(path, key))


def _required_string(parent: Mapping[str, Any], key: str, *, path: str) -> str:
    return _string_item(parent.get(key), path=_join(path, key))


def _string_item(value: object, *, path: str) -> str:
    if value is None:
        raise _FieldError(f"{path} is missing")
    if not isinstance(value, str):
        raise _FieldError(f"{path} {_show(value)} is {_type_name(value)}, not a string")
    return value


def _bool(parent: Mapping[str, Any], key: str, *, path: str) -> bool | None:
    value = parent.get(key)
    if value is not None and not isinstance(value, bool):
        raise _FieldError(f"{_join(path, key)} {_show(value)} is not true or false")
    return value


def _int_in_range(value: object, *, path: str, low: int, high: int) -> int:
    # bool is an int in Python; `true` is never a number in the API.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _FieldError(f"{path} {_show(value)} is not an integer")
    if not low <= value <= high:
        raise _FieldError(f"{path} {value} is out of range {low}..{high}")
    return value


def _port(value: object, *, path: str) -> int:
    if value is None:
        raise _FieldError(f"{path} is missing")
    return _int_in_range(value, path=path, low=1, high=65535)


def _protocol(parent: Mapping[str, Any], *, path: str) -> model.Protocol:
    return _enum(parent, "protocol", path=path, choices=model.Protocol, default=model.Protocol.TCP)


def _enum(parent: Mapping[str, Any], key: str, *, path: str, choices: type[_E], default: _E) -> _E:
    value = parent.get(key)
    if value is None:
        return default
    return _enum_value(value, path=_join(path, key), choices=choices)


def _enum_value(value: object, *, path: str, choices: type[_E]) -> _E:
    text = _string_item(value, path=path)
    try:
        return choices(text)
    except ValueError:
        allowed = ", ".join(member.value for member in choices)
        raise _FieldError(f"{path} {_show(value)} is not one of {allowed}") from None


def _ip(value: object, *, path: str) -> model.IPAddress:
    if value is None:
        raise _FieldError(f"{path} is missing")
    # ip_address() would take an int as a packed address: only text is an address in the API.
    if isinstance(value, str):
        try:
            # inet_pton reads dotted quads as strictly as ipaddress does, in C: a 10k-Service
            # list holds 50k addresses.
            return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, value))
        except OSError:
            pass
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            ip = None
        # A zone ("fe80::1%eth0") is local to one host, and the API rejects it too.
        if ip is not None and not getattr(ip, "scope_id", None):
            return ip
    raise _FieldError(f"{path} {_show(value)} is not an IP address")


def _ip_list(parent: Mapping[str, Any], key: str, *, path: str) -> tuple[model.IPAddress, ...]:
    field = _join(path, key)
    return tuple(_ip(value, path=f"{field}[{i}]") for i, value in enumerate(_list(parent, key, path=path)))


def _string_pairs(meta: Mapping[str, Any], key: str) -> tuple[tuple[str, str], ...]:
    """Labels or annotations as sorted (key, value) pairs, so equal maps give equal values."""
    raw = _mapping(meta, key, path="metadata")
    pairs: list[tuple[str, str]] = []
    for name, value in raw.items():
        if not isinstance(name, str):
            raise _FieldError(f"metadata.{key} key {_show(name)} is {_type_name(name)}, not a string")
        pairs.append((name, _string_item(value, path=f"metadata.{key}[{_show(name)}]")))
    return tuple(sorted(pairs))


def _show(value: object) -> str:
    """Render a value as the user wrote it: strings quoted, numbers bare."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _type_name(value: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    if value is None:
        return "null"
    for kind, name in names.items():
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return name
    return f"a {type(value).__name__}"
