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
            external_ips: Sequence[str] = (), lb_ips: Sequence[str] = ()) -> dict[str, Any]:
    families = ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips]
    spec: dict[str, Any] = {
        "clusterIP": cluster_ips[0],
        "clusterIPs": list(cluster_ips),
        "internalTrafficPolicy": "Cluster",
        "ipFamilies": families,
        "ipFamilyPolicy": "PreferDualStack" if len(families) > 1 else "SingleStack",
        "ports": [{"protocol": "TCP", **p} for p in ports],
        "sessionAffinity": "None",
        "type": type,
    }
    if type in ("NodePort", "LoadBalancer"):
        spec["externalTrafficPolicy"] = "Cluster"
    if affinity_timeout is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    if external_ips:
        spec["externalIPs"] = list(external_ips)
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


def node(name: str, *, addresses: Sequence[str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": _meta(name, None, {"kubernetes.io/hostname": name}),
        "spec": {},
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]
                   + [{"type": "Hostname", "address": name}]},
    }
