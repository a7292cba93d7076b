"""The mesh switch's rules: which pods are meshed, and what their sidecars capture."""

from __future__ import annotations

import ipaddress

import pytest

from ctlb import model
from meshredirect import cgroups, switch

NODE = "node-a"
UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
SETTINGS = switch.MeshSettings()


def _pod(name: str = "app", *, namespace: str = "shop", uid: str = UID, node: str | None = NODE,
         annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None,
         host_network: bool = False) -> model.Pod:
    return model.Pod(namespace=namespace, name=name, uid=uid, node_name=node,
                     ips=(ipaddress.ip_address("10.244.0.5"),), labels=tuple((labels or {}).items()),
                     annotations=tuple((annotations or {}).items()), host_network=host_network)


def _ns(labels: dict[str, str] | None = None, name: str = "shop") -> dict[str, model.Namespace]:
    return {name: model.Namespace(name=name, labels=tuple((labels or {}).items()))}


def _decide(pod: model.Pod, namespaces: dict[str, model.Namespace],
            settings: switch.MeshSettings = SETTINGS) -> switch.Decision:
    return switch.pod_modes([pod], namespaces, node_name=NODE, settings=settings)


@pytest.mark.parametrize(("ns_labels", "pod_kw", "meshed"), [
    ({"ctlb.io/mesh": "enabled"}, {}, True),
    ({"istio-injection": "enabled"}, {}, True),
    ({"istio-injection": "disabled"}, {}, False),
    ({"ctlb.io/mesh": "on"}, {}, False),
    ({}, {}, False),
    ({"ctlb.io/mesh": "enabled"}, {"annotations": {"sidecar.istio.io/inject": "false"}}, False),
    ({"ctlb.io/mesh": "enabled"}, {"annotations": {"sidecar.istio.io/inject": " False "}}, False),
    ({"ctlb.io/mesh": "enabled"}, {"labels": {"sidecar.istio.io/inject": "false"}}, False),
    ({"ctlb.io/mesh": "enabled"}, {"annotations": {"sidecar.istio.io/inject": "true"}}, True),
    ({"ctlb.io/mesh": "enabled"}, {"host_network": True}, None),
])
def test_namespace_label_turns_the_mesh_on_and_a_pod_can_opt_out(ns_labels, pod_kw, meshed) -> None:
    decision = _decide(_pod(**pod_kw), _ns(ns_labels))
    if meshed is None:
        assert decision.pods == {}, "a host-network pod has no network namespace of its own"
    else:
        assert decision.pods[UID].meshed is meshed


def test_only_pods_of_this_node_with_a_uid_are_placed() -> None:
    ns = _ns({"ctlb.io/mesh": "enabled"})
    assert _decide(_pod(node="node-b"), ns).pods == {}
    assert _decide(_pod(node=None), ns).pods == {}
    assert _decide(_pod(uid=""), ns).pods == {}
    assert _decide(_pod(namespace="unknown"), ns).pods[UID].meshed is False


def test_label_keys_are_configurable() -> None:
    settings = switch.MeshSettings(namespace_labels=(switch.Label.parse("mesh.example.com/on=yes"),),
                                   opt_out_key="mesh.example.com/skip")
    assert _decide(_pod(), _ns({"mesh.example.com/on": "yes"}), settings).pods[UID].meshed
    assert not _decide(_pod(), _ns({"ctlb.io/mesh": "enabled"}), settings).pods[UID].meshed
    opted_out = _pod(annotations={"mesh.example.com/skip": "false"})
    assert not _decide(opted_out, _ns({"mesh.example.com/on": "yes"}), settings).pods[UID].meshed
    with pytest.raises(ValueError, match="KEY=VALUE"):
        switch.Label.parse("no-equals")


def _capture(annotations: dict[str, str]) -> tuple[switch.Capture, list[str]]:
    decision = _decide(_pod(annotations=annotations), _ns({"ctlb.io/mesh": "enabled"}))
    capture = decision.pods[UID].capture
    assert capture is not None
    return capture, [str(p) for p in decision.problems]


