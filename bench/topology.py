"""The benchmark's node: client and backend pods, N Services, and the four ways to reach them.

Modes are what a cluster would run instead of one another: `direct` (no Service, the floor),
`ctlb` (the agent, programs attached to the ctlb client pod's cgroup), `iptables` and `nftables`
(rules in the shape kube-proxy writes, in the node's network namespace). Only one mode's rules
exist while it is measured, as on a real node.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import pathlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import yaml

from bench import kubeproxy, loadgen
from ctlb import lab as ctlb_lab, statefile
from ctlb.lab import servers

CLIENT_CPU = 0
SERVER_CPU = 1

PORT_CRR = 80  # connect-rate target: accept and reset
PORT_RR = 81  # established request/response: echo
PORT_UDP = 53
PORT_IPERF = 5201
BACKEND_PORTS = {PORT_CRR: 8080, PORT_RR: 8081, PORT_UDP: 9090, PORT_IPERF: 5201}
# iperf3 opens a control and a data connection that must reach the same server, so throughput
# goes through a Service of its own with one endpoint.
IPERF_IP = "10.96.255.254"
NEW_BACKEND_PORT = 8080  # the pod an endpoint change moves to answers HTTP here


class Mode(enum.StrEnum):
    DIRECT = "direct"
    CTLB = "ctlb"
    IPTABLES = "iptables"
    NFTABLES = "nftables"


def cluster_ip(index: int) -> str:
    return str(ipaddress.IPv4Address("10.96.0.0") + 1 + index)


@dataclass(frozen=True, slots=True)
class Targets:
    """Where a mode's client dials, per measured port: the first and the last Service."""

    first: str
    last: str
    iperf: str
    direct: bool = False

    def port(self, service_port: int) -> int:
        return BACKEND_PORTS[service_port] if self.direct else service_port


