"""Converting API objects (as `kubectl get -o yaml` prints them) to model values, and rejecting bad ones."""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from ctlb import errors, kubeobjects, model

SERVICE = """
apiVersion: v1
kind: Service
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"shop"}}
  creationTimestamp: "2024-05-02T10:11:12Z"
  labels:
    app.kubernetes.io/name: web
    app.kubernetes.io/component: frontend
  name: web
  namespace: shop
  resourceVersion: "48213"
  uid: 6f1d2b1e-9a7c-4d33-8d0e-2c5b7e1f4a10
spec:
  clusterIP: 10.96.12.34
  clusterIPs:
  - 10.96.12.34
  internalTrafficPolicy: Cluster
  ipFamilies:
  - IPv4
  ipFamilyPolicy: SingleStack
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: http
  - name: metrics
    port: 9090
    protocol: TCP
    targetPort: 9090
  selector:
    app.kubernetes.io/name: web
  sessionAffinity: None
  type: ClusterIP
status:
  loadBalancer: {}
"""

LOAD_BALANCER_SERVICE = """
apiVersion: v1
kind: Service
metadata:
  creationTimestamp: "2024-05-02T10:11:12Z"
  name: ingress
  namespace: edge
  resourceVersion: "50117"
  uid: 0c4e7a52-1d55-4b8e-9f5a-7d4e2b1c3a99
spec:
  allocateLoadBalancerNodePorts: true
  clusterIP: 10.96.200.7
  clusterIPs:
  - 10.96.200.7
  - fd00:10:96::c8
  externalIPs:
  - 192.0.2.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 31999
  internalTrafficPolicy: Local
  ipFamilies:
  - IPv4
  - IPv6
  ipFamilyPolicy: PreferDualStack
  loadBalancerSourceRanges:
  - 203.0.113.0/24
  - " 2001:db8::/32 "
  ports:
  - name: https
    nodePort: 30443
    port: 443
    protocol: TCP
    targetPort: 8443
  - name: dns
    nodePort: 30053
    port: 53
    protocol: UDP
    targetPort: dns
  selector:
    app: ingress
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 600
  trafficDistribution: PreferClose
  type: LoadBalancer
status:
  loadBalancer:
    ingress:
    - ip: 198.51.100.7
      ipMode: VIP
    - ip: 198.51.100.8
      ipMode: Proxy
    - hostname: a1b2c3.elb.example.com
    - ip: 2001:db8::7
"""

ENDPOINT_SLICE = """
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses:
  - 10.244.1.5
  conditions:
    ready: true
    serving: true
    terminating: false
  hints:
    forZones:
    - name: zone-a
  nodeName: node-1
  targetRef:
    kind: Pod
    name: web-7c9d8b5f4-abcde
    namespace: shop
    uid: 2b7e1f4a-6f1d-4d33-9a7c-8d0e2c5b7e10
  zone: zone-a
- addresses:
  - 10.244.2.9
  conditions:
    ready: false
    serving: false
    terminating: true
  nodeName: node-2
  targetRef:
    kind: Pod
    name: web-7c9d8b5f4-fghij
    namespace: shop
    uid: 9a7c2b7e-6f1d-4d33-8d0e-2c5b7e1f4a10
  zone: zone-b
kind: EndpointSlice
metadata:
  annotations:
    endpoints.kubernetes.io/last-change-trigger-time: "2024-05-02T10:12:40Z"
  creationTimestamp: "2024-05-02T10:11:12Z"
  generateName: web-
  generation: 7
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: web
  name: web-x7k2p
  namespace: shop
  ownerReferences:
  - apiVersion: v1
    blockOwnerDeletion: true
    controller: true
    kind: Service
    name: web
    uid: 6f1d2b1e-9a7c-4d33-8d0e-2c5b7e1f4a10
  resourceVersion: "48377"
  uid: 1d55c4e7-4b8e-9f5a-7d4e-2b1c3a990c4e
ports:
- name: http
  port: 8080
  protocol: TCP
- name: metrics
  port: 9090
  protocol: TCP
"""

NODE = """
apiVersion: v1
kind: Node
metadata:
  annotations:
    node.alpha.kubernetes.io/ttl: "0"
  creationTimestamp: "2024-05-01T08:00:00Z"
  labels:
    kubernetes.io/hostname: node-1
    kubernetes.io/os: linux
    topology.kubernetes.io/zone: zone-a
  name: node-1
  resourceVersion: "51002"
  uid: 7d4e2b1c-3a99-0c4e-7a52-1d554b8e9f5a
spec:
  podCIDR: 10.244.1.0/24
  podCIDRs:
  - 10.244.1.0/24
  taints:
  - effect: NoSchedule
    key: node-role.kubernetes.io/control-plane
status:
  addresses:
  - address: 172.18.0.3
    type: InternalIP
  - address: fc00:f853:ccd:e793::3
    type: InternalIP
  - address: 203.0.113.30
    type: ExternalIP
  - address: node-1
    type: Hostname
  conditions:
  - lastHeartbeatTime: "2024-05-02T10:00:00Z"
    lastTransitionTime: "2024-05-01T08:00:30Z"
    message: kubelet is posting ready status
    reason: KubeletReady
    status: "True"
    type: Ready
"""

NAMESPACE = """
apiVersion: v1
kind: Namespace
metadata:
  creationTimestamp: "2024-05-01T08:00:00Z"
  labels:
    istio-injection: enabled
    kubernetes.io/metadata.name: shop
  name: shop
  resourceVersion: "512"
  uid: 4b8e9f5a-7d4e-2b1c-3a99-0c4e7a521d55
spec:
  finalizers:
  - kubernetes
status:
  phase: Active
"""

POD = """
apiVersion: v1
kind: Pod
metadata:
  annotations:
    kubectl.kubernetes.io/default-container: web
  creationTimestamp: "2024-05-02T10:11:20Z"
  generateName: web-7c9d8b5f4-
  labels:
    app.kubernetes.io/name: web
    pod-template-hash: 7c9d8b5f4
  name: web-7c9d8b5f4-abcde
  namespace: shop
  resourceVersion: "48370"
  uid: 2b7e1f4a-6f1d-4d33-9a7c-8d0e2c5b7e10
spec:
  containers:
  - image: nginx:1.25
    name: web
    ports:
    - containerPort: 8080
      name: http
      protocol: TCP
  nodeName: node-1
status:
  phase: Running
  podIP: 10.244.1.5
  podIPs:
  - ip: 10.244.1.5
  - ip: fd00:10:244:1::5
  qosClass: BestEffort
"""

