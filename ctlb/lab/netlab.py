"""A fake Kubernetes node on this machine: a node netns with a bridge; pods as netns + cgroups.

`Lab` builds it and undoes it; every resource is recorded the moment it exists and torn down in
reverse, so a setup that fails half way leaves nothing behind. Names carry the creating pid
(`ctlbt<pid>x<n>`), which lets `sweep` remove what a crashed run left without touching the labs
of runs that are still alive.

Layout of a lab with prefix P::

    netns P-node   lo, br0 (10.244.0.1/24, fd00:10:244::1/64), vethN (bridge ports), forwarding on
    netns P-NAME   lo, eth0 (10.244.0.N/24, fd00:10:244::N/64), default routes via br0
    cgroup <cgroup2 mount>/P                      the cgroup root tests attach programs to
           P/node.slice                           processes "on the node"
           P/kubepods.slice/.../cri-containerd-<id>.scope   a pod's container (systemd driver)
"""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import itertools
import os
import re
import secrets
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctlb import statefile
from ctlb.lab import _proc, cgroups, errors, netns

FAMILY = "ctlbt"
POD_NET4 = ipaddress.IPv4Network("10.244.0.0/24")
POD_NET6 = ipaddress.IPv6Network("fd00:10:244::/64")
NODE_IPV4 = POD_NET4[1]
NODE_IPV6 = POD_NET6[1]
BRIDGE = "br0"
POD_IFNAME = "eth0"
NODE_CGROUP = "node.slice"

# The only global mutable state: a counter that makes prefixes unique within this process.
_counter = itertools.count(1)

_PREFIX_RE = re.compile(rf"^{FAMILY}(\d+)x\d+(?:-|$)")
_POD_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$")
_ENTRY_TIMEOUT_S = 5.0
_ENTRY_POLL_S = 0.001
_FIRST_POD_HOST = 2
_LAST_POD_HOST = 254
# A fixed MAC keeps br0's address stable: by default a bridge takes its lowest port MAC, which
# would change under the pods' neighbour caches each time a pod is added.
_BRIDGE_MAC = "02:00:0a:f4:00:01"
# Join the cgroup first, then the netns: `echo $$` moves this very shell, and exec keeps the pid,
# so the program is in the cgroup before its first instruction. nsenter (unlike `ip netns exec`)
# leaves the mount namespace alone, so the program still sees the host's /sys/fs/cgroup.
_ENTER_SCRIPT = 'procs=$1; ns=$2; shift 2; echo $$ > "$procs" && exec nsenter --net="$ns" -- "$@"'


