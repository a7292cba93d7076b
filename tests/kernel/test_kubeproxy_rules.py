"""kube-proxy's own rules from bench/kubeproxy.py, installed in a lab node: pods reach every
backend of a ClusterIP without SNAT, partial updates take effect, removal leaves nothing behind,
and the generated text passes the tools' dry runs."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest

from bench import kubeproxy as kp
from ctlb import lab as ctlb_lab
from ctlb.lab import servers
from tests.kernel.clients import http_requests

pytestmark = pytest.mark.kernel

PORTS = (8080, 8081, 8082)
CONNECTIONS = 40
MOVED_PORT = 9081


@dataclass(frozen=True)
class Mode:
    """One kube-proxy mode: how to generate, install, update and remove its rules."""

    name: str
    rules: Callable[[list[kp.BenchService]], str]
    install: Callable[[str, str], kp.Timing]
    partial: Callable[[kp.BenchService, kp.BenchService, list[kp.BenchService]], str]
    apply_partial: Callable[[str, str], kp.Timing]


IPTABLES = Mode(
    "iptables",
    rules=kp.iptables_rules,
    install=kp.install_iptables,
    partial=lambda before, after, services: kp.iptables_partial(before, after, services=services),
    apply_partial=kp.apply_iptables_partial,
)
# kube-proxy rewrites KUBE-SERVICES too; the service's chains alone must also work.
IPTABLES_CHAINS_ONLY = replace(
    IPTABLES,
    name="iptables-chains-only",
    partial=lambda before, after, _: kp.iptables_partial(before, after),
)
NFT = Mode(
    "nft",
    rules=kp.nft_rules,
    install=kp.install_nft,
    partial=lambda before, after, _: kp.nft_partial(before, after),
    apply_partial=kp.apply_nft_partial,
)


@dataclass(frozen=True)
class Node:
    lab: ctlb_lab.Lab
    client: ctlb_lab.Pod
    backends: tuple[ctlb_lab.Pod, ...]
    services: list[kp.BenchService]


@pytest.fixture
def rule_tools(unavailable: Callable[[str], None]) -> None:
    if shutil.which("nft") is None or shutil.which("iptables-restore") is None:
        unavailable("needs iptables and nftables: apt-get install -y iptables nftables")


@pytest.fixture
def node(lab: ctlb_lab.Lab, rule_tools: None) -> Iterator[Node]:
    """A client pod and two backend pods, each backend serving web-<i> on PORTS[i]."""
    client = lab.add_pod("client")
    backends = (lab.add_pod("b1"), lab.add_pod("b2"))
    services = []
    for i, port in enumerate(PORTS):
        for pod in backends:
            servers.start_http(pod, name=f"web-{i}@{pod.name}", port=port)
        endpoints = tuple((str(pod.ipv4), port) for pod in backends)
        cluster_ip = f"10.96.0.{10 + i}"
        services.append(kp.BenchService("default", f"web-{i}", cluster_ip, 80, "TCP", endpoints))
    try:
        yield Node(lab, client, backends, services)
    finally:
        # The rules would go with the node netns; removing them here also runs on failure.
        kp.remove_iptables(lab.node.netns)
        kp.remove_nft(lab.node.netns)


def _backends_seen(node: Node, service: kp.BenchService) -> set[str]:
    """Connect CONNECTIONS times; check every one succeeded and kept the client's address."""
    echoes = http_requests(node.client, service.cluster_ip, service.port, count=CONNECTIONS)
    failed = [echo for echo in echoes if "errno" in echo]
    assert not failed, f"{service.name}: {failed[:3]}"
    assert {echo["peer"] for echo in echoes} == {str(node.client.ipv4)}, "client was SNATed"
    return {echo["backend"] for echo in echoes}


def _nat_dump(node: Node) -> str:
    save = kp.iptables_backend().replace("-restore", "-save")
    return node.lab.node.run([save, "-t", "nat"], check=True).stdout


def _nft_tables(node: Node) -> str:
    return node.lab.node.run(["nft", "list", "tables"], check=True).stdout


@pytest.mark.parametrize("mode", [IPTABLES, NFT], ids=lambda mode: mode.name)
def test_clusterip_reaches_every_backend_without_snat(node: Node, mode: Mode) -> None:
    mode.install(node.lab.node.netns, mode.rules(node.services))
    for i, service in enumerate(node.services):
        assert _backends_seen(node, service) == {f"web-{i}@b1", f"web-{i}@b2"}