_DELETE = object()


def _load(text: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def _with(text: str, changes: dict[str, Any]) -> dict[str, Any]:
    """The object in `text` with each dotted path (`spec.ports[0].port`) set, or removed with _DELETE."""
    obj = _load(text)
    for path, value in changes.items():
        *parents, last = _path_parts(path)
        target: Any = obj
        for part in parents:
            target = target[part]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return obj


def _parse_service(obj: dict[str, Any]) -> model.Service:
    parsed = kubeobjects.parse(obj)
    assert isinstance(parsed, model.Service)
    return parsed


def _parse_slice(obj: dict[str, Any]) -> model.EndpointSlice:
    parsed = kubeobjects.parse(obj)
    assert isinstance(parsed, model.EndpointSlice)
    return parsed


def _parse_pod(obj: dict[str, Any]) -> model.Pod:
    parsed = kubeobjects.parse(obj)
    assert isinstance(parsed, model.Pod)
    return parsed


def _path_parts(path: str) -> list[str | int]:
    return [int(index) if index else key for key, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path)]


def _ip(text: str) -> model.IPAddress:
    return ipaddress.ip_address(text)


# --- expand ----------------------------------------------------------------------------------


def test_expand_returns_a_plain_object_as_a_one_item_list() -> None:
    service = _load(SERVICE)

    assert kubeobjects.expand(service) == [service]


def test_expand_flattens_kubectl_list_output() -> None:
    listing = {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
               "items": [_load(SERVICE), _load(ENDPOINT_SLICE)]}

    assert kubeobjects.expand(listing) == [_load(SERVICE), _load(ENDPOINT_SLICE)]


@pytest.mark.parametrize(
    ("list_kind", "api_version", "item", "expected_kind"),
    [
        ("ServiceList", "v1", SERVICE, "Service"),
        ("EndpointSliceList", "discovery.k8s.io/v1", ENDPOINT_SLICE, "EndpointSlice"),
        ("NodeList", "v1", NODE, "Node"),
    ],
    ids=["service-list", "endpoint-slice-list", "node-list"],
)
def test_expand_fills_kind_and_api_version_of_typed_list_items(
    list_kind: str, api_version: str, item: str, expected_kind: str
) -> None:
    bare = _with(item, {"kind": _DELETE, "apiVersion": _DELETE})
    listing = {"apiVersion": api_version, "kind": list_kind, "metadata": {"resourceVersion": "1"}, "items": [bare]}

    (expanded,) = kubeobjects.expand(listing)

    assert (expanded["kind"], expanded["apiVersion"]) == (expected_kind, api_version)
    assert kubeobjects.parse(expanded).ref.kind == expected_kind


def test_expand_gives_nothing_for_a_list_without_items() -> None:
    assert kubeobjects.expand({"apiVersion": "v1", "kind": "List", "items": None}) == []


def test_expand_rejects_items_that_are_not_a_list() -> None:
    with pytest.raises(errors.InvalidObject) as raised:
        kubeobjects.expand({"apiVersion": "v1", "kind": "ServiceList", "items": {"a": 1}})

    assert raised.value.ref == "ServiceList"
    assert "items" in raised.value.reason


# --- Service ---------------------------------------------------------------------------------


def test_service_in_kubectl_shape_is_converted_field_by_field() -> None:
    assert kubeobjects.parse(_load(SERVICE)) == model.Service(
        namespace="shop",
        name="web",
        type=model.ServiceType.CLUSTER_IP,
        ports=(
            model.ServicePort(name="http", protocol=model.Protocol.TCP, port=80, target_port="http"),
            model.ServicePort(name="metrics", protocol=model.Protocol.TCP, port=9090, target_port=9090),
        ),
        cluster_ips=(_ip("10.96.12.34"),),
        ip_families=(model.IPFamily.IPv4,),
        labels=(("app.kubernetes.io/component", "frontend"), ("app.kubernetes.io/name", "web")),
    )


def test_dual_stack_load_balancer_service_is_converted_field_by_field() -> None:
    assert kubeobjects.parse(_load(LOAD_BALANCER_SERVICE)) == model.Service(
        namespace="edge",
        name="ingress",
        type=model.ServiceType.LOAD_BALANCER,
        ports=(
            model.ServicePort(name="https", protocol=model.Protocol.TCP, port=443, target_port=8443, node_port=30443),
            model.ServicePort(name="dns", protocol=model.Protocol.UDP, port=53, target_port="dns", node_port=30053),
        ),
        cluster_ips=(_ip("10.96.200.7"), _ip("fd00:10:96::c8")),
        ip_families=(model.IPFamily.IPv4, model.IPFamily.IPv6),
        external_ips=(_ip("192.0.2.10"),),
        load_balancer_ingress=(
            model.LoadBalancerIngress(_ip("198.51.100.7"), "VIP"),
            model.LoadBalancerIngress(_ip("198.51.100.8"), "Proxy"),
            model.LoadBalancerIngress(_ip("2001:db8::7"), None),
        ),
        affinity_timeout=600,
        external_traffic_policy=model.TrafficPolicy.LOCAL,
        internal_traffic_policy=model.TrafficPolicy.LOCAL,
        load_balancer_source_ranges=(ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8::/32")),
        traffic_distribution="PreferClose",
        health_check_node_port=31999,
    )


@pytest.mark.parametrize(("value", "expected"), [(31999, 31999), (0, None), (None, None)],
                         ids=["allocated", "zero-is-unallocated", "unset"])
def test_health_check_node_port_is_kept_as_given(value: int | None, expected: int | None) -> None:
    # Either way in: the field readers (a Service with LB ingress) and the common pass (without).
    with_ingress = _parse_service(_with(LOAD_BALANCER_SERVICE, {"spec.healthCheckNodePort": value}))
    pending = _load(_COMMON_SHAPES["pending-load-balancer-service"])
    pending["spec"]["healthCheckNodePort"] = value
    common = kubeobjects._parse_common(pending)

    assert isinstance(common, model.Service)
    assert (with_ingress.health_check_node_port, common.health_check_node_port) == (expected, expected)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"spec.clusterIP": _DELETE}, (_ip("10.96.12.34"),)),
        ({"spec.clusterIP": ""}, (_ip("10.96.12.34"),)),
        ({"spec.clusterIPs": _DELETE}, (_ip("10.96.12.34"),)),
        ({"spec.clusterIPs": []}, (_ip("10.96.12.34"),)),
        ({"spec.clusterIP": _DELETE, "spec.clusterIPs": _DELETE}, ()),
    ],
    ids=["clusterIPs-only", "clusterIP-empty", "clusterIP-only", "clusterIPs-empty-list", "neither-not-allocated"],
)
def test_service_cluster_ips_come_from_cluster_ips_then_cluster_ip(
    changes: dict[str, Any], expected: tuple[model.IPAddress, ...]
) -> None:
    service = _parse_service(_with(SERVICE, changes))

    assert (service.cluster_ips, service.headless) == (expected, False)


