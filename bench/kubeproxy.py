"""Kube-proxy's own rule sets (iptables mode and nftables mode), generated and installed in a lab
node netns, so a benchmark can put ctlb side by side with what kube-proxy programs.

The generators are pure: they turn `BenchService` values into the text kube-proxy hands to
`iptables-restore` or `nft -f`, in the shape of pkg/proxy/iptables/proxier.go and
pkg/proxy/nftables/proxier.go as of Kubernetes 1.33, checked against the expectations in their
proxier_test.go (chain names are hashed as kube-proxy hashes them, so they match a real node's). The installers run that text inside a named netns and time
the tool, wall clock and CPU::

    services = [BenchService("default", "web", "10.96.0.10", 80, "TCP", (("10.244.0.3", 8080),))]
    timing = install_iptables(node_netns, iptables_rules(services))
    ...
    remove_iptables(node_netns)

What is modelled is a ClusterIP Service with Cluster traffic policy, kube-proxy run with
`--cluster-cidr` (pod traffic is not masqueraded) and default flags otherwise. Left out, because
they are not on the path of a pod's new connection to a ClusterIP: NodePort, external and
load-balancer IPs, session affinity, the canary chains, and the nfacct counters (kube-proxy drops
them when the kernel lacks xt_nfacct, writing exactly the plain rules generated here).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/12"
# nftables mode defaults --nodeport-addresses to the node's primary IP: the lab node's br0.
NODE_IP = "10.244.0.1"
NFT_TABLE = "kube-proxy"
# --masquerade-bit 14, formatted with Go's "%#08x", which pads to 8 digits after the "0x".
MASQUERADE_MARK = f"0x{1 << 14:08x}"
# Above this many endpoints kube-proxy's iptables mode drops per-endpoint comments.
LARGE_CLUSTER_ENDPOINTS = 1000

_NETNS_DIR = Path("/run/netns")
# utiliptables' restore flags: wait for the xtables lock, keep other chains, keep counters.
_RESTORE_FLAGS = ("-w", "5", "-W", "100000", "--noflush", "--counters")
_IPTABLES_TABLES = ("nat", "filter")
_BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
# knftables.NameLengthMax minus the longest chain-name prefix kube-proxy uses.
_NFT_CHAIN_BASE_MAX = 256 - 16
_KUBE_CHAIN_RE = re.compile(r"^:(KUBE-\S+) ")
_RESTORE_LINE_RE = re.compile(r"line:? (\d+)")

_SVC_PREFIX = "KUBE-SVC-"
_SEP_PREFIX = "KUBE-SEP-"
_SERVICES = "KUBE-SERVICES"
_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
_NODEPORTS = "KUBE-NODEPORTS"
_POSTROUTING = "KUBE-POSTROUTING"
_MARK_MASQ = "KUBE-MARK-MASQ"
_FORWARD = "KUBE-FORWARD"
_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
_KUBELET_FIREWALL = "KUBE-FIREWALL"
_NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"


class Protocol(StrEnum):
    """A Service port's protocol, spelled as in the Kubernetes API."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


@dataclass(frozen=True, slots=True)
class BenchService:
    """One Service port and its ready endpoints, all kube-proxy needs to program it.

    `protocol` is "TCP", "UDP" or "SCTP"; `endpoints` are (pod IPv4, target port) pairs, and an
    empty tuple means a Service without endpoints (kube-proxy then rejects its traffic).
    `port_name` is the Service port's name, part of every chain name ("" for an unnamed port).
    """

    namespace: str
    name: str
    cluster_ip: str
    port: int
    protocol: str
    endpoints: tuple[tuple[str, int], ...]
    port_name: str = "http"

    def __post_init__(self) -> None:
        Protocol(self.protocol)
        ipaddress.IPv4Address(self.cluster_ip)
        _check_port(self.port)
        endpoints = tuple(
            (str(ipaddress.IPv4Address(ip)), int(port)) for ip, port in self.endpoints
        )
        for _, port in endpoints:
            _check_port(port)
        # Frozen, but callers may hand in lists; a tuple keeps the value hashable.
        object.__setattr__(self, "endpoints", endpoints)

    @property
    def port_name_string(self) -> str:
        """kube-proxy's ServicePortName.String(): "ns/name:port", or "ns/name" when unnamed."""
        suffix = f":{self.port_name}" if self.port_name else ""
        return f"{self.namespace}/{self.name}{suffix}"

    @property
    def proto(self) -> str:
        """The protocol as iptables and nft spell it ("tcp")."""
        return self.protocol.lower()

    def same_port(self, other: BenchService) -> bool:
        """Whether other is this same Service port at the same address (endpoints aside)."""
        return _port_key(self) == _port_key(other)


def _port_key(svc: BenchService) -> tuple[str, str, str, str, str, int]:
    return (svc.namespace, svc.name, svc.port_name, svc.protocol, svc.cluster_ip, svc.port)


