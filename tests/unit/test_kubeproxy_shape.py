"""The kube-proxy rule generators of bench/kubeproxy.py: names, probabilities, order and shape.

Expected names and lines come from kube-proxy's own tests (pkg/proxy/iptables/proxier_test.go,
TestOverallIPTablesRules, and pkg/proxy/nftables/proxier_test.go, TestOverallNFTablesRules),
which use pod CIDR 10.0.0.0/8 and these services.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from bench import kubeproxy as kp

KP_CIDR = "10.0.0.0/8"
SVC1 = kp.BenchService("ns1", "svc1", "172.30.0.41", 80, "TCP", (("10.180.0.1", 80),), "p80")
# Given out of order: kube-proxy sorts endpoints by address.
SVC4 = kp.BenchService(
    "ns4", "svc4", "172.30.0.44", 80, "TCP", (("10.180.0.5", 80), ("10.180.0.4", 80)), "p80"
)


def _service(i: int, endpoints: int = 2) -> kp.BenchService:
    eps = tuple((f"10.244.{1 + i // 200}.{1 + (i % 200)}", 8080 + j) for j in range(endpoints))
    return kp.BenchService("bench", f"svc-{i}", f"10.96.{i // 200}.{10 + i % 200}", 80, "TCP", eps)


def _lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize(
    ("service", "endpoint", "svc_chain", "sep_chain"),
    [
        (SVC1, ("10.180.0.1", 80), "KUBE-SVC-XPGD46QRK7WJZT7O", "KUBE-SEP-SXIVWICOYRO3J4NJ"),
        (SVC4, ("10.180.0.4", 80), "KUBE-SVC-4SW47YFZTEDKD3PK", "KUBE-SEP-UKSFD7AGPMPPLUHC"),
        (SVC4, ("10.180.0.5", 80), "KUBE-SVC-4SW47YFZTEDKD3PK", "KUBE-SEP-C6EBXVWJJZMIWKLZ"),
    ],
)
def test_iptables_chain_names_match_kube_proxy(
    service: kp.BenchService, endpoint: tuple[str, int], svc_chain: str, sep_chain: str
) -> None:
    assert kp.iptables_service_chain(service) == svc_chain
    assert kp.iptables_endpoint_chain(service, endpoint) == sep_chain


def test_nft_chain_names_match_kube_proxy() -> None:
    assert kp.nft_service_chain(SVC1) == "service-ULMVA6XW-ns1/svc1/tcp/p80"
    assert kp.nft_endpoint_chain(SVC1, ("10.180.0.1", 80)) == (
        "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    )
    assert kp.nft_service_chain(SVC4) == "service-LAUZTJTB-ns4/svc4/tcp/p80"
    assert kp.nft_endpoint_chain(SVC4, ("10.180.0.5", 80)) == (
        "endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80"
    )


def test_nft_chain_names_are_truncated_to_the_nft_limit() -> None:
    endpoints = (("10.244.0.2", 80),)
    long = kp.BenchService("n" * 63, "s" * 63, "10.96.0.1", 80, "TCP", endpoints, "p" * 63)
    chain = kp.nft_endpoint_chain(long, ("10.244.0.2", 80))
    assert len(chain) <= len("endpoint-") + 240
    assert kp.nft_service_chain(long).startswith("service-")


def test_iptables_service_rules_match_kube_proxy() -> None:
    rules = kp.iptables_rules([SVC4], cluster_cidr=KP_CIDR)
    expected = [
        '-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp'
        " -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK",
        '-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp'
        " -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
        '-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80"'
        " -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC",
        '-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80"'
        " -j KUBE-SEP-C6EBXVWJJZMIWKLZ",
        "-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4"
        " -j KUBE-MARK-MASQ",
        "-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp"
        " -j DNAT --to-destination 10.180.0.4:80",
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be'
        ' the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
    ]
    lines = rules.splitlines()
    for line in expected:
        assert line in lines


def test_iptables_tables_and_jumps() -> None:
    rules = kp.iptables_rules([SVC1])
    assert rules.startswith("*filter\n") and rules.endswith("COMMIT\n")
    nat = rules[rules.index("*nat\n") :]
    for chain in ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"):
        assert f":{chain} - [0:0]" in nat
    assert _lines(nat, "-A PREROUTING") == [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
    ]
    assert _lines(nat, "-A OUTPUT") == [
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
    ]
    # Chains are declared before the first rule of the table that could jump to them.
    first_rule = next(i for i, line in enumerate(nat.splitlines()) if line.startswith("-A"))
    assert all(line.startswith((":", "*")) for line in nat.splitlines()[:first_rule])
    assert "-m mark ! --mark 0x00004000/0x00004000 -j RETURN" in nat
    assert "-j MARK --or-mark 0x00004000" in nat
    # kube-proxy's jumps into filter chains, on the forward path of a pod's new connection.
    assert _lines(rules, "-A FORWARD") == [
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment"
        ' "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment"
        ' "kubernetes service portals" -j KUBE-SERVICES',
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment"
        ' "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
    ]


def test_probabilities_are_kube_proxys() -> None:
    probabilities = [kp.probability(n) for n in (4, 3, 2)]
    assert probabilities == ["0.2500000000", "0.3333333333", "0.5000000000"]
    svc = _service(0, endpoints=4)
    rules = kp.iptables_rules([svc])
    chain = kp.iptables_service_chain(svc)
    dispatch = [line for line in _lines(rules, f"-A {chain}") if "KUBE-SEP-" in line]
    found = [re.search(r"--probability (\S+)", line) for line in dispatch]
    assert [m[1] if m else None for m in found] == [
        "0.2500000000", "0.3333333333", "0.5000000000", None,
    ]  # fmt: skip


def test_kube_services_keeps_service_order_with_target_last() -> None:
    services = [_service(i) for i in range(5)]
    rules = kp.iptables_rules(services)
    kube_services = _lines(rules[rules.index("*nat") :], "-A KUBE-SERVICES")
    assert len(kube_services) == 6
    destinations = [line.split(" -d ")[1].split()[0] for line in kube_services[:5]]
    assert destinations == [svc.cluster_ip for svc in services]
    assert kube_services[4].endswith(kp.iptables_service_chain(services[-1]))
    assert "KUBE-NODEPORTS" in kube_services[5]


def test_large_cluster_mode_drops_endpoint_comments() -> None:
    small = kp.iptables_rules([_service(i, endpoints=2) for i in range(10)])
    large = kp.iptables_rules([_service(i, endpoints=2) for i in range(501)])
    assert any(line.startswith("-A KUBE-SEP-") and "--comment" in line for line in _all(small))
    sep_and_dispatch = [
        line
        for line in _all(large)
        if line.startswith("-A KUBE-SEP-")
        or (line.startswith("-A KUBE-SVC-") and "-j KUBE-SEP-" in line)
    ]
    assert sep_and_dispatch and not any("--comment" in line for line in sep_and_dispatch)
    # The cluster-IP rules keep theirs.
    assert all("cluster IP" in line for line in _lines(large, "-A KUBE-SERVICES -m comment")[:-1])


def test_service_without_endpoints_is_rejected_in_filter() -> None:
    empty = kp.BenchService("default", "none", "10.96.0.99", 80, "TCP", ())
    rules = kp.iptables_rules([empty])
    filter_table = rules[: rules.index("*nat")]
    assert '--comment "default/none:http has no endpoints"' in filter_table
    assert "KUBE-SVC-" not in rules
    nft = kp.nft_rules([empty])
    assert 'no-endpoint-services { 10.96.0.99 . tcp . 80 comment "default/none:http"' in nft


def test_nft_rules_match_kube_proxy() -> None:
    rules = kp.nft_rules([SVC4], cluster_cidr=KP_CIDR).splitlines()
    chain = "service-LAUZTJTB-ns4/svc4/tcp/p80"
    ep4 = "endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80"
    ep5 = "endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80"
    expected = [
        f"add rule ip kube-proxy {chain} ip daddr 172.30.0.44 ip saddr != 10.0.0.0/8"
        " jump mark-for-masquerade",
        f"add rule ip kube-proxy {chain} numgen random mod 2"
        f" vmap {{ 0 : goto {ep4} , 1 : goto {ep5} }}",
        f"add rule ip kube-proxy {ep5} ip saddr 10.180.0.5 jump mark-for-masquerade",
        f"add rule ip kube-proxy {ep5} meta l4proto tcp dnat to 10.180.0.5:80",
        "add element ip kube-proxy cluster-ips { 172.30.0.44 }",
        f"add element ip kube-proxy service-ips {{ 172.30.0.44 . tcp . 80 : goto {chain} }}",
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
        "add rule ip kube-proxy nat-prerouting jump services",
        "add rule ip kube-proxy nat-output jump services",
        "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ;"
        ' comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }',
    ]
    for line in expected:
        assert line in rules
    assert rules[0] == 'add table ip kube-proxy { comment "rules for kube-proxy" ; }'
    base = "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }"
    assert base in rules


def test_nft_chains_exist_before_use() -> None:
    rules = kp.nft_rules([_service(i, endpoints=3) for i in range(4)]).splitlines()
    added: set[str] = set()
    for line in rules:
        if match := re.match(r"add chain ip kube-proxy (\S+)", line):
            added.add(match[1])
        for target in re.findall(r"(?:jump|goto) (\S+)", line):
            assert target in added, line


def test_iptables_partial_rewrites_only_the_changed_service() -> None:
    services = [_service(i) for i in range(3)]
    before = services[1]
    after = dataclasses.replace(before, endpoints=(before.endpoints[0], ("10.244.9.9", 8080)))
    removed = kp.iptables_endpoint_chain(before, before.endpoints[1])
    added = kp.iptables_endpoint_chain(after, ("10.244.9.9", 8080))
    minimal = kp.iptables_partial(before, after)
    assert minimal.startswith("*nat\n") and "*filter" not in minimal
    declared = [line.split()[0][1:] for line in minimal.splitlines() if line.startswith(":")]
    assert declared == [
        kp.iptables_service_chain(after),
        kp.iptables_endpoint_chain(after, after.endpoints[0]),
        added,
        removed,
    ]
    assert f"-X {removed}" in minimal.splitlines()
    for other in (services[0], services[2]):
        assert kp.iptables_service_chain(other) not in minimal

    faithful = kp.iptables_partial(before, after, services=[services[0], after, services[2]])
    kube_services = _lines(faithful, "-A KUBE-SERVICES")
    assert len(kube_services) == 4  # every service's rule is rewritten, plus the nodeports rule
    assert "*filter" in faithful and "-A FORWARD" not in faithful  # jumps are a full-sync step
    assert f":{kp.iptables_service_chain(services[0])} " not in faithful


def test_nft_partial_touches_one_service() -> None:
    before = _service(1)
    after = dataclasses.replace(before, endpoints=(("10.244.9.9", 8080),))
    text = kp.nft_partial(before, after)
    assert "add table" not in text and "add element" not in text
    chain = kp.nft_service_chain(after)
    assert f"flush chain ip kube-proxy {chain}" in text
    for endpoint in before.endpoints:
        old = kp.nft_endpoint_chain(before, endpoint)
        assert text.index(f"flush chain ip kube-proxy {old}") < text.index(
            f"delete chain ip kube-proxy {old}"
        )
        # Deleted only after the service chain stopped pointing at it.
        assert text.index(f"delete chain ip kube-proxy {old}") > text.index("numgen random mod 1")
    assert f"add chain ip kube-proxy {kp.nft_endpoint_chain(after, after.endpoints[0])}" in text


def test_partial_rejects_a_different_service() -> None:
    with pytest.raises(ValueError, match="not the same service port"):
        kp.iptables_partial(_service(1), _service(2))
    with pytest.raises(ValueError, match="not the same service port"):
        kp.nft_partial(_service(1), _service(2))


def test_bench_service_validates() -> None:
    with pytest.raises(ValueError):
        kp.BenchService("a", "b", "10.96.0.1", 80, "ICMP", ())
    with pytest.raises(ValueError):
        kp.BenchService("a", "b", "not-an-ip", 80, "TCP", ())
    with pytest.raises(ValueError):
        kp.BenchService("a", "b", "10.96.0.1", 80, "TCP", (("10.244.0.2", 0),))
    endpoints = [["10.244.0.2", 80]]
    listed = kp.BenchService("a", "b", "10.96.0.1", 80, "TCP", endpoints)  # type: ignore[arg-type]
    assert listed.endpoints == (("10.244.0.2", 80),)
    assert kp.BenchService("a", "b", "10.96.0.1", 80, "UDP", (), "").port_name_string == "a/b"


def _all(text: str) -> list[str]:
    return text.splitlines()


def test_iptables_partial_to_no_endpoints_deletes_the_service_chain_first() -> None:
    before = _service(1)
    after = dataclasses.replace(before, endpoints=())
    text = kp.iptables_partial(before, after, services=[_service(0), after])
    deletes = [line for line in text.splitlines() if line.startswith("-X ")]
    assert deletes[0] == f"-X {kp.iptables_service_chain(before)}"
    assert len(deletes) == 3
    assert "has no endpoints" in text[: text.index("*nat")]
    with pytest.raises(ValueError, match="pass services"):
        kp.iptables_partial(before, after)