@pytest.mark.parametrize("mode", [IPTABLES, IPTABLES_CHAINS_ONLY, NFT], ids=lambda mode: mode.name)
def test_partial_update_moves_a_service_to_a_new_backend(node: Node, mode: Mode) -> None:
    mode.install(node.lab.node.netns, mode.rules(node.services))
    b2 = node.backends[1]
    servers.start_http(b2, name="web-1-moved", port=MOVED_PORT)
    before = node.services[1]
    after = replace(before, endpoints=((str(b2.ipv4), MOVED_PORT),))
    services = [after if svc is before else svc for svc in node.services]

    mode.apply_partial(node.lab.node.netns, mode.partial(before, after, services))

    assert _backends_seen(node, after) == {"web-1-moved"}
    assert _backends_seen(node, node.services[0]) == {"web-0@b1", "web-0@b2"}
    if mode is not NFT:
        stale = kp.iptables_endpoint_chain(before, before.endpoints[0])
        assert stale not in _nat_dump(node)


@pytest.mark.parametrize("mode", [IPTABLES, NFT], ids=lambda mode: mode.name)
def test_remove_leaves_no_kube_proxy_rules(node: Node, mode: Mode) -> None:
    mode.install(node.lab.node.netns, mode.rules(node.services))
    assert ("KUBE-SERVICES" in _nat_dump(node)) == (mode is IPTABLES)
    assert ("table ip kube-proxy" in _nft_tables(node)) == (mode is NFT)

    kp.remove_iptables(node.lab.node.netns)
    kp.remove_nft(node.lab.node.netns)

    assert "KUBE-" not in _nat_dump(node)
    assert "kube-proxy" not in _nft_tables(node)
    # Nothing translates the ClusterIP any more: the node has no route for it.
    (echo,) = http_requests(node.client, node.services[0].cluster_ip, 80, count=1)
    assert "errno" in echo


def _bench_service(i: int) -> kp.BenchService:
    subnet = f"10.244.{1 + i // 100}"
    endpoints = ((f"{subnet}.{i % 100}", 8080), (f"{subnet}.{100 + i % 100}", 8080))
    cluster_ip = f"10.96.{i // 250}.{1 + i % 250}"
    return kp.BenchService("bench", f"svc-{i}", cluster_ip, 80, "TCP", endpoints)


def test_generated_rules_pass_dry_runs_and_load(lab: ctlb_lab.Lab, rule_tools: None) -> None:
    # 600 services x 2 endpoints puts kube-proxy's iptables mode in large-cluster mode.
    services = [_bench_service(i) for i in range(600)]
    services.append(kp.BenchService("bench", "empty", "10.96.9.9", 53, "UDP", ()))
    netns = lab.node.netns
    save = kp.iptables_backend().replace("-restore", "-save")

    kp.check_iptables(netns, kp.iptables_rules(services))
    kp.check_nft(netns, kp.nft_rules(services))
    assert "KUBE-" not in lab.node.run([save], check=True).stdout
    assert "kube-proxy" not in lab.node.run(["nft", "list", "tables"], check=True).stdout
    # iptables-nft's --test only parses (a jump to a missing chain passes); the kernel has the
    # last word, so load both for real as well.
    try:
        kp.install_iptables(netns, kp.iptables_rules(services))
        kp.install_nft(netns, kp.nft_rules(services))
    finally:
        kp.remove_iptables(netns)
        kp.remove_nft(netns)
    assert "KUBE-" not in lab.node.run([save], check=True).stdout
    assert "kube-proxy" not in lab.node.run(["nft", "list", "tables"], check=True).stdout


def test_rejected_rules_raise_with_the_tools_message(lab: ctlb_lab.Lab, rule_tools: None) -> None:
    bad = "*nat\n:KUBE-X - [0:0]\n-A KUBE-X --no-such-option -j RETURN\nCOMMIT\n"
    with pytest.raises(kp.RuleInstallError, match="line 3: -A KUBE-X --no-such-option"):
        kp.check_iptables(lab.node.netns, bad)
    with pytest.raises(kp.RuleInstallError, match="Error"):
        kp.check_nft(lab.node.netns, "add rule ip kube-proxy nowhere drop\n")
    with pytest.raises(kp.RuleInstallError, match="no network namespace"):
        kp.install_nft(f"{lab.prefix}-absent", "")