@dataclass(frozen=True, slots=True)
class Timing:
    """How long one rule-loading command took: wall clock, and its user+system CPU.

    The split shows where the work is: `user_s` in the tool (parsing, its rule cache), `sys_s`
    in the kernel (the netlink transaction, done in the tool's context).
    """

    wall_s: float
    cpu_s: float
    user_s: float = 0.0
    sys_s: float = 0.0


class RuleInstallError(RuntimeError):
    """A rule tool (iptables-restore, nft, sysctl) failed; the message carries its stderr."""


# --- names -------------------------------------------------------------------------------------


def iptables_service_chain(service: BenchService) -> str:
    """Return the service's KUBE-SVC-<hash> chain (kube-proxy's servicePortPolicyClusterChain)."""
    return _SVC_PREFIX + _b32_sha256(service.port_name_string + service.proto)[:16]


def iptables_endpoint_chain(service: BenchService, endpoint: tuple[str, int]) -> str:
    """Return the endpoint's KUBE-SEP-<hash> chain (kube-proxy's servicePortEndpointChainName)."""
    text = service.port_name_string + service.proto + _endpoint_string(endpoint)
    return _SEP_PREFIX + _b32_sha256(text)[:16]


def nft_service_chain(service: BenchService) -> str:
    """Return the service's nft chain, "service-HASH-ns/name/proto/portname"."""
    return "service-" + _hash_and_truncate(_nft_port_base(service))


def nft_endpoint_chain(service: BenchService, endpoint: tuple[str, int]) -> str:
    """Return the endpoint's nft chain, "endpoint-HASH-ns/name/proto/portname__ip/port"."""
    ip, port = endpoint
    return "endpoint-" + _hash_and_truncate(f"{_nft_port_base(service)}__{ip}/{port}")


def probability(n: int) -> str:
    """Return the statistic-match probability kube-proxy writes for 1 of n remaining endpoints."""
    return f"{1.0 / n:0.10f}"


def _b32_sha256(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()


def _hash_and_truncate(name: str) -> str:
    # The hash keeps names unique when the end is cut, and tells near-identical names apart.
    name = f"{_b32_sha256(name)[:8]}-{name}"
    if len(name) > _NFT_CHAIN_BASE_MAX:
        name = name[: _NFT_CHAIN_BASE_MAX - 3] + "..."
    return name


def _nft_port_base(service: BenchService) -> str:
    return f"{service.namespace}/{service.name}/{service.proto}/{service.port_name}"


def _endpoint_string(endpoint: tuple[str, int]) -> str:
    return f"{endpoint[0]}:{endpoint[1]}"


def _ordered_endpoints(service: BenchService) -> list[tuple[str, int]]:
    # kube-proxy's endpoint-slice cache sorts by address string and keeps one of each.
    return sorted(set(service.endpoints), key=lambda ep: (ep[0], ep[1]))


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")


def _comment(text: str) -> str:
    # kube-proxy quotes the comments that contain spaces and writes the others bare.
    return f'"{text}"' if " " in text else text


def _large_cluster(services: Iterable[BenchService]) -> bool:
    return sum(len(_ordered_endpoints(svc)) for svc in services) > LARGE_CLUSTER_ENDPOINTS


# --- iptables ----------------------------------------------------------------------------------

# kube-proxy's iptablesJumpChains plus kubelet's KUBE-FIREWALL jumps, as (table, builtin chain,
# extra match args, comment, target). Each is installed with `iptables -I chain 1`, so a builtin
# chain ends up holding them in reverse order of this list.
_JUMPS: tuple[tuple[str, str, str, str, str], ...] = (
    ("filter", "INPUT", "-m conntrack --ctstate NEW",
     "kubernetes externally-visible service portals", _EXTERNAL_SERVICES),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW",
     "kubernetes externally-visible service portals", _EXTERNAL_SERVICES),
    ("filter", "INPUT", "", "kubernetes health check service ports", _NODEPORTS),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW", "kubernetes service portals", _SERVICES),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW", "kubernetes service portals", _SERVICES),
    ("filter", "FORWARD", "", "kubernetes forwarding rules", _FORWARD),
    ("filter", "INPUT", "-m conntrack --ctstate NEW", "kubernetes load balancer firewall",
     _PROXY_FIREWALL),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW", "kubernetes load balancer firewall",
     _PROXY_FIREWALL),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW", "kubernetes load balancer firewall",
     _PROXY_FIREWALL),
    ("nat", "OUTPUT", "", "kubernetes service portals", _SERVICES),
    ("nat", "PREROUTING", "", "kubernetes service portals", _SERVICES),
    ("nat", "POSTROUTING", "", "kubernetes postrouting rules", _POSTROUTING),
    ("filter", "INPUT", "", "", _KUBELET_FIREWALL),
    ("filter", "OUTPUT", "", "", _KUBELET_FIREWALL),
)  # fmt: skip


