"""Kubernetes objects in the exact shape `kubectl get -o yaml` prints them, for test manifests."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from typing import Any

_rv = itertools.count(1000)


def _meta(name: str, namespace: str | None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "uid": str(uuid.uuid4()),
        "resourceVersion": str(next(_rv)),
        "creationTimestamp": "2026-11-21T06:00:00Z",
    }
    if namespace is not None:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = labels
    return meta


def service(name: str, *, cluster_ips: Sequence[str], ports: Sequence[dict[str, Any]],
            namespace: str = "default", type: str = "ClusterIP", affinity_timeout: int | None = None,
            external_ips: Sequence[str] = (), lb_ips: Sequence[str] = (),
            internal_policy: str = "Cluster", external_policy: str = "Cluster",
            source_ranges: Sequence[str] = (), health_check_node_port: int | None = None) -> dict[str, Any]:
    families = ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips]
    spec: dict[str, Any] = {
        "clusterIP": cluster_ips[0],
        "clusterIPs": list(cluster_ips),
        "internalTrafficPolicy": internal_policy,
        "ipFamilies": families,
        "ipFamilyPolicy": "PreferDualStack" if len(families) > 1 else "SingleStack",
        "ports": [{"protocol": "TCP", **p} for p in ports],
        "sessionAffinity": "None",
        "type": type,
    }
    if type in ("NodePort", "LoadBalancer"):
        spec["externalTrafficPolicy"] = external_policy
    if health_check_node_port is not None:
        spec["healthCheckNodePort"] = health_check_node_port
    if affinity_timeout is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if source_ranges:
        spec["loadBalancerSourceRanges"] = list(source_ranges)
    status: dict[str, Any] = {"loadBalancer": {}}
    if lb_ips:
        status["loadBalancer"] = {"ingress": [{"ip": ip, "ipMode": "VIP"} for ip in lb_ips]}
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, namespace), "spec": spec,
            "status": status}


def endpoint_slice(service_name: str, *, addresses: Sequence[str], ports: Sequence[dict[str, Any]],
                   namespace: str = "default", suffix: str = "abcde", not_ready: Sequence[str] = (),
                   node: str = "lab-node") -> dict[str, Any]:
    family = "IPv6" if addresses and ":" in addresses[0] else "IPv4"
    labels = {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
              "kubernetes.io/service-name": service_name}
    endpoints = [{
        "addresses": [a],
        "conditions": {"ready": a not in not_ready, "serving": a not in not_ready, "terminating": False},
        "nodeName": node,
        "targetRef": {"kind": "Pod", "name": f"{service_name}-{i}", "namespace": namespace},
    } for i, a in enumerate(addresses)]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": _meta(f"{service_name}-{suffix}", namespace, labels),
        "addressType": family,
        "endpoints": endpoints,
        "ports": [{"protocol": "TCP", **p} for p in ports],
    }


def endpoint(address: str, *, ready: bool | None = True, serving: bool | None = None,
             terminating: bool | None = None, node: str = "lab-node", zone: str | None = None,
             hint_zones: Sequence[str] = (), hint_nodes: Sequence[str] = ()) -> dict[str, Any]:
    """One endpoint of a slice; None leaves a condition unset, as the API may."""
    conditions = {key: value for key, value in (("ready", ready), ("serving", serving),
                                                ("terminating", terminating)) if value is not None}
    out: dict[str, Any] = {"addresses": [address], "conditions": conditions, "nodeName": node}
    if zone is not None:
        out["zone"] = zone
    hints: dict[str, Any] = {}
    if hint_zones:
        hints["forZones"] = [{"name": z} for z in hint_zones]
    if hint_nodes:
        hints["forNodes"] = [{"name": n} for n in hint_nodes]
    if hints:
        out["hints"] = hints
    return out


def slice_of(service_name: str, endpoints: Sequence[dict[str, Any]], *, ports: Sequence[dict[str, Any]],
             namespace: str = "default", suffix: str = "abcde", family: str = "IPv4") -> dict[str, Any]:
    """An EndpointSlice of endpoints built with `endpoint`."""
    labels = {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
              "kubernetes.io/service-name": service_name}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": _meta(f"{service_name}-{suffix}", namespace, labels), "addressType": family,
            "endpoints": list(endpoints), "ports": [{"protocol": "TCP", **p} for p in ports]}


def node(name: str, *, addresses: Sequence[str], labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": _meta(name, None, {"kubernetes.io/hostname": name, **(labels or {})}),
        "spec": {},
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]
                   + [{"type": "Hostname", "address": name}]},
    }


def namespace(name: str, *, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(name, None, labels),
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def pod(name: str, *, uid: str, ips: Sequence[str], namespace: str = "default", node: str = "lab-node",
        annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A running pod of a lab: `uid` must be the lab pod's, whose cgroup kubelet named after it."""
    meta = _meta(name, namespace, labels)
    meta["uid"] = uid
    if annotations:
        meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}], "nodeName": node},
        "status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips],
                   "qosClass": "BestEffort"},
    }