@pytest.mark.parametrize(
    "changes",
    [
        {"spec.clusterIP": "None", "spec.clusterIPs": ["None"]},
        {"spec.clusterIP": "None", "spec.clusterIPs": _DELETE},
        {"spec.clusterIP": _DELETE, "spec.clusterIPs": ["None"]},
        {"spec.clusterIP": "None", "spec.clusterIPs": ["None"], "spec.ports": _DELETE},
    ],
    ids=["both", "clusterIP-only", "clusterIPs-only", "without-ports"],
)
def test_service_with_cluster_ip_none_is_headless(changes: dict[str, Any]) -> None:
    service = _parse_service(_with(SERVICE, changes))

    assert (service.headless, service.cluster_ips) == (True, ())


def test_external_name_service_is_kept_without_cluster_ips() -> None:
    obj = _with(SERVICE, {"spec.type": "ExternalName", "spec.externalName": "db.example.com",
                          "spec.clusterIP": _DELETE, "spec.clusterIPs": _DELETE})

    service = _parse_service(obj)

    assert (service.type, service.cluster_ips, service.headless) == (model.ServiceType.EXTERNAL_NAME, (), False)


def test_service_type_defaults_to_cluster_ip() -> None:
    assert _parse_service(_with(SERVICE, {"spec.type": _DELETE})).type is model.ServiceType.CLUSTER_IP


@pytest.mark.parametrize(
    ("port_changes", "expected"),
    [
        ({"protocol": _DELETE},
         model.ServicePort(name="http", protocol=model.Protocol.TCP, port=80, target_port="http")),
        ({"targetPort": _DELETE}, model.ServicePort(name="http", protocol=model.Protocol.TCP, port=80, target_port=80)),
        ({"targetPort": 0}, model.ServicePort(name="http", protocol=model.Protocol.TCP, port=80, target_port=80)),
        ({"targetPort": 8080}, model.ServicePort(name="http", protocol=model.Protocol.TCP, port=80, target_port=8080)),
        ({"name": _DELETE}, model.ServicePort(name="", protocol=model.Protocol.TCP, port=80, target_port="http")),
        ({"protocol": "SCTP"},
         model.ServicePort(name="http", protocol=model.Protocol.SCTP, port=80, target_port="http")),
        ({"appProtocol": "kubernetes.io/h2c"},
         model.ServicePort(name="http", protocol=model.Protocol.TCP, port=80, target_port="http",
                           app_protocol="kubernetes.io/h2c")),
        ({"nodePort": 0}, model.ServicePort(name="http", protocol=model.Protocol.TCP, port=80, target_port="http")),
    ],
    ids=["protocol-defaults-to-tcp", "target-port-defaults-to-port", "target-port-0-means-port",
         "target-port-number", "unnamed-port-is-empty-name", "sctp", "app-protocol", "node-port-0-is-unset"],
)
def test_service_port_defaults_and_forms(port_changes: dict[str, Any], expected: model.ServicePort) -> None:
    changes = {"spec.ports[1]": _DELETE} | {f"spec.ports[0].{key}": value for key, value in port_changes.items()}

    assert _parse_service(_with(SERVICE, changes)).ports == (expected,)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"spec.sessionAffinity": "None"}, None),
        ({"spec.sessionAffinity": _DELETE}, None),
        ({"spec.sessionAffinity": "ClientIP"}, 10800),
        ({"spec.sessionAffinity": "ClientIP", "spec.sessionAffinityConfig": {"clientIP": {}}}, 10800),
        ({"spec.sessionAffinity": "ClientIP", "spec.sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}}},
         86400),
        ({"spec.sessionAffinity": "None", "spec.sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 30}}}, None),
    ],
    ids=["none", "unset", "client-ip-default-timeout", "client-ip-empty-config", "client-ip-max-timeout",
         "config-without-client-ip-affinity"],
)
def test_service_affinity_timeout_follows_session_affinity(changes: dict[str, Any], expected: int | None) -> None:
    assert _parse_service(_with(SERVICE, changes)).affinity_timeout == expected


def test_service_traffic_policies_default_to_cluster() -> None:
    service = _parse_service(_with(SERVICE, {"spec.internalTrafficPolicy": _DELETE}))

    assert (service.external_traffic_policy, service.internal_traffic_policy) == (
        model.TrafficPolicy.CLUSTER, model.TrafficPolicy.CLUSTER)


def test_service_ip_families_default_to_those_of_cluster_ips() -> None:
    obj = _with(LOAD_BALANCER_SERVICE, {"spec.ipFamilies": _DELETE})

    assert _parse_service(obj).ip_families == (model.IPFamily.IPv4, model.IPFamily.IPv6)


def test_load_balancer_ingress_with_only_a_hostname_is_skipped() -> None:
    obj = _with(LOAD_BALANCER_SERVICE, {"status.loadBalancer.ingress": [{"hostname": "lb.example.com"}]})

    assert _parse_service(obj).load_balancer_ingress == ()


@pytest.mark.parametrize(
    ("kind", "text"),
    [("Service", SERVICE), ("EndpointSlice", ENDPOINT_SLICE), ("Pod", POD)],
    ids=["service", "endpoint-slice", "pod"],
)
def test_namespaced_object_without_namespace_is_in_default(kind: str, text: str) -> None:
    obj = kubeobjects.parse(_with(text, {"metadata.namespace": _DELETE}))

    assert obj.ref.namespace == "default"


# --- EndpointSlice ---------------------------------------------------------------------------


def test_endpoint_slice_in_kubectl_shape_is_converted_field_by_field() -> None:
    assert kubeobjects.parse(_load(ENDPOINT_SLICE)) == model.EndpointSlice(
        namespace="shop",
        name="web-x7k2p",
        service_name="web",
        address_type="IPv4",
        endpoints=(
            model.Endpoint(addresses=(_ip("10.244.1.5"),), ready=True, serving=True, terminating=False,
                           node_name="node-1", zone="zone-a", hint_zones=("zone-a",)),
            model.Endpoint(addresses=(_ip("10.244.2.9"),), ready=False, serving=False, terminating=True,
                           node_name="node-2", zone="zone-b"),
        ),
        ports=(
            model.EndpointPort(name="http", protocol=model.Protocol.TCP, port=8080),
            model.EndpointPort(name="metrics", protocol=model.Protocol.TCP, port=9090),
        ),
        labels=(("endpointslice.kubernetes.io/managed-by", "endpointslice-controller.k8s.io"),
                ("kubernetes.io/service-name", "web")),
    )


def test_endpoint_conditions_left_unset_are_none() -> None:
    obj = _with(ENDPOINT_SLICE, {"endpoints[0].conditions": {}})

    endpoint = _parse_slice(obj).endpoints[0]

    assert (endpoint.ready, endpoint.serving, endpoint.terminating) == (None, None, None)


def test_endpoint_hints_for_nodes_are_kept() -> None:
    obj = _with(ENDPOINT_SLICE, {"endpoints[0].hints": {"forZones": [{"name": "zone-a"}],
                                                        "forNodes": [{"name": "node-1"}, {"name": "node-3"}]}})

    endpoint = _parse_slice(obj).endpoints[0]

    assert (endpoint.hint_zones, endpoint.hint_nodes) == (("zone-a",), ("node-1", "node-3"))


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ({"name": "", "port": 8080, "protocol": "TCP"}, (model.EndpointPort("", model.Protocol.TCP, 8080),)),
        ({"name": None, "port": 8080}, (model.EndpointPort("", model.Protocol.TCP, 8080),)),
        ({"port": 53, "protocol": "UDP"}, (model.EndpointPort("", model.Protocol.UDP, 53),)),
        ({"name": "", "port": None, "protocol": "TCP"}, ()),
        ({"name": "all"}, ()),
    ],
    ids=["empty-name", "null-name-and-default-protocol", "udp", "null-port-means-all-ports", "missing-port"],
)
def test_endpoint_slice_ports(port: dict[str, Any], expected: tuple[model.EndpointPort, ...]) -> None:
    assert _parse_slice(_with(ENDPOINT_SLICE, {"ports": [port]})).ports == expected