class BenchNode:
    """One lab with the backends running; Services are loaded per N."""

    def __init__(self, the_lab: ctlb_lab.Lab, work: pathlib.Path) -> None:
        self.lab = the_lab
        self.work = work
        self.backends = [the_lab.add_pod(f"be{i}") for i in range(4)]
        self.new_backend = the_lab.add_pod("benew")
        self.ctlb_client = the_lab.add_pod("cctlb")
        self.plain_client = the_lab.add_pod("cplain")
        self.bpffs = pathlib.Path("/sys/fs/bpf") / f"{the_lab.prefix}-bench"
        self.run_dir = work / "run"
        self.manifests = work / "manifests"
        self.agent: subprocess.Popen[bytes] | None = None
        self.services: list[kubeproxy.BenchService] = []
        kubeproxy.enable_bridge_netfilter(the_lab.node.netns)
        for client in (self.ctlb_client, self.plain_client):
            loadgen.tune(client)
        self._start_servers()

    def _start_servers(self) -> None:
        for pod in self.backends:
            loadgen.start_tcp_server(pod, port=BACKEND_PORTS[PORT_CRR], cpu=SERVER_CPU)
            loadgen.start_tcp_server(pod, port=BACKEND_PORTS[PORT_RR], echo=True, cpu=SERVER_CPU)
            loadgen.start_udp_server(pod, port=BACKEND_PORTS[PORT_UDP], cpu=SERVER_CPU)
            pod.popen(["taskset", "-c", str(SERVER_CPU), "iperf3", "-s", "-p", str(PORT_IPERF)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers.start_http(self.new_backend, name="new", port=NEW_BACKEND_PORT)

    # --- Services -----------------------------------------------------------------------------

    def load_services(self, n: int) -> None:
        """N Services of 4 endpoints; the first and the last carry every measured port."""
        endpoints = [str(p.ipv4) for p in self.backends]
        self.services = [kubeproxy.BenchService(
            namespace="bench", name="iperf", cluster_ip=IPERF_IP, port=PORT_IPERF, protocol="TCP",
            endpoints=((endpoints[0], PORT_IPERF),), port_name=f"p{PORT_IPERF}")]
        for i in range(n):
            ports = [PORT_CRR, PORT_RR, PORT_UDP] if i in (0, n - 1) else [PORT_CRR]
            for port in ports:
                self.services.append(kubeproxy.BenchService(
                    namespace="bench", name=f"svc-{i}", cluster_ip=cluster_ip(i), port=port,
                    protocol="UDP" if port == PORT_UDP else "TCP",
                    endpoints=tuple((ip, BACKEND_PORTS[port]) for ip in endpoints), port_name=f"p{port}"))
        self._write_manifests(n)

    def targets(self, mode: Mode, n: int) -> Targets:
        if mode is Mode.DIRECT:
            be = str(self.backends[0].ipv4)
            return Targets(first=be, last=be, iperf=be, direct=True)
        return Targets(first=cluster_ip(0), last=cluster_ip(n - 1), iperf=IPERF_IP)

    def client(self, mode: Mode) -> ctlb_lab.Pod:
        return self.ctlb_client if mode is Mode.CTLB else self.plain_client

    def _write_manifests(self, n: int) -> None:
        """The last Service (whose endpoint the change test moves) in a file of its own, the
        rest in files of 1000 Services: the manifest source re-reads only what changed."""
        if self.manifests.exists():
            for f in self.manifests.iterdir():
                f.unlink()
        self.manifests.mkdir(parents=True, exist_ok=True)
        by_service: dict[str, list[kubeproxy.BenchService]] = {}
        for s in self.services:
            by_service.setdefault(s.name, []).append(s)
        names = list(by_service)
        self._write(self.manifests / "target.yaml", _objects(by_service[names[-1]]))
        rest = names[:-1]
        for start in range(0, len(rest), 1000):
            docs = [doc for name in rest[start:start + 1000] for doc in _objects(by_service[name])]
            self._write(self.manifests / f"bulk-{start:06d}.yaml", docs)

    @staticmethod
    def _write(path: pathlib.Path, docs: list[dict[str, Any]]) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.dump_all(docs, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False))
        os.replace(tmp, path)

    def last_service(self, *, moved: bool) -> list[kubeproxy.BenchService]:
        """The last Service's ports, as loaded or with every endpoint moved to the `benew` pod."""
        ports = [s for s in self.services if s.name == self.services[-1].name]
        if not moved:
            return ports
        new = ((str(self.new_backend.ipv4), NEW_BACKEND_PORT),)
        return [replace(s, endpoints=new) for s in ports]

    def write_last_service(self, *, moved: bool) -> None:
        self._write(self.manifests / "target.yaml", _objects(self.last_service(moved=moved)))

    # --- ctlb agent ---------------------------------------------------------------------------

    def start_agent(self) -> dict[str, Any]:
        """Starts the agent on the ctlb client's pod cgroup; returns its first sync's figures."""
        self.stop_agent()
        started = time.monotonic()
        log = (self.work / "agent.log").open("ab")
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "ctlb.cli.main", "agent", "--manifests", str(self.manifests),
             "--node-name", "bench-node", "--cgroup", str(self.ctlb_client.pod_cgroup),
             "--bpffs", str(self.bpffs), "--run-dir", str(self.run_dir), "--log-json"],
            stdout=log, stderr=log)
        st = self.wait_synced(after=0, timeout=300)
        return {"start_to_synced_s": time.monotonic() - started, **st.last_sync_timings,
                "cpu_s": process_cpu_seconds(self.agent.pid), "rss_mib": process_rss_mib(self.agent.pid)}

    def wait_synced(self, *, after: int, timeout: float = 60) -> statefile.AgentState:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.agent is not None
            if self.agent.poll() is not None:
                raise RuntimeError(f"agent exited: see {self.work / 'agent.log'}")
            st = statefile.read(self.run_dir)
            if st is not None and st.pid == self.agent.pid and st.syncs > after:
                return st
            time.sleep(0.01)
        raise RuntimeError("agent did not sync in time")

    def stop_agent(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            self.agent.wait(timeout=30)
        self.agent = None
        subprocess.run([sys.executable, "-m", "ctlb.cli.main", "uninstall", "--bpffs", str(self.bpffs),
                        "--run-dir", str(self.run_dir)], capture_output=True, timeout=60)

    # --- kube-proxy rules ---------------------------------------------------------------------

    def install(self, mode: Mode) -> kubeproxy.Timing:
        """Loads a kube-proxy mode's full rule set (timed: the control-plane figure), unhooked.

        A faithful `iptables-restore --noflush` of 10k Services takes minutes, so each mode's
        rules are loaded once per N and the rounds only hook and unhook the entry points, which
        leaves nothing of an unhooked mode on any packet's path.
        """
        netns = self.lab.node.netns
        if mode is Mode.IPTABLES:
            timing = kubeproxy.install_iptables(netns, kubeproxy.iptables_rules(self.services))
        else:
            rules = kubeproxy.nft_rules(self.services)
            self._nft_hooks = _nft_base_chains(rules)
            timing = kubeproxy.install_nft(netns, rules)
        self.unhook(mode)
        return timing

    def hook(self, mode: Mode) -> None:
        netns = self.lab.node.netns
        if mode is Mode.IPTABLES:
            kubeproxy.apply_iptables_partial(netns, _iptables_jumps("-A"))
        elif mode is Mode.NFTABLES:
            kubeproxy.apply_nft_partial(netns, self._nft_hooks)

    def unhook(self, mode: Mode) -> None:
        netns = self.lab.node.netns
        if mode is Mode.IPTABLES:
            kubeproxy.apply_iptables_partial(netns, _iptables_jumps("-D"))
        elif mode is Mode.NFTABLES:
            chains = [line.split()[4] for line in self._nft_hooks.splitlines() if line.startswith("add chain")]
            kubeproxy.apply_nft_partial(netns, "".join(
                f"flush chain ip kube-proxy {c}\ndelete chain ip kube-proxy {c}\n" for c in chains))

    def remove_rules(self) -> None:
        kubeproxy.remove_iptables(self.lab.node.netns)
        kubeproxy.remove_nft(self.lab.node.netns)

    def close(self) -> None:
        self.stop_agent()
        self.remove_rules()


def _iptables_jumps(action: str) -> str:
    """The built-in chains' jumps into kube-proxy's chains, added (-A) or deleted (-D)."""
    out = []
    for table in ("filter", "nat"):
        out.append(f"*{table}")
        out += [action + line.removeprefix("-A") for line in kubeproxy._jump_rules(table)]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def _nft_base_chains(rules: str) -> str:
    """The lines of an nft_rules() text that make and fill the chains hooked into netfilter."""
    base = {line.split()[4] for line in rules.splitlines() if line.startswith("add chain") and " hook " in line}
    keep = [line for line in rules.splitlines()
            if (line.startswith("add chain") and " hook " in line)
            or (line.startswith("add rule") and line.split()[4] in base)]
    return "\n".join(keep) + "\n"


def _objects(ports: list[kubeproxy.BenchService]) -> list[dict[str, Any]]:
    """A Service and its EndpointSlice, as the API shows them, for the ports of one Service."""
    first = ports[0]
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": first.name, "namespace": first.namespace},
           "spec": {"type": "ClusterIP", "clusterIP": first.cluster_ip, "clusterIPs": [first.cluster_ip],
                    "ipFamilies": ["IPv4"],
                    "ports": [{"name": p.port_name, "port": p.port, "protocol": p.protocol,
                               "targetPort": p.endpoints[0][1] if p.endpoints else p.port} for p in ports]},
           "status": {"loadBalancer": {}}}
    addresses = sorted({ip for p in ports for ip, _ in p.endpoints})
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": f"{first.name}-x", "namespace": first.namespace,
                        "labels": {"kubernetes.io/service-name": first.name}},
           "addressType": "IPv4",
           "ports": [{"name": p.port_name, "port": p.endpoints[0][1] if p.endpoints else p.port,
                      "protocol": p.protocol} for p in ports],
           "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in addresses]}
    return [svc, eps]


def process_cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def system_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine: client, server and kernel work all count."""
    fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