def new_prefix() -> str:
    """Return a fresh lab prefix, `ctlbt<pid>x<n>`, unique among live processes."""
    return f"{FAMILY}{os.getpid()}x{next(_counter)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Place:
    """Somewhere to run processes: a network namespace plus the cgroup they are put in."""

    netns: str
    cgroup: Path
    ipv4: ipaddress.IPv4Address | None
    ipv6: ipaddress.IPv6Address | None
    _procs: _proc.Processes = field(repr=False, compare=False)

    @property
    def addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """The place's addresses, IPv4 first."""
        return [addr for addr in (self.ipv4, self.ipv6) if addr is not None]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv inside this netns and cgroup, in a new session the lab kills on close.

        Args:
            argv: program and arguments (looked up on PATH).
            kwargs: passed to `subprocess.Popen` (stdout, stderr, text, env, ...);
                `start_new_session` is always forced on.

        Returns:
            The process, already in this cgroup and netns; its pid is argv's own (the wrapper
            execs into it).

        Raises:
            errors.LabError: the process did not get into the netns in time.
        """
        ns_path = netns.path(self.netns)
        wrapper = [
            "sh", "-c", _ENTER_SCRIPT, "sh", str(self.cgroup / "cgroup.procs"), str(ns_path), *argv,
        ]  # fmt: skip
        proc = self._procs.spawn(wrapper, **kwargs)
        self._await_entry(proc, ns_path)
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 10.0,
        check: bool = False,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv here to completion and capture its output as text.

        Raises:
            subprocess.TimeoutExpired: it ran longer than timeout (it is killed first).
            subprocess.CalledProcessError: check is set and it exited non-zero.
        """
        stdin = subprocess.PIPE if input_text is not None else subprocess.DEVNULL
        proc = self.popen(
            argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            out, err = proc.communicate(input_text, timeout=timeout)
        except subprocess.TimeoutExpired:
            self._procs.kill(proc)
            raise
        done = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    def python(
        self, code: str, *, timeout: float = 10.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run `python -c code` here (same interpreter as the caller) and capture its output.

        Raises:
            subprocess.TimeoutExpired: it ran longer than timeout.
            subprocess.CalledProcessError: check is set and it exited non-zero.
        """
        return self.run([sys.executable, "-c", code], timeout=timeout, check=check)

    def kill(self, proc: subprocess.Popen[Any]) -> None:
        """Kill a process started here (its whole process group) and reap it."""
        self._procs.kill(proc)

    def _await_entry(self, proc: subprocess.Popen[Any], ns_path: Path) -> None:
        """Wait until proc is in the netns, so callers can rely on where it is at once.

        The wrapper joins the cgroup before the netns, so being in the netns implies both.
        A process that exits first is left for the caller to judge by its exit status.
        """
        target = os.stat(ns_path).st_ino
        deadline = time.monotonic() + _ENTRY_TIMEOUT_S
        while proc.poll() is None:
            try:
                if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == target:
                    return
            except FileNotFoundError:
                return  # exited between poll() and stat(): same as exited
            if time.monotonic() > deadline:
                self._procs.kill(proc)
                raise errors.LabError(f"pid {proc.pid} did not enter netns {self.netns}")
            time.sleep(_ENTRY_POLL_S)


@dataclass(frozen=True, slots=True, kw_only=True)
class Node(Place):
    """The node: its netns holds the bridge every pod hangs off; its processes run in node.slice."""

    bridge: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Pod(Place):
    """A pod: its own netns behind a veth on the node bridge, and a kubelet-named cgroup."""

    name: str
    namespace: str
    uid: str
    qos: cgroups.QosClass
    driver: cgroups.CgroupDriver
    container_id: str
    pod_cgroup: Path
    node_ifname: str


class Lab:
    """A fake node with pods; a context manager that removes everything it made on exit.

    Example::

        with Lab() as lab:
            a, b = lab.add_pod("a"), lab.add_pod("b", ipv6=True)
            print(a.run(["ip", "addr"]).stdout)
    """

    def __init__(self, *, prefix: str | None = None) -> None:
        """Build the node netns, bridge and cgroup root.

        Args:
            prefix: names every resource; defaults to `new_prefix()`. Keep it short: it is
                the first part of the netns names and the cgroup root's name.

        Raises:
            errors.LabError: a step failed; whatever was made before it is already removed.
        """
        self.prefix = prefix if prefix is not None else new_prefix()
        self._procs = _proc.Processes()
        self._undo = contextlib.ExitStack()
        self._pods: dict[str, Pod] = {}
        self._hosts = itertools.count(_FIRST_POD_HOST)
        self._mount = cgroups.mount_point()
        self.cgroup_root: Path = self._mount / self.prefix
        with self._closing_on_error():
            self.node: Node = self._build_node()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pods(self) -> Mapping[str, Pod]:
        """The pods added so far, by name."""
        return types.MappingProxyType(self._pods)

    def add_pod(
        self,
        name: str,
        *,
        namespace: str = "default",
        ipv4: bool = True,
        ipv6: bool = False,
        qos: cgroups.QosClass | str = cgroups.QosClass.BESTEFFORT,
        driver: cgroups.CgroupDriver | str = cgroups.CgroupDriver.SYSTEMD,
    ) -> Pod:
        """Add a pod: netns `<prefix>-<name>`, a veth to br0, addresses, routes and its cgroups.

        Args:
            name: pod name, a DNS label; unique within the lab, and not "node".
            namespace: Kubernetes namespace (only recorded).
            ipv4: give it the next address in 10.244.0.0/24.
            ipv6: give it the matching address in fd00:10:244::/64.
            qos: QoS class, which decides the kubelet cgroup path.
            driver: kubelet cgroup driver ("systemd" or "cgroupfs").

        Returns:
            The pod; its processes run in `pod.cgroup` (the container's leaf cgroup).

        Raises:
            ValueError: bad name, duplicate name, no address family, unknown qos or driver.
            errors.LabError: a step failed; what it made is removed on `close()`.
        """
        qos, driver = cgroups.QosClass(qos), cgroups.CgroupDriver(driver)
        _check_pod_name(name, taken=self._pods.keys())
        if not (ipv4 or ipv6):
            raise ValueError(f"pod {name}: needs ipv4 or ipv6")
        host = next(self._hosts)
        if host > _LAST_POD_HOST:
            raise errors.LabError(f"pod {name}: no free address in {POD_NET4}")
        addr4 = POD_NET4[host] if ipv4 else None
        addr6 = POD_NET6[host] if ipv6 else None
        pod_ns = f"{self.prefix}-{name}"
        node_ifname = f"veth{host}"
        self._add_netns(pod_ns)
        self._wire_pod(pod_ns, node_ifname=node_ifname, addr4=addr4, addr6=addr6)
        uid = str(uuid.uuid4())
        container_id = secrets.token_hex(32)
        pod_cgroup = self._make_cgroups(cgroups.pod_cgroup_parts(uid=uid, qos=qos, driver=driver))
        leaf = self._make_cgroups(
            (cgroups.container_cgroup_name(container_id=container_id, driver=driver),),
            under=pod_cgroup,
        )
        pod = Pod(
            netns=pod_ns, cgroup=leaf, ipv4=addr4, ipv6=addr6, _procs=self._procs,
            name=name, namespace=namespace, uid=uid, qos=qos, driver=driver,
            container_id=container_id, pod_cgroup=pod_cgroup, node_ifname=node_ifname,
        )  # fmt: skip
        self._pods[name] = pod
        return pod

    def close(self) -> None:
        """Kill every process the lab started, then remove pods, node and cgroups in reverse.

        Safe to call twice. Every step is tried even when an earlier one fails.

        Raises:
            errors.LabError: some resource could not be removed (the first such failure).
        """
        self._pods.clear()
        try:
            self._procs.kill_all()
        finally:
            self._undo.close()

    def _build_node(self) -> Node:
        self._make_cgroups((self.prefix,), under=self._mount, exist_ok=False)
        node_ns = f"{self.prefix}-node"
        self._add_netns(node_ns)
        netns.sysctl(
            node_ns,
            {
                "net.ipv4.ip_forward": "1",
                "net.ipv6.conf.all.forwarding": "1",
                # Bridge ports are born here: skip DAD so their link-local addresses are usable
                # at once.
                "net.ipv6.conf.default.accept_dad": "0",
            },
        )
        netns.ip_batch(
            node_ns,
            [
                "link set lo up",
                f"link add {BRIDGE} address {_BRIDGE_MAC} type bridge forward_delay 0",
                f"link set {BRIDGE} up",
                f"addr add {NODE_IPV4}/{POD_NET4.prefixlen} dev {BRIDGE}",
                f"addr add {NODE_IPV6}/{POD_NET6.prefixlen} dev {BRIDGE} nodad",
            ],
        )
        node_cgroup = self._make_cgroups((NODE_CGROUP,), under=self.cgroup_root)
        return Node(
            netns=node_ns, cgroup=node_cgroup, ipv4=NODE_IPV4, ipv6=NODE_IPV6,
            _procs=self._procs, bridge=BRIDGE,
        )  # fmt: skip

    def _wire_pod(
        self,
        pod_ns: str,
        *,
        node_ifname: str,
        addr4: ipaddress.IPv4Address | None,
        addr6: ipaddress.IPv6Address | None,
    ) -> None:
        if addr6 is not None:
            # Set before eth0 arrives so its link-local address is not held tentative.
            netns.sysctl(pod_ns, {"net.ipv6.conf.default.accept_dad": "0"})
        # Created in the node netns with the peer sent straight into the pod: no veth end ever
        # exists in the host's namespace, and the names only need to be unique per namespace.
        netns.ip_batch(
            self.node.netns,
            [
                f"link add {node_ifname} type veth peer name {POD_IFNAME} netns {pod_ns}",
                f"link set {node_ifname} master {BRIDGE} up",
            ],
        )
        commands = ["link set lo up", f"link set {POD_IFNAME} up"]
        if addr4 is not None:
            commands += [
                f"addr add {addr4}/{POD_NET4.prefixlen} dev {POD_IFNAME}",
                f"route add default via {NODE_IPV4} dev {POD_IFNAME}",
            ]
        if addr6 is not None:
            commands += [
                f"addr add {addr6}/{POD_NET6.prefixlen} dev {POD_IFNAME} nodad",
                f"route add default via {NODE_IPV6} dev {POD_IFNAME}",
            ]
        netns.ip_batch(pod_ns, commands)

    def _add_netns(self, name: str) -> None:
        netns.add(name)
        self._undo.callback(netns.delete, name)

    def _make_cgroups(
        self, parts: Sequence[str], *, under: Path | None = None, exist_ok: bool = True
    ) -> Path:
        """Create the cgroups along parts below under (default: the cgroup root), return the last.

        Levels shared with earlier pods (kubepods.slice, ...) already exist and are left to
        whoever made them; each level made here is recorded for removal.
        """
        path = under if under is not None else self.cgroup_root
        for part in parts:
            path = path / part
            try:
                path.mkdir()
            except FileExistsError as exc:
                if not exist_ok:
                    raise errors.LabError(f"cgroup {path} exists already") from exc
                continue
            self._undo.callback(cgroups.remove_tree, path)
        return path

    @contextlib.contextmanager
    def _closing_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            try:
                self.close()
            except errors.LabError as cleanup:
                exc.add_note(f"lab cleanup also failed: {cleanup}")
            raise


def leftovers(prefix: str) -> list[str]:
    """Return the netns names and cgroup paths of the lab with this prefix that still exist."""
    found = [name for name in netns.names() if name.startswith(f"{prefix}-")]
    root = cgroups.mount_point() / prefix
    if root.exists():
        found.append(str(root))
    return found


def sweep(prefix_glob: str = f"{FAMILY}*") -> list[str]:
    """Remove lab netns and cgroups left by earlier runs whose creating process is gone.

    Only names of the form `ctlbt<pid>x<n>...` whose pid is no longer alive are touched, so the
    labs of concurrent runs survive. Processes inside them are killed first.

    Args:
        prefix_glob: which names to consider (fnmatch pattern).

    Returns:
        What was removed: cgroup paths and netns names.

    Raises:
        errors.LabError: something could not be removed (everything else was still tried).
    """
    removed: list[str] = []
    failures: list[errors.LabError] = []
    mount = cgroups.mount_point()
    stale_cgroups = [
        entry
        for entry in sorted(mount.iterdir())
        if entry.is_dir() and fnmatch.fnmatch(entry.name, prefix_glob) and _orphaned(entry.name)
    ]
    stale_netns = [
        name for name in netns.names() if fnmatch.fnmatch(name, prefix_glob) and _orphaned(name)
    ]
    for path in stale_cgroups:
        try:
            cgroups.remove_tree(path)
            removed.append(str(path))
        except errors.LabError as exc:
            failures.append(exc)
    for name in stale_netns:
        try:
            netns.delete(name)
            removed.append(name)
        except errors.LabError as exc:
            failures.append(exc)
    if failures:
        raise errors.LabError(f"sweep left {len(failures)} item(s): {failures[0]}")
    return removed


def _orphaned(name: str) -> bool:
    match = _PREFIX_RE.match(name)
    return match is not None and not statefile.pid_alive(int(match[1]))


def _check_pod_name(name: str, *, taken: Collection[str]) -> None:
    if not _POD_NAME_RE.match(name):
        raise ValueError(f"pod name {name!r}: not a short DNS label")
    if name == "node":
        raise ValueError("pod name 'node': taken by the node's netns")
    if name in taken:
        raise ValueError(f"pod {name}: exists already")