def test_endpoint_slice_of_ipv6_addresses() -> None:
    obj = _with(ENDPOINT_SLICE, {"addressType": "IPv6", "endpoints[0].addresses": ["fd00:10:244:1::5"],
                                 "endpoints[1].addresses": ["fd00:10:244:2::9"]})

    assert [e.addresses for e in _parse_slice(obj).endpoints] == [(_ip("fd00:10:244:1::5"),),
                                                                        (_ip("fd00:10:244:2::9"),)]


def test_fqdn_endpoint_slice_is_kept_without_endpoints() -> None:
    obj = _with(ENDPOINT_SLICE, {"addressType": "FQDN", "endpoints[0].addresses": ["db.example.com"],
                                 "endpoints[1].addresses": ["db2.example.com"]})

    endpoint_slice = _parse_slice(obj)

    assert (endpoint_slice.address_type, endpoint_slice.endpoints) == ("FQDN", ())


def test_endpoint_slice_without_endpoints_is_empty() -> None:
    assert _parse_slice(_with(ENDPOINT_SLICE, {"endpoints": None})).endpoints == ()


# --- Node, Namespace, Pod --------------------------------------------------------------------


def test_node_deletion_and_taint_keys_are_kept() -> None:
    node = kubeobjects.parse(_with(NODE, {
        "metadata.deletionTimestamp": "2024-05-02T11:00:00Z",
        "spec.taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1714647600", "effect": "NoSchedule"},
                        {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}],
    }))

    assert isinstance(node, model.Node)
    assert (node.deleting, node.taints) == (True, ("ToBeDeletedByClusterAutoscaler", "node.kubernetes.io/unschedulable"))


def test_node_without_deletion_or_taints() -> None:
    node = kubeobjects.parse(_with(NODE, {"spec.taints": _DELETE}))

    assert isinstance(node, model.Node)
    assert (node.deleting, node.taints) == (False, ())


def test_node_keeps_internal_and_external_ips_only() -> None:
    node = kubeobjects.parse(_load(NODE))

    assert node == model.Node(
        name="node-1",
        addresses=(_ip("172.18.0.3"), _ip("fc00:f853:ccd:e793::3"), _ip("203.0.113.30")),
        labels=(("kubernetes.io/hostname", "node-1"), ("kubernetes.io/os", "linux"),
                ("topology.kubernetes.io/zone", "zone-a")),
        taints=("node-role.kubernetes.io/control-plane",),
    )


def test_namespace_keeps_its_labels() -> None:
    assert kubeobjects.parse(_load(NAMESPACE)) == model.Namespace(
        name="shop", labels=(("istio-injection", "enabled"), ("kubernetes.io/metadata.name", "shop")))