def test_capture_defaults_to_every_destination() -> None:
    assert _capture({}) == (switch.Capture(include=None, exclude=(), exclude_ports=frozenset()), [])


@pytest.mark.parametrize(("value", "include"), [
    ("*", None),
    ("10.0.0.0/8,*", None),
    ("", ()),
    ("10.96.0.0/12, fd00::/8", (ipaddress.ip_network("10.96.0.0/12"), ipaddress.ip_network("fd00::/8"))),
    ("10.96.0.1/12", (ipaddress.ip_network("10.96.0.0/12"),)),
])
def test_include_ranges_follow_istio(value: str, include) -> None:
    capture, problems = _capture({switch.INCLUDE_RANGES: value})
    assert capture.include == include
    assert problems == []


def test_exclusions_without_any_cap_on_their_length() -> None:
    ports = ",".join(str(p) for p in range(1000, 3000))
    ranges = ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(2000))
    capture, problems = _capture({switch.EXCLUDE_PORTS: ports, switch.EXCLUDE_RANGES: ranges + ",2001:db8::/32"})
    assert capture.exclude_ports == frozenset(range(1000, 3000))
    assert len(capture.exclude) == 2001
    assert capture.exclude[-1] == ipaddress.ip_network("2001:db8::/32")
    assert problems == []


def test_a_bad_annotation_entry_is_named_and_the_rest_kept() -> None:
    capture, problems = _capture({switch.EXCLUDE_PORTS: "80,http,70000",
                                  switch.EXCLUDE_RANGES: "10.0.0.0/8,10.0.0.0/33,*"})
    assert capture.exclude_ports == frozenset({80})
    assert capture.exclude == (ipaddress.ip_network("10.0.0.0/8"),)
    assert problems == [
        "Pod shop/app: annotation traffic.sidecar.istio.io/excludeOutboundIPRanges: "
        "'*' is only meaningful in includeOutboundIPRanges; ignored",
        "Pod shop/app: annotation traffic.sidecar.istio.io/excludeOutboundIPRanges: "
        "'10.0.0.0/33' is not an IP range (CIDR); ignored",
        "Pod shop/app: annotation traffic.sidecar.istio.io/excludeOutboundPorts: "
        "'70000' is not a port (1-65535); ignored",
        "Pod shop/app: annotation traffic.sidecar.istio.io/excludeOutboundPorts: "
        "'http' is not a port (1-65535); ignored",
    ]


@pytest.mark.parametrize(("name", "uid"), [
    ("pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", UID),
    ("kubepods-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice", UID),
    ("kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice", UID),
    ("kubelet-kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice", UID),
    ("kubepods-burstable.slice", None),
    ("cri-containerd-0f1e2d3c4b5a6978.scope", None),
    ("pod-not-a-uid", None),
])
def test_pod_uid_from_kubelets_cgroup_names(name: str, uid: str | None) -> None:
    assert cgroups.pod_uid(name) == uid


def test_pod_cgroups_are_found_under_both_drivers_and_a_cgroup_root(tmp_path) -> None:
    systemd = tmp_path / "kubelet.slice" / "kubelet-kubepods.slice" / "kubelet-kubepods-besteffort.slice"
    a = systemd / "kubelet-kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice"
    b = tmp_path / "kubepods" / "pod11111111-2222-3333-4444-555555555555"
    ignored = tmp_path / "system.slice" / "pod22222222-2222-3333-4444-555555555555"
    for folder in (a / "cri-containerd-abc.scope", b / "abc", ignored):
        folder.mkdir(parents=True)
    found = cgroups.find_pod_cgroups(tmp_path, mount=tmp_path.parent)
    assert set(found) == {UID, "11111111-2222-3333-4444-555555555555"}
    assert found[UID].path == a and found[UID].level == 5
    assert found[UID].cgroup_id == a.stat().st_ino
    assert found["11111111-2222-3333-4444-555555555555"].level == 3