def iptables_rules(services: Sequence[BenchService], *, cluster_cidr: str = CLUSTER_CIDR) -> str:
    """Return the iptables-restore input of a kube-proxy full sync, jump rules included.

    Tables filter then nat, each with its chain lines, then the jumps from the builtin chains
    (which kube-proxy adds with `iptables -I` before its restore; here they are `-A` lines in
    their final order, right for a netns without kube-proxy rules yet), then kube-proxy's rules.
    KUBE-SERVICES lists the services in the given order (kube-proxy's own order is Go map order),
    so the last service is matched last, just before the NodePort catch-all.

    Args:
        services: the Service ports to program.
        cluster_cidr: kube-proxy's --cluster-cidr; traffic from outside it is masqueraded.

    Returns:
        Text for `iptables-restore --noflush`.
    """
    large = _large_cluster(services)
    filter_lines = _iptables_filter(services, jumps=True)
    nat_lines = _iptables_nat(
        services, rewrite=services, stale=(), cluster_cidr=cluster_cidr, large=large, jumps=True
    )
    return "\n".join(filter_lines + nat_lines) + "\n"


def iptables_partial(
    before: BenchService,
    after: BenchService,
    *,
    services: Sequence[BenchService] | None = None,
    cluster_cidr: str = CLUSTER_CIDR,
    large_cluster: bool | None = None,
) -> str:
    """Return the iptables-restore input of kube-proxy's partial sync after one service changed.

    The service's KUBE-SVC chain and all its KUBE-SEP chains are redeclared (which flushes them)
    and rewritten; endpoint chains it no longer uses are flushed and deleted (`-X`). (Kube-proxy
    finds those with an iptables-save first, and in large-cluster mode only once per sync period;
    neither is modelled.)

    Kube-proxy's partial sync writes more than that: the whole filter table and the nat table's
    top-level chains, KUBE-SERVICES with one rule per service port among them, are rewritten on
    every sync. Pass `services` (the full set, `after` included) to get that faithful payload;
    without it the result is only the changed service's chains, a lower bound on the work.

    Args:
        before: the service as installed.
        after: the same service port with its new endpoints.
        services: every installed service after the change, for the faithful payload.
        cluster_cidr: kube-proxy's --cluster-cidr.
        large_cluster: kube-proxy's large-cluster mode (no per-endpoint comments); by default
            derived from `services`, or off without them. Match what was installed.

    Returns:
        Text for `iptables-restore --noflush`.

    Raises:
        ValueError: before and after are not the same service port, `services` lacks after, or
            without `services` the service gains or loses all its endpoints.
    """
    _check_partial(before, after, services)
    if services is None and bool(before.endpoints) != bool(after.endpoints):
        raise ValueError("iptables_partial: gaining or losing all endpoints rewrites KUBE-SERVICES;"
                         " pass services")  # fmt: skip
    large = large_cluster if large_cluster is not None else _large_cluster(services or ())
    stale = _stale_endpoints(before, after, chain=iptables_endpoint_chain)
    if before.endpoints and not after.endpoints:
        # No endpoints, no KUBE-SVC chain: it goes first, before the chains it jumps to.
        stale.insert(0, iptables_service_chain(before))
    if services is None:
        lines = _iptables_nat_minimal(after, stale, cluster_cidr=cluster_cidr, large=large)
    else:
        lines = _iptables_filter(services, jumps=False) + _iptables_nat(
            services, rewrite=(after,), stale=stale, cluster_cidr=cluster_cidr, large=large,
            jumps=False,
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def _iptables_filter(services: Sequence[BenchService], *, jumps: bool) -> list[str]:
    chains = [_SERVICES, _EXTERNAL_SERVICES, _FORWARD, _NODEPORTS, _PROXY_FIREWALL,
              _KUBELET_FIREWALL]  # fmt: skip
    lines = ["*filter", *(_chain_line(chain) for chain in chains)]
    if jumps:
        lines += _jump_rules("filter")
    localnet = _comment("block incoming localnet connections")
    lines.append(
        f"-A {_KUBELET_FIREWALL} -m comment --comment {localnet} -d 127.0.0.0/8 ! -s 127.0.0.0/8"
        " -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
    )
    for svc in services:
        if not svc.endpoints:
            no_endpoints = _comment(f"{svc.port_name_string} has no endpoints")
            lines.append(
                f"-A {_SERVICES} -m comment --comment {no_endpoints}"
                f" {_match_service(svc)} -j REJECT"
            )
    mark = f"{MASQUERADE_MARK}/{MASQUERADE_MARK}"
    lines += [
        f"-A {_FORWARD} -m conntrack --ctstate INVALID -j DROP",
        f"-A {_FORWARD} -m comment --comment {_comment('kubernetes forwarding rules')}"
        f" -m mark --mark {mark} -j ACCEPT",
        f"-A {_FORWARD} -m comment --comment {_comment('kubernetes forwarding conntrack rule')}"
        " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
    ]
    return lines


def _iptables_nat(
    services: Sequence[BenchService],
    *,
    rewrite: Sequence[BenchService],
    stale: Sequence[str],
    cluster_cidr: str,
    large: bool,
    jumps: bool,
) -> list[str]:
    """The nat table as syncProxyRules writes it; only services in `rewrite` get their chains."""
    chains = [_chain_line(chain) for chain in (_SERVICES, _NODEPORTS, _POSTROUTING, _MARK_MASQ)]
    rules = _postrouting_rules()
    rewritten = set(rewrite)
    for svc in services:
        if not svc.endpoints:
            continue  # its REJECT rule lives in the filter table
        rules.append(
            f"-A {_SERVICES} -m comment --comment {_comment(f'{svc.port_name_string} cluster IP')}"
            f" {_match_service(svc)} -j {iptables_service_chain(svc)}"
        )
        if svc in rewritten:
            svc_chains, svc_rules = _service_chains(svc, cluster_cidr=cluster_cidr, large=large)
            chains += svc_chains
            rules += svc_rules
    chains += [_chain_line(chain) for chain in stale]
    rules += [f"-X {chain}" for chain in stale]
    rules.append(
        f"-A {_SERVICES} -m comment --comment {_comment(_NODEPORTS_COMMENT)}"
        f" -m addrtype --dst-type LOCAL -j {_NODEPORTS}"
    )
    jump_lines = _jump_rules("nat") if jumps else []
    return ["*nat", *chains, *jump_lines, *rules, "COMMIT"]


def _iptables_nat_minimal(
    service: BenchService, stale: Sequence[str], *, cluster_cidr: str, large: bool
) -> list[str]:
    chains: list[str] = []
    rules: list[str] = []
    if service.endpoints:
        chains, rules = _service_chains(service, cluster_cidr=cluster_cidr, large=large)
    chains += [_chain_line(chain) for chain in stale]
    rules += [f"-X {chain}" for chain in stale]
    return ["*nat", *chains, *rules, "COMMIT"]


def _service_chains(
    svc: BenchService, *, cluster_cidr: str, large: bool
) -> tuple[list[str], list[str]]:
    """The chain lines and rules of one service's KUBE-SVC chain and its KUBE-SEP chains."""
    svc_chain = iptables_service_chain(svc)
    endpoints = _ordered_endpoints(svc)
    chains = [_chain_line(svc_chain)]
    rules = [
        f"-A {svc_chain} -m comment --comment {_comment(f'{svc.port_name_string} cluster IP')}"
        f" {_match_service(svc)} ! -s {cluster_cidr} -j {_MARK_MASQ}"
    ]
    for i, endpoint in enumerate(endpoints):
        comment = _service_comment(f"{svc.port_name_string} -> {_endpoint_string(endpoint)}",
                                   large=large)  # fmt: skip
        remaining = len(endpoints) - i
        statistic = f" -m statistic --mode random --probability {probability(remaining)}"
        rules.append(f"-A {svc_chain}{comment}{statistic if remaining > 1 else ''}"
                     f" -j {iptables_endpoint_chain(svc, endpoint)}")  # fmt: skip
    for endpoint in endpoints:
        sep_chain = iptables_endpoint_chain(svc, endpoint)
        comment = _service_comment(svc.port_name_string, large=large)
        chains.append(_chain_line(sep_chain))
        rules += [
            f"-A {sep_chain}{comment} -s {endpoint[0]} -j {_MARK_MASQ}",
            f"-A {sep_chain}{comment} -m {svc.proto} -p {svc.proto} -j DNAT"
            f" --to-destination {_endpoint_string(endpoint)}",
        ]
    return chains, rules


def _postrouting_rules() -> list[str]:
    mark = MASQUERADE_MARK
    snat = _comment("kubernetes service traffic requiring SNAT")
    return [
        f"-A {_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
        f"-A {_POSTROUTING} -j MARK --xor-mark {mark}",
        f"-A {_POSTROUTING} -m comment --comment {snat} -j MASQUERADE --random-fully",
        f"-A {_MARK_MASQ} -j MARK --or-mark {mark}",
    ]


def _jump_rules(table: str) -> list[str]:
    """The builtin chains' jumps of one table, in the order `iptables -I ... 1` leaves them."""
    lines = []
    for jump_table, chain, extra, comment, target in reversed(_JUMPS):
        if jump_table != table:
            continue
        parts = [f"-A {chain}"]
        if extra:
            parts.append(extra)
        if comment:
            parts.append(f"-m comment --comment {_comment(comment)}")
        parts.append(f"-j {target}")
        lines.append(" ".join(parts))
    # Stable sort by chain keeps each chain's reversed order and groups them like iptables-save.
    order = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"]
    return sorted(lines, key=lambda line: order.index(line.split()[1]))


def _match_service(svc: BenchService) -> str:
    return f"-m {svc.proto} -p {svc.proto} -d {svc.cluster_ip} --dport {svc.port}"


def _service_comment(text: str, *, large: bool) -> str:
    # In large-cluster mode kube-proxy leaves these comments out to shrink the restore input.
    return "" if large else f" -m comment --comment {_comment(text)}"


def _chain_line(chain: str) -> str:
    return f":{chain} - [0:0]"


# --- nftables ----------------------------------------------------------------------------------

# kube-proxy's base chains: (name, type, hook, priority). kube-proxy writes the priorities by
# name (dstnat-10, filter, dstnat, srcnat); numbers, because nft 1.0.6 rejects "dstnat" on the
# output hook.
_NFT_BASE_CHAINS = (
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("filter-input", "filter", "input", 0),
    ("filter-forward", "filter", "forward", 0),
    ("filter-output", "filter", "output", 0),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)
# kube-proxy's nftablesJumpChains: (target, from base chain, extra match).
_NFT_JUMPS = (
    ("nodeport-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-forward", "ct state new"),
    ("service-endpoints-check", "filter-output", "ct state new"),
    ("firewall-check", "filter-prerouting-pre-dnat", "ct state new"),
    ("firewall-check", "filter-output-pre-dnat", "ct state new"),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new"),
    ("cluster-ips-check", "filter-output", "ct state new"),
)
_ADDR_PROTO_PORT = "ipv4_addr . inet_proto . inet_service"
_NFT_MAPS = (
    ("no-endpoint-services", f"{_ADDR_PROTO_PORT} : verdict",
     "vmap to drop or reject packets to services with no endpoints"),
    ("no-endpoint-nodeports", "inet_proto . inet_service : verdict",
     "vmap to drop or reject packets to service nodeports with no endpoints"),
    ("firewall-ips", f"{_ADDR_PROTO_PORT} : verdict",
     "destinations that are subject to LoadBalancerSourceRanges"),
    ("service-ips", f"{_ADDR_PROTO_PORT} : verdict",
     "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
    ("service-nodeports", "inet_proto . inet_service : verdict", "NodePort traffic"),
)  # fmt: skip


def nft_rules(
    services: Sequence[BenchService],
    *,
    cluster_cidr: str = CLUSTER_CIDR,
    service_cidr: str = SERVICE_CIDR,
    node_ip: str = NODE_IP,
) -> str:
    """Return the `nft -f` transaction of kube-proxy's first full sync: table `ip kube-proxy`.

    One transaction that installs everything from scratch: the table, base chains hooked at
    prerouting/output/postrouting (nat) and the filter hooks, the `service-ips` verdict map keyed
    `ipv4_addr . inet_proto . inet_service`, and per service a `service-...` chain choosing an
    endpoint with `numgen random mod N vmap` and per endpoint an `endpoint-...` chain doing the
    DNAT. Lines are in the order kube-proxy's transaction has them.

    Args:
        services: the Service ports to program.
        cluster_cidr: kube-proxy's --cluster-cidr; traffic from outside it is masqueraded.
        service_cidr: the ServiceCIDR; traffic to unallocated addresses in it is dropped.
        node_ip: the node IP that accepts NodePort traffic (nodeport-ips).

    Returns:
        Text for `nft -f`.
    """
    lines = _nft_setup(service_cidr=service_cidr, node_ip=node_ip)
    for svc in services:
        lines += _nft_service(svc, cluster_cidr=cluster_cidr, elements=True)
    return "\n".join(lines) + "\n"


def nft_partial(
    before: BenchService, after: BenchService, *, cluster_cidr: str = CLUSTER_CIDR
) -> str:
    """Return the `nft -f` transaction of kube-proxy's partial sync after one service changed.

    The service chain and each of its endpoint chains are added (a no-op if present), flushed and
    rewritten; endpoint chains no longer used are flushed and deleted. Kube-proxy deletes those
    in a later transaction, at least a second on (a workaround for kernels before 6.2, which
    noticed late that a map element no longer referred to a chain); here it is the same one. The
    service-ips element is unchanged, so nothing else in the table is touched.

    Args:
        before: the service as installed.
        after: the same service port with its new endpoints.
        cluster_cidr: kube-proxy's --cluster-cidr.

    Returns:
        Text for `nft -f`.

    Raises:
        ValueError: before and after are not the same service port, or the change would move the
            service between "has endpoints" and "has none" (a map change this does not model).
    """
    _check_partial(before, after, None)
    if bool(before.endpoints) != bool(after.endpoints):
        raise ValueError("nft_partial: endpoints must stay non-empty on both sides")
    stale = _stale_endpoints(before, after, chain=nft_endpoint_chain)
    lines = _nft_service(after, cluster_cidr=cluster_cidr, elements=False)
    for chain in stale:
        lines += [f"flush chain ip {NFT_TABLE} {chain}", f"delete chain ip {NFT_TABLE} {chain}"]
    return "\n".join(lines) + "\n"


def _nft_setup(*, service_cidr: str, node_ip: str) -> list[str]:
    """kube-proxy's setupNFTables on its first sync: the table and the service-independent part."""
    table = f"ip {NFT_TABLE}"
    lines = [f'add table {table} {{ comment "rules for kube-proxy" ; }}']
    # First sync only: add+delete each base chain so a changed hook or priority can be re-added.
    for name, *_ in _NFT_BASE_CHAINS:
        lines += [f"add chain {table} {name}", f"delete chain {table} {name}"]
    for name, kind, hook, priority in _NFT_BASE_CHAINS:
        lines += [f"add chain {table} {name} {{ type {kind} hook {hook} priority {priority} ; }}",
                  f"flush chain {table} {name}"]  # fmt: skip
    created: set[str] = set()
    for target, source, extra in _NFT_JUMPS:
        lines += _nft_ensure_chain(target, created)
        lines.append(f"add rule {table} {source} {extra + ' ' if extra else ''}jump {target}")
    for chain in ("services", "cluster-ips-check", "masquerading", "mark-for-masquerade"):
        lines += _nft_ensure_chain(chain, created)
    mark = MASQUERADE_MARK
    lines += [
        f"add rule {table} mark-for-masquerade mark set mark or {mark}",
        f"add rule {table} masquerading mark and {mark} == 0 return",
        f"add rule {table} masquerading mark set mark xor {mark}",
        f"add rule {table} masquerading masquerade fully-random",
        f'add set {table} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}',
        f"add rule {table} cluster-ips-check ip daddr @cluster-ips reject"
        ' comment "Reject traffic to invalid ports of ClusterIPs"',
        f"add rule {table} cluster-ips-check ip daddr {{ {service_cidr} }} drop"
        ' comment "Drop traffic to unallocated ClusterIPs"',
        f"add set {table} nodeport-ips"
        ' { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }',
        f"flush set {table} nodeport-ips",
        f"add element {table} nodeport-ips {{ {node_ip} }}",
    ]
    lines += [f'add map {table} {name} {{ type {kind} ; comment "{comment}" ; }}'
              for name, kind, comment in _NFT_MAPS[:2]]  # fmt: skip
    lines += [
        f"add chain {table} reject-chain"
        ' { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }',
        f"flush chain {table} reject-chain",
        f"add rule {table} reject-chain reject",
        f"add rule {table} service-endpoints-check ip daddr . meta l4proto . th dport"
        " vmap @no-endpoint-services",
        f"add rule {table} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport"
        " vmap @no-endpoint-nodeports",
    ]
    name, kind, comment = _NFT_MAPS[2]
    lines.append(f'add map {table} {name} {{ type {kind} ; comment "{comment}" ; }}')
    lines += _nft_ensure_chain("firewall-check", created)
    lines.append(
        f"add rule {table} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    )
    lines += [f'add map {table} {name} {{ type {kind} ; comment "{comment}" ; }}'
              for name, kind, comment in _NFT_MAPS[3:]]  # fmt: skip
    lines += [
        f"add rule {table} services ip daddr . meta l4proto . th dport vmap @service-ips",
        f"add rule {table} services ip daddr @nodeport-ips meta l4proto . th dport"
        " vmap @service-nodeports",
        f"flush set {table} cluster-ips",
    ]
    # Element storages are reset in this order: cluster-ips, then the maps.
    for name in ("service-ips", "firewall-ips", "no-endpoint-services", "no-endpoint-nodeports",
                 "service-nodeports"):  # fmt: skip
        lines.append(f"flush map {table} {name}")
    return lines


def _nft_ensure_chain(chain: str, created: set[str]) -> list[str]:
    # kube-proxy's ensureChain: add and flush a chain once per transaction.
    if chain in created:
        return []
    created.add(chain)
    return [f"add chain ip {NFT_TABLE} {chain}", f"flush chain ip {NFT_TABLE} {chain}"]


def _nft_service(svc: BenchService, *, cluster_cidr: str, elements: bool) -> list[str]:
    """One service's part of the transaction, in syncProxyRules' order."""
    table = f"ip {NFT_TABLE}"
    endpoints = _ordered_endpoints(svc)
    svc_chain = nft_service_chain(svc)
    created: set[str] = set()
    lines: list[str] = []
    for endpoint in endpoints:
        lines += _nft_ensure_chain(nft_endpoint_chain(svc, endpoint), created)
    if endpoints:
        lines += _nft_ensure_chain(svc_chain, created)
    key = f"{svc.cluster_ip} . {svc.proto} . {svc.port}"
    if elements:
        lines.append(f"add element {table} cluster-ips {{ {svc.cluster_ip} }}")
        if endpoints:
            lines.append(f"add element {table} service-ips {{ {key} : goto {svc_chain} }}")
        else:
            lines.append(
                f"add element {table} no-endpoint-services"
                f' {{ {key} comment "{svc.port_name_string}" : goto reject-chain }}'
            )
    if not endpoints:
        return lines
    choices = " , ".join(
        f"{i} : goto {nft_endpoint_chain(svc, ep)}" for i, ep in enumerate(endpoints)
    )
    lines += [
        f"add rule {table} {svc_chain} ip daddr {svc.cluster_ip} ip saddr != {cluster_cidr}"
        " jump mark-for-masquerade",
        f"add rule {table} {svc_chain} numgen random mod {len(endpoints)} vmap {{ {choices} }}",
    ]
    for endpoint in endpoints:
        ep_chain = nft_endpoint_chain(svc, endpoint)
        lines += [
            f"add rule {table} {ep_chain} ip saddr {endpoint[0]} jump mark-for-masquerade",
            f"add rule {table} {ep_chain} meta l4proto {svc.proto}"
            f" dnat to {_endpoint_string(endpoint)}",
        ]
    return lines


# --- partial-update helpers --------------------------------------------------------------------


def _check_partial(
    before: BenchService, after: BenchService, services: Sequence[BenchService] | None
) -> None:
    if not before.same_port(after):
        raise ValueError(f"partial update: {before.port_name_string} and {after.port_name_string}"
                         " are not the same service port")  # fmt: skip
    if services is not None and after not in services:
        raise ValueError(f"partial update: services lacks {after.port_name_string} as changed")


def _stale_endpoints(
    before: BenchService,
    after: BenchService,
    *,
    chain: Callable[[BenchService, tuple[str, int]], str],
) -> list[str]:
    kept = set(_ordered_endpoints(after))
    return [chain(before, ep) for ep in _ordered_endpoints(before) if ep not in kept]


# --- installing --------------------------------------------------------------------------------


def iptables_backend() -> str:
    """Return the iptables-restore binary used: `iptables-nft-restore` if present.

    Kube-proxy's image defaults to the nft backend of iptables, hence the preference; a plain
    `iptables-restore` is whichever backend the alternatives system points at (see
    `iptables_version`).

    Raises:
        RuleInstallError: neither binary is installed.
    """
    for name in ("iptables-nft-restore", "iptables-restore"):
        if shutil.which(name):
            return name
    raise RuleInstallError("no iptables-restore: apt-get install iptables")


def iptables_version() -> str:
    """Return the backend's version line, e.g. "iptables-restore v1.8.9 (nf_tables)"."""
    done = subprocess.run([iptables_backend(), "--version"], capture_output=True, text=True,
                          timeout=10, check=False)  # fmt: skip
    return (done.stdout or done.stderr).strip()


def enable_bridge_netfilter(netns: str) -> None:
    """Send bridged IPv4/IPv6 traffic in the netns through netfilter (iptables and nft alike).

    Pods on one bridge reach each other at layer 2: without this the backend's reply to a DNATed
    connection skips conntrack, is never un-NATed, and the client drops it. The sysctls are per
    netns; only the given one is changed.

    Raises:
        RuleInstallError: the netns does not exist, or the kernel has no br_netfilter.
    """
    settings = ("net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1")
    _run(["sysctl", "-q", "-w", *settings], netns=netns)


def install_iptables(netns: str, rules: str) -> Timing:
    """Enable bridge netfilter, then load rules with iptables-restore in the netns, timed.

    Args:
        netns: a named network namespace (never the host's).
        rules: text from `iptables_rules`.

    Returns:
        The restore command's wall time and CPU time (the sysctl step is not timed).

    Raises:
        RuleInstallError: the netns is missing or the restore failed (its stderr included).
    """
    enable_bridge_netfilter(netns)
    return _run_timed([iptables_backend(), *_RESTORE_FLAGS], netns=netns, input_text=rules)


def install_nft(netns: str, rules: str) -> Timing:
    """Enable bridge netfilter, then load rules with `nft -f -` in the netns, timed.

    Args:
        netns: a named network namespace (never the host's).
        rules: text from `nft_rules`.

    Returns:
        The nft command's wall time and CPU time (the sysctl step is not timed).

    Raises:
        RuleInstallError: the netns is missing or nft failed (its stderr included).
    """
    enable_bridge_netfilter(netns)
    return _run_timed(["nft", "-f", "-"], netns=netns, input_text=rules)


def apply_iptables_partial(netns: str, rules: str) -> Timing:
    """Load a partial update (from `iptables_partial`) with iptables-restore --noflush, timed.

    Raises:
        RuleInstallError: the netns is missing or the restore failed (its stderr included).
    """
    return _run_timed([iptables_backend(), *_RESTORE_FLAGS], netns=netns, input_text=rules)


def apply_nft_partial(netns: str, rules: str) -> Timing:
    """Load a partial update (from `nft_partial`) with `nft -f -`, timed.

    Raises:
        RuleInstallError: the netns is missing or nft failed (its stderr included).
    """
    return _run_timed(["nft", "-f", "-"], netns=netns, input_text=rules)


def check_iptables(netns: str, rules: str) -> None:
    """Parse and dry-run rules with `iptables-restore --test` in the netns; nothing is changed.

    Raises:
        RuleInstallError: the rules were rejected (stderr and the offending line included).
    """
    _run([iptables_backend(), "--test", *_RESTORE_FLAGS], netns=netns, input_text=rules)


def check_nft(netns: str, rules: str) -> None:
    """Check rules with `nft -c -f -` in the netns (the kernel validates, nothing is committed).

    Raises:
        RuleInstallError: the rules were rejected (stderr included).
    """
    _run(["nft", "-c", "-f", "-"], netns=netns, input_text=rules)


def remove_iptables(netns: str) -> None:
    """Remove every KUBE-* chain and every jump to one from the netns's nat and filter tables.

    Like kube-proxy's CleanupLeftovers, plus KUBE-MARK-MASQ and KUBE-FIREWALL (which kube-proxy
    leaves to kubelet). With the nft backend, a table left with nothing but empty builtin chains
    is deleted too: its hooks would otherwise still cost every packet in a later benchmark.

    Raises:
        RuleInstallError: the netns is missing or a command failed (its stderr included).
    """
    restore = iptables_backend()
    save = restore.replace("-restore", "-save")
    for table in _IPTABLES_TABLES:
        dump = _run([save, "-t", table], netns=netns)
        payload = _cleanup_payload(table, dump)
        if payload:
            _run([restore, *_RESTORE_FLAGS], netns=netns, input_text=payload)
        if "nft" in restore:
            _drop_empty_xtables_table(netns, table=table, save=save)


def remove_nft(netns: str) -> None:
    """Delete table `ip kube-proxy` from the netns (nothing to do if it is absent).

    Raises:
        RuleInstallError: the netns is missing or nft failed otherwise.
    """
    if f"table ip {NFT_TABLE}" in _nft_tables(netns):
        _run(["nft", "delete", "table", "ip", NFT_TABLE], netns=netns)


def _cleanup_payload(table: str, dump: str) -> str:
    """restore --noflush input that drops the KUBE-* chains of one iptables-save table dump."""
    chains: list[str] = []
    unlinks: list[str] = []
    for line in dump.splitlines():
        if match := _KUBE_CHAIN_RE.match(line):
            chains.append(match[1])
        elif line.startswith("-A ") and " -j KUBE-" in line and line.split()[1] in _BUILTIN_CHAINS:
            unlinks.append("-D " + line[3:])
    if not chains and not unlinks:
        return ""
    # Unlink first, then flush every KUBE chain (a chain line flushes it), then delete them all.
    lines = [f"*{table}", *unlinks, *(_chain_line(c) for c in chains), *(f"-X {c}" for c in chains)]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def _drop_empty_xtables_table(netns: str, *, table: str, save: str) -> None:
    if f"table ip {table}" not in _nft_tables(netns):
        return
    dump = _run([save, "-t", table], netns=netns)
    chain_names = [line[1:].split()[0] for line in dump.splitlines() if line.startswith(":")]
    has_rules = any(line.startswith("-A ") for line in dump.splitlines())
    if not has_rules and set(chain_names) <= _BUILTIN_CHAINS:
        _run(["nft", "delete", "table", "ip", table], netns=netns)


def _nft_tables(netns: str) -> str:
    return _run(["nft", "list", "tables"], netns=netns)


def _netns_argv(netns: str, argv: Sequence[str]) -> list[str]:
    path = _NETNS_DIR / netns
    if not netns or "/" in netns or not path.exists():
        raise RuleInstallError(f"no network namespace {netns!r} (refusing to touch the host's)")
    # nsenter execs in place: the timed pid is the tool itself, and only the netns changes.
    return ["nsenter", f"--net={path}", "--", *argv]


def _run(argv: Sequence[str], *, netns: str, input_text: str | None = None) -> str:
    full = _netns_argv(netns, argv)
    try:
        done = subprocess.run(full, input=input_text, capture_output=True, text=True, timeout=600,
                              check=False)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise RuleInstallError(f"{argv[0]} in netns {netns}: timed out") from exc
    if done.returncode != 0:
        raise _failure(argv, netns=netns, code=done.returncode, output=done.stderr + done.stdout,
                       input_text=input_text)  # fmt: skip
    return done.stdout


def _run_timed(argv: Sequence[str], *, netns: str, input_text: str) -> Timing:
    """Run argv in the netns with input_text on stdin; time that process alone.

    Wall time runs from fork to reaping, so it includes the tool's start (a few milliseconds).
    """
    full = _netns_argv(netns, argv)
    # Files, not pipes: multi-megabyte inputs need no writer thread, and reaping with wait4
    # ourselves (for the child's rusage) cannot deadlock on a full pipe.
    with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as output:
        stdin.write(input_text.encode())
        stdin.seek(0)
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdin=stdin, stdout=output, stderr=output)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            output.seek(0)
            text = output.read().decode(errors="replace")
            raise _failure(
                argv, netns=netns, code=proc.returncode, output=text, input_text=input_text
            )
    return Timing(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
    )


def _failure(
    argv: Sequence[str], *, netns: str, code: int, output: str, input_text: str | None
) -> RuleInstallError:
    message = f"{argv[0]} in netns {netns} exited {code}: {output.strip()}"
    # iptables-restore names the failing line ("line 12 failed"); show it, the input is large.
    match = _RESTORE_LINE_RE.search(output)
    if match and input_text:
        lines = input_text.splitlines()
        number = int(match[1])
        if 0 < number <= len(lines):
            message += f"\n  line {number}: {lines[number - 1]}"
    return RuleInstallError(message)