def test_pod_in_kubectl_shape_is_converted_field_by_field() -> None:
    assert kubeobjects.parse(_load(POD)) == model.Pod(
        namespace="shop",
        name="web-7c9d8b5f4-abcde",
        uid="2b7e1f4a-6f1d-4d33-9a7c-8d0e2c5b7e10",
        node_name="node-1",
        ips=(_ip("10.244.1.5"), _ip("fd00:10:244:1::5")),
        labels=(("app.kubernetes.io/name", "web"), ("pod-template-hash", "7c9d8b5f4")),
        annotations=(("kubectl.kubernetes.io/default-container", "web"),),
        qos_class="BestEffort",
    )


def test_pod_without_pod_ips_falls_back_to_pod_ip() -> None:
    assert _parse_pod(_with(POD, {"status.podIPs": _DELETE})).ips == (_ip("10.244.1.5"),)


def test_pending_pod_has_no_node_and_no_ips() -> None:
    pod = _parse_pod(_with(POD, {"spec.nodeName": _DELETE, "status": {"phase": "Pending"}}))

    assert (pod.node_name, pod.ips) == (None, ())


# --- invalid objects -------------------------------------------------------------------------

_INVALID = [
    # (id, object text, changes, ref, text the reason must contain)
    ("unknown-kind", SERVICE, {"kind": "Deployment"}, "Deployment shop/web", 'kind "Deployment" is not supported'),
    ("missing-kind", SERVICE, {"kind": _DELETE}, "object shop/web", "kind is missing"),
    ("unknown-api-version", SERVICE, {"apiVersion": "v2"}, "Service shop/web", 'apiVersion "v2"'),
    ("old-endpoint-slice-api", ENDPOINT_SLICE, {"apiVersion": "discovery.k8s.io/v1beta1"},
     "EndpointSlice shop/web-x7k2p", 'apiVersion "discovery.k8s.io/v1beta1" is not supported'),
    ("missing-name", SERVICE, {"metadata.name": _DELETE}, "Service shop/<no name>", "metadata.name is missing"),
    ("empty-name", SERVICE, {"metadata.name": ""}, "Service shop/<no name>", "metadata.name"),
    ("missing-metadata", NODE, {"metadata": _DELETE}, "Node <no name>", "metadata is missing"),
    ("metadata-not-a-mapping", SERVICE, {"metadata": ["web"]}, "Service default/<no name>",
     "metadata is a list, not a mapping"),
    ("name-not-a-string", SERVICE, {"metadata.name": 7}, "Service shop/<no name>", "metadata.name 7"),
    ("namespace-not-a-string", SERVICE, {"metadata.namespace": ["shop"]}, "Service default/web", "metadata.namespace"),
    ("label-value-not-a-string", SERVICE, {"metadata.labels.version": 2}, "Service shop/web",
     'metadata.labels["version"] 2'),
    ("labels-not-a-mapping", NAMESPACE, {"metadata.labels": ["a=b"]}, "Namespace shop", "metadata.labels is a list"),
    ("missing-spec", SERVICE, {"spec": _DELETE}, "Service shop/web", "spec is missing"),
    ("spec-not-a-mapping", SERVICE, {"spec": "ClusterIP"}, "Service shop/web", "spec is a string, not a mapping"),
    ("invalid-cluster-ip", SERVICE, {"spec.clusterIPs": ["10.0.0.300"], "spec.clusterIP": "10.0.0.300"},
     "Service shop/web", 'spec.clusterIPs[0] "10.0.0.300" is not an IP address'),
    ("invalid-single-cluster-ip", SERVICE, {"spec.clusterIPs": _DELETE, "spec.clusterIP": "10.96.12"},
     "Service shop/web", 'spec.clusterIP "10.96.12" is not an IP address'),
    ("cluster-ip-differs-from-cluster-ips", SERVICE, {"spec.clusterIP": "10.96.0.1"}, "Service shop/web",
     "spec.clusterIP"),
    ("two-ipv4-cluster-ips", SERVICE, {"spec.clusterIPs": ["10.96.12.34", "10.96.12.35"]}, "Service shop/web",
     "spec.clusterIPs"),
    ("none-among-cluster-ips", SERVICE, {"spec.clusterIPs": ["10.96.12.34", "None"]}, "Service shop/web",
     "spec.clusterIPs"),
    ("cluster-ip-with-zone", SERVICE, {"spec.clusterIPs": ["fe80::1%eth0"], "spec.clusterIP": "fe80::1%eth0"},
     "Service shop/web", 'spec.clusterIPs[0] "fe80::1%eth0" is not an IP address'),
    ("cluster-ip-not-a-string", SERVICE, {"spec.clusterIPs": [167772161], "spec.clusterIP": _DELETE},
     "Service shop/web", "spec.clusterIPs[0] 167772161"),
    ("invalid-external-ip", LOAD_BALANCER_SERVICE, {"spec.externalIPs": ["192.0.2.10", "192.0.2"]},
     "Service edge/ingress", 'spec.externalIPs[1] "192.0.2" is not an IP address'),
    ("external-ips-not-a-list", LOAD_BALANCER_SERVICE, {"spec.externalIPs": "192.0.2.10"},
     "Service edge/ingress", "spec.externalIPs is a string, not a list"),
    ("invalid-ingress-ip", LOAD_BALANCER_SERVICE, {"status.loadBalancer.ingress[0].ip": "198.51.100.256"},
     "Service edge/ingress", 'status.loadBalancer.ingress[0].ip "198.51.100.256" is not an IP address'),
    ("unknown-ingress-ip-mode", LOAD_BALANCER_SERVICE, {"status.loadBalancer.ingress[0].ipMode": "Direct"},
     "Service edge/ingress", 'status.loadBalancer.ingress[0].ipMode "Direct"'),
    ("unknown-ip-family", SERVICE, {"spec.ipFamilies": ["IPv5"]}, "Service shop/web",
     'spec.ipFamilies[0] "IPv5" is not one of IPv4, IPv6'),
    ("unknown-service-type", SERVICE, {"spec.type": "Internal"}, "Service shop/web",
     'spec.type "Internal" is not one of ClusterIP, NodePort, LoadBalancer, ExternalName'),
    ("external-name-without-name", SERVICE, {"spec.type": "ExternalName"}, "Service shop/web",
     "spec.externalName is missing"),
    ("missing-ports", SERVICE, {"spec.ports": _DELETE}, "Service shop/web", "spec.ports is missing"),
    ("ports-not-a-list", SERVICE, {"spec.ports": {"port": 80}}, "Service shop/web", "spec.ports is a mapping"),
    ("port-not-a-mapping", SERVICE, {"spec.ports[1]": 9090}, "Service shop/web",
     "spec.ports[1] is a number, not a mapping"),
    ("missing-port", SERVICE, {"spec.ports[1].port": _DELETE}, "Service shop/web", "spec.ports[1].port is missing"),
    ("port-zero", SERVICE, {"spec.ports[0].port": 0}, "Service shop/web", "spec.ports[0].port 0 is out of range"),
    ("port-too-big", SERVICE, {"spec.ports[0].port": 65536}, "Service shop/web",
     "spec.ports[0].port 65536 is out of range 1..65535"),
    ("port-as-string", SERVICE, {"spec.ports[0].port": "80"}, "Service shop/web",
     'spec.ports[0].port "80" is not an integer'),
    ("port-as-boolean", SERVICE, {"spec.ports[0].port": True}, "Service shop/web",
     "spec.ports[0].port true is not an integer"),
    ("node-port-too-big", LOAD_BALANCER_SERVICE, {"spec.ports[0].nodePort": 70000}, "Service edge/ingress",
     "spec.ports[0].nodePort 70000 is out of range 1..65535"),
    ("node-port-negative", LOAD_BALANCER_SERVICE, {"spec.ports[1].nodePort": -1}, "Service edge/ingress",
     "spec.ports[1].nodePort -1 is out of range"),
    ("unknown-protocol", SERVICE, {"spec.ports[0].protocol": "HTTP"}, "Service shop/web",
     'spec.ports[0].protocol "HTTP" is not one of TCP, UDP, SCTP'),
    ("lower-case-protocol", SERVICE, {"spec.ports[0].protocol": "tcp"}, "Service shop/web",
     'spec.ports[0].protocol "tcp"'),
    ("target-port-too-big", SERVICE, {"spec.ports[1].targetPort": 65536}, "Service shop/web",
     "spec.ports[1].targetPort 65536 is out of range"),
    ("target-port-upper-case-name", SERVICE, {"spec.ports[0].targetPort": "Http"}, "Service shop/web",
     'spec.ports[0].targetPort "Http" is neither a port number nor a valid port name'),
    ("target-port-digits-as-string", SERVICE, {"spec.ports[0].targetPort": "8080"}, "Service shop/web",
     'spec.ports[0].targetPort "8080"'),
    ("target-port-name-too-long", SERVICE, {"spec.ports[0].targetPort": "a-very-long-name"}, "Service shop/web",
     'spec.ports[0].targetPort "a-very-long-name"'),
    ("target-port-double-hyphen", SERVICE, {"spec.ports[0].targetPort": "web--http"}, "Service shop/web",
     'spec.ports[0].targetPort "web--http"'),
    ("target-port-leading-hyphen", SERVICE, {"spec.ports[0].targetPort": "-http"}, "Service shop/web",
     'spec.ports[0].targetPort "-http"'),
    ("target-port-underscore", SERVICE, {"spec.ports[0].targetPort": "http_alt"}, "Service shop/web",
     'spec.ports[0].targetPort "http_alt"'),
    ("duplicate-port-name", SERVICE, {"spec.ports[1].name": "http"}, "Service shop/web",
     'spec.ports[1] has name "http", like spec.ports[0]'),
    ("two-unnamed-ports", SERVICE, {"spec.ports[0].name": _DELETE, "spec.ports[1].name": _DELETE},
     "Service shop/web", "spec.ports[1] is unnamed, like spec.ports[0]"),
    ("duplicate-port-and-protocol", SERVICE, {"spec.ports[1].port": 80}, "Service shop/web",
     "spec.ports[1] 80/TCP repeats spec.ports[0]"),
    ("unknown-session-affinity", SERVICE, {"spec.sessionAffinity": "Sticky"}, "Service shop/web",
     'spec.sessionAffinity "Sticky" is not one of None, ClientIP'),
    ("affinity-timeout-zero", LOAD_BALANCER_SERVICE, {"spec.sessionAffinityConfig.clientIP.timeoutSeconds": 0},
     "Service edge/ingress", "spec.sessionAffinityConfig.clientIP.timeoutSeconds 0 is out of range 1..86400"),
    ("affinity-timeout-over-a-day", LOAD_BALANCER_SERVICE,
     {"spec.sessionAffinityConfig.clientIP.timeoutSeconds": 86401},
     "Service edge/ingress", "spec.sessionAffinityConfig.clientIP.timeoutSeconds 86401 is out of range 1..86400"),
    ("affinity-timeout-as-string", LOAD_BALANCER_SERVICE,
     {"spec.sessionAffinityConfig.clientIP.timeoutSeconds": "600"},
     "Service edge/ingress", 'spec.sessionAffinityConfig.clientIP.timeoutSeconds "600" is not an integer'),
    ("health-check-node-port-too-big", LOAD_BALANCER_SERVICE, {"spec.healthCheckNodePort": 65536},
     "Service edge/ingress", "spec.healthCheckNodePort 65536 is out of range 1..65535"),
    ("health-check-node-port-as-string", LOAD_BALANCER_SERVICE, {"spec.healthCheckNodePort": "31999"},
     "Service edge/ingress", 'spec.healthCheckNodePort "31999" is not an integer'),
    ("node-taint-without-key", NODE, {"spec.taints": [{"effect": "NoSchedule"}]}, "Node node-1",
     "spec.taints[0].key is missing"),
    ("unknown-external-traffic-policy", LOAD_BALANCER_SERVICE, {"spec.externalTrafficPolicy": "Global"},
     "Service edge/ingress", 'spec.externalTrafficPolicy "Global" is not one of Cluster, Local'),
    ("unknown-internal-traffic-policy", SERVICE, {"spec.internalTrafficPolicy": "local"}, "Service shop/web",
     'spec.internalTrafficPolicy "local"'),
    ("source-range-prefix-too-long", LOAD_BALANCER_SERVICE, {"spec.loadBalancerSourceRanges[0]": "10.0.0.0/33"},
     "Service edge/ingress", 'spec.loadBalancerSourceRanges[0] "10.0.0.0/33" is not a CIDR'),
    ("source-range-without-prefix", LOAD_BALANCER_SERVICE, {"spec.loadBalancerSourceRanges[1]": "10.0.0.1"},
     "Service edge/ingress", 'spec.loadBalancerSourceRanges[1] "10.0.0.1" is not a CIDR'),
    ("traffic-distribution-not-a-string", SERVICE, {"spec.trafficDistribution": ["PreferClose"]},
     "Service shop/web", "spec.trafficDistribution"),
    ("slice-without-service-name-label", ENDPOINT_SLICE, {"metadata.labels": {"app": "web"}},
     "EndpointSlice shop/web-x7k2p", "kubernetes.io/service-name"),
    ("slice-with-empty-service-name", ENDPOINT_SLICE, {"metadata.labels": {"kubernetes.io/service-name": ""}},
     "EndpointSlice shop/web-x7k2p", "kubernetes.io/service-name"),
    ("slice-missing-address-type", ENDPOINT_SLICE, {"addressType": _DELETE}, "EndpointSlice shop/web-x7k2p",
     "addressType is missing"),
    ("slice-unknown-address-type", ENDPOINT_SLICE, {"addressType": "IPv7"}, "EndpointSlice shop/web-x7k2p",
     'addressType "IPv7" is not one of IPv4, IPv6, FQDN'),
    ("slice-invalid-address", ENDPOINT_SLICE, {"endpoints[1].addresses": ["10.244.2.900"]},
     "EndpointSlice shop/web-x7k2p", 'endpoints[1].addresses[0] "10.244.2.900" is not an IP address'),
    ("slice-ipv6-address-in-ipv4-slice", ENDPOINT_SLICE, {"endpoints[0].addresses": ["fd00::5"]},
     "EndpointSlice shop/web-x7k2p", 'endpoints[0].addresses[0] "fd00::5" is not an IPv4 address'),
    ("slice-ipv4-address-in-ipv6-slice", ENDPOINT_SLICE, {"addressType": "IPv6"},
     "EndpointSlice shop/web-x7k2p", 'endpoints[0].addresses[0] "10.244.1.5" is not an IPv6 address'),
    ("slice-endpoint-without-addresses", ENDPOINT_SLICE, {"endpoints[0].addresses": []},
     "EndpointSlice shop/web-x7k2p", "endpoints[0].addresses is missing"),
    ("slice-endpoints-not-a-list", ENDPOINT_SLICE, {"endpoints": {"addresses": ["10.244.1.5"]}},
     "EndpointSlice shop/web-x7k2p", "endpoints is a mapping, not a list"),
    ("slice-ready-not-a-boolean", ENDPOINT_SLICE, {"endpoints[0].conditions.ready": "yes"},
     "EndpointSlice shop/web-x7k2p", 'endpoints[0].conditions.ready "yes" is not true or false'),
    ("slice-zone-hint-without-name", ENDPOINT_SLICE, {"endpoints[0].hints.forZones": [{"zone": "zone-a"}]},
     "EndpointSlice shop/web-x7k2p", "endpoints[0].hints.forZones[0].name is missing"),
    ("slice-port-too-big", ENDPOINT_SLICE, {"ports[0].port": 65536}, "EndpointSlice shop/web-x7k2p",
     "ports[0].port 65536 is out of range 1..65535"),
    ("slice-port-zero", ENDPOINT_SLICE, {"ports[1].port": 0}, "EndpointSlice shop/web-x7k2p",
     "ports[1].port 0 is out of range"),
    ("slice-unknown-protocol", ENDPOINT_SLICE, {"ports[0].protocol": "QUIC"}, "EndpointSlice shop/web-x7k2p",
     'ports[0].protocol "QUIC" is not one of TCP, UDP, SCTP'),
    ("node-invalid-internal-ip", NODE, {"status.addresses[0].address": "172.18.0"}, "Node node-1",
     'status.addresses[0].address "172.18.0" is not an IP address'),
    ("node-invalid-external-ip", NODE, {"status.addresses[2].address": "node-1.example.com"}, "Node node-1",
     'status.addresses[2].address "node-1.example.com" is not an IP address'),
    ("node-addresses-not-a-list", NODE, {"status.addresses": "172.18.0.3"}, "Node node-1",
     "status.addresses is a string, not a list"),
    ("pod-invalid-pod-ip", POD, {"status.podIPs[1].ip": "fd00:10:244:1::g"}, "Pod shop/web-7c9d8b5f4-abcde",
     'status.podIPs[1].ip "fd00:10:244:1::g" is not an IP address'),
    ("pod-invalid-single-pod-ip", POD, {"status.podIPs": _DELETE, "status.podIP": "10.244.1"},
     "Pod shop/web-7c9d8b5f4-abcde", 'status.podIP "10.244.1" is not an IP address'),
    ("pod-annotation-not-a-string", POD, {"metadata.annotations.weight": 3}, "Pod shop/web-7c9d8b5f4-abcde",
     'metadata.annotations["weight"] 3'),
]


@pytest.mark.parametrize(
    ("text", "changes", "ref", "reason"),
    [case[1:] for case in _INVALID],
    ids=[case[0] for case in _INVALID],
)
def test_invalid_object_is_rejected_naming_the_object_and_field(
    text: str, changes: dict[str, Any], ref: str, reason: str
) -> None:
    obj = _with(text, changes)

    with pytest.raises(errors.InvalidObject) as raised:
        kubeobjects.parse(obj)

    assert (raised.value.ref, reason in raised.value.reason) == (ref, True), raised.value.reason


@pytest.mark.parametrize(
    ("document", "reason"),
    [([], "the document is a list, not a mapping"), ("web", "the document is a string, not a mapping"),
     (None, "the document is null, not a mapping")],
    ids=["list", "string", "null"],
)
def test_document_that_is_not_a_mapping_is_rejected(document: Any, reason: str) -> None:
    with pytest.raises(errors.InvalidObject) as raised:
        kubeobjects.parse(document)

    assert (raised.value.ref, raised.value.reason) == ("object <no name>", reason)


_GARBAGE: tuple[Any, ...] = (None, True, 0, -1, 70000, 1.5, "", "x", "None", [], [None], {}, {"a": None})


def _mutations(obj: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Every (path, value) that replaces one node of `obj`, at any depth, with garbage."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, child in items:
        for value in _GARBAGE:
            yield (*path, key), value
        yield from _mutations(child, (*path, key))


def _mutated(obj: Any, path: tuple[str | int, ...], value: Any) -> Any:
    mutated = copy.deepcopy(obj)
    target = mutated
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return mutated


@pytest.mark.parametrize(
    "text",
    [SERVICE, LOAD_BALANCER_SERVICE, ENDPOINT_SLICE, NODE, NAMESPACE, POD],
    ids=["service", "load-balancer-service", "endpoint-slice", "node", "namespace", "pod"],
)
def test_any_malformed_field_gives_invalid_object_never_another_exception(text: str) -> None:
    obj = _load(text)
    escaped = []
    for path, value in _mutations(obj):
        try:
            kubeobjects.parse(_mutated(obj, path, value))
        except errors.InvalidObject:
            pass
        except Exception as error:  # noqa: BLE001 - the point of the test is to catch any escape
            escaped.append(f"{path}={value!r}: {error!r}")

    assert escaped == []


# --- the common-shape pass agrees with the field readers -------------------------------------

_COMMON_SHAPES = {
    "service": SERVICE,
    "load-balancer-service": LOAD_BALANCER_SERVICE,
    "endpoint-slice": ENDPOINT_SLICE,
    "headless-service": """
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, clusterIPs: [None], ports: [{port: 5432}], type: ClusterIP}
""",
    "dual-stack-node-port-service": """
apiVersion: v1
kind: Service
metadata: {name: api, labels: {app: api}}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00:96::20"]
  ipFamilies: [IPv4, IPv6]
  externalIPs: [192.0.2.20]
  externalTrafficPolicy: Local
  trafficDistribution: PreferClose
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080, appProtocol: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: 0, nodePort: 0}
status: {loadBalancer: {}}
""",
    # A LoadBalancer whose load balancer is not there yet: no ingress, so the common pass takes it.
    "pending-load-balancer-service": """
apiVersion: v1
kind: Service
metadata: {name: ingress, namespace: edge}
spec:
  type: LoadBalancer
  clusterIP: 10.96.200.8
  clusterIPs: [10.96.200.8]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32001
  ports:
  - {name: https, port: 443, targetPort: 8443, nodePort: 30444}
status: {loadBalancer: {}}
""",
    "ipv6-endpoint-slice-with-node-hints": """
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-v6, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv6
endpoints:
- addresses: ["fd00:244::5"]
  hints: {forNodes: [{name: node-1}], forZones: [{name: zone-a}]}
- addresses: ["fd00:244::6", "fd00:244::7"]
  conditions: {}
ports:
- {name: http, port: 8080, appProtocol: http}
- {name: all}
""",
}

# Values a reader might confuse with one it accepts: 1 and True, 0 and False, "" and None.
_LOOKALIKES: tuple[Any, ...] = (*_GARBAGE, False, 1, 0.0, "TCP", "IPv4", "10.0.0.1", [{}], [""])


def _removals(obj: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """The path of every mapping key in `obj`, at any depth."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, child in items:
        if isinstance(obj, dict):
            yield (*path, key)
        yield from _removals(child, (*path, key))


def _without(obj: Any, path: tuple[str | int, ...]) -> Any:
    trimmed = copy.deepcopy(obj)
    target = trimmed
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return trimmed


def _variants(obj: Any) -> Iterator[Any]:
    yield obj
    for path in _removals(obj):
        yield _without(obj, path)
    for path, _ in _mutations(obj):
        for value in _LOOKALIKES:
            yield _mutated(obj, path, value)


def _readers_view(obj: dict[str, Any]) -> str:
    try:
        return repr(kubeobjects._parse(obj))
    except kubeobjects._FieldError as error:
        return f"rejected: {error.reason}"


@pytest.mark.parametrize("text", list(_COMMON_SHAPES.values()), ids=list(_COMMON_SHAPES))
def test_common_pass_gives_what_the_field_readers_give_or_steps_aside(text: str) -> None:
    mismatches = []
    for obj in _variants(_load(text)):
        fast = kubeobjects._parse_common(obj)
        # repr, not ==: a str where an enum belongs, or 1 where True belongs, compares equal.
        if fast is not None and repr(fast) != _readers_view(obj):
            mismatches.append(f"{repr(fast)} != {_readers_view(obj)}")

    assert mismatches == []


@pytest.mark.parametrize("text", list(_COMMON_SHAPES.values()), ids=list(_COMMON_SHAPES))
def test_common_pass_from_json_gives_what_the_field_readers_give_or_steps_aside(text: str) -> None:
    kind, api_version = _load(text)["kind"], _load(text)["apiVersion"]
    mismatches = []
    for obj in _variants(_load(text)):
        # As a list item: its own kind and apiVersion may be absent, and then are the list's.
        for item in (obj, {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}):
            fast = kubeobjects.parse_json_common(json.dumps(item).encode(), kind=kind, api_version=api_version)
            typed = {**item, "kind": item.get("kind", kind), "apiVersion": item.get("apiVersion", api_version)}
            if fast is not None and repr(fast) != _readers_view(typed):
                mismatches.append(f"{repr(fast)} != {_readers_view(typed)}")

    assert mismatches == []


@pytest.mark.parametrize("name", ["service", "endpoint-slice", "headless-service", "dual-stack-node-port-service",
                                  "ipv6-endpoint-slice-with-node-hints", "pending-load-balancer-service"])
def test_common_shapes_take_the_one_pass(name: str) -> None:
    obj = _load(_COMMON_SHAPES[name])

    assert kubeobjects._parse_common(obj) is not None
    assert kubeobjects.parse_json_common(json.dumps(obj).encode(), kind=obj["kind"],
                                         api_version=obj["apiVersion"]) is not None
