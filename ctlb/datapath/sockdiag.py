"""Ends the sockets left pinned to a peer that no longer serves them, through sock_diag's SOCK_DESTROY.

A connected UDP socket was translated once, at connect; the kernel then sends straight to the
backend and no socket program sees it again. When that backend goes (a DNS pod deleted), kube-proxy
clears the flow's conntrack entry and the next datagram is balanced afresh; with connect-time
balancing the socket would stay pinned to the dead address forever. Destroying it disconnects it:
the application's next send fails with EDESTADDRREQ (a blocked receive with ECONNABORTED), and
resolvers open a new socket, which connect balances over the backends that serve.

The drop action pins sockets the same way, to the drop address: a connected UDP socket, and a TCP
socket still retransmitting its SYN. When its Service stops dropping (an endpoint appeared on this
node), kube-proxy would let the next datagram or SYN through; here those sockets are ended, the TCP
connect failing with ECONNABORTED at once instead of timing out.

What is pinned where is tracked by `PinnedPeers`, seeded at start from the maps the last agent
left, so a backend removed while no agent ran is let go of on the first sync too.

Sockets live in the pods' network namespaces: each is entered from a short-lived thread (setns
changes only the calling thread), found from the processes of the cgroup tree ctlb is attached to.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pathlib
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import structlog

from ctlb import desired, model
from ctlb.datapath import reconcile, tables

log = structlog.get_logger()

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_SOCK_DESTROY = 21
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 0x2
_NLMSG_DONE = 0x3
_TCP_ESTABLISHED = 1  # what a connected UDP socket's state reads as
_TCP_SYN_SENT = 2
_CLONE_NEWNET = 0x40000000

# The socket states that can be pinned to a peer: a connected UDP socket, a TCP connect that
# has not been answered (only the drop address never answers). SCTP sockets are not reachable
# through inet_diag: an SCTP peer is tracked but nothing is destroyed.
_PINNED_STATES = {socket.IPPROTO_UDP: 1 << _TCP_ESTABLISHED, socket.IPPROTO_TCP: 1 << _TCP_SYN_SENT}

_NLMSG_HDR = struct.Struct("=IHHII")
# struct inet_diag_sockid: ports big-endian, addresses as 16 raw bytes, interface, cookie.
_SOCKID = struct.Struct(">HH16s16sI8s")
_REQ_V2 = struct.Struct("=BBBxI")  # family, protocol, ext, states; the sockid follows
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans; the sockid follows

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True, order=True)
class Peer:
    """An address a translated socket can stay pinned to."""

    protocol: model.Protocol
    address: model.IPAddress
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.protocol}"


def drop_address(version: int) -> model.IPAddress:
    return tables.DROP_ADDR4 if version == 4 else tables.DROP_ADDR6


def service_port_peers(sp: desired.ServicePortState | None) -> set[Peer]:
    """The peers sockets of a service port can be pinned to: every backend of a UDP service
    port; the drop address at the port of each frontend that drops, or may drop a client outside
    its source ranges."""
    if sp is None or (sp.name.protocol is not model.Protocol.UDP and not sp.drop and not sp.source_ranges):
        return set()  # a TCP service port that neither drops nor gates (nearly all): no group can pin
    peers: set[Peer] = set()
    for group in sp.frontend_groups():
        if sp.name.protocol is model.Protocol.UDP:
            peers.update(Peer(model.Protocol.UDP, b.address, b.port) for b in group.backends)
        if group.drop or group.restricted:
            peers.update(Peer(fe.protocol, drop_address(fe.address.version), fe.port) for fe in group.frontends)
    return peers


def programmed_peers(programmed: reconcile.Programmed) -> set[Peer]:
    """The peers the programmed maps pin sockets to: what a restarted agent finds left by the
    last one."""
    peers: set[Peer] = set()
    for fe, value in programmed.frontends.items():
        if fe.protocol is model.Protocol.UDP and value.count:
            backends = programmed.sets.get((fe.address.version, value.set_id), ())
            peers.update(Peer(model.Protocol.UDP, b.address, b.port) for b in backends)
        if (not value.count and value.flags & tables.LB_F_DROP) or value.flags & tables.LB_F_SOURCE_RANGES:
            peers.add(Peer(fe.protocol, drop_address(fe.address.version), fe.port))
    return peers


class PinnedPeers:
    """Counts the service ports pinning sockets to each peer, to tell when none does any more.

    A backend that leaves one Service but still serves another is alive: its sockets stay. The
    peers of the maps adopted at start (`adopted`) count until the first update, which lets go of
    those no service port has then: they were removed while no agent was running.
    """

    def __init__(self, adopted: Iterable[Peer] = ()) -> None:
        self._count: Counter[Peer] = Counter()
        self._adopted = set(adopted)

    def update(self, moved: Mapping[desired.ServicePortName, desired.ServicePortState | None],
               current: Mapping[desired.ServicePortName, desired.ServicePortState]) -> set[Peer]:
        """Applies the moved service ports; returns the peers no service port pins to now."""
        left, self._adopted = self._adopted, set()
        for name, previous in moved.items():
            old = service_port_peers(previous)
            new = service_port_peers(current.get(name))
            if old == new:
                continue  # nearly always (both empty): the counter's update costs at 10k service ports
            self._count.update(new - old)
            self._count.subtract(old - new)
            left |= old - new
        gone = {p for p in left if self._count[p] <= 0}
        for peer in gone:
            self._count.pop(peer, None)
        return gone


@dataclass(frozen=True, slots=True)
class _Socket:
    family: int
    protocol: int
    sockid: bytes  # the raw inet_diag_sockid, as the dump gave it: destroy needs it exact


def destroy_sockets_to(peers: Iterable[Peer], *, cgroup: pathlib.Path) -> int:
    """Destroys every socket pinned to one of `peers` (a connected UDP socket, a TCP socket in
    SYN-SENT), in every network namespace of the processes under `cgroup`. Returns how many
    were destroyed."""
    wanted = {(tables.PROTO_NUMBERS[p.protocol], p.address.packed, p.port) for p in peers
              if tables.PROTO_NUMBERS[p.protocol] in _PINNED_STATES}
    if not wanted:
        return 0
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(_destroy_in_namespaces(wanted, cgroup)),
                              name="ctlb-sockdiag")
    worker.start()
    worker.join()
    return result[0] if result else 0


def _destroy_in_namespaces(wanted: set[tuple[int, bytes, int]], cgroup: pathlib.Path) -> int:
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    destroyed = 0
    try:
        for pid in _one_pid_per_netns(cgroup):
            try:
                fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            except OSError:
                continue  # the process exited meanwhile
            try:
                _setns(fd)
                destroyed += _destroy_here(wanted)
            except OSError as exc:
                log.warning("udp_socket_cleanup_failed", pid=pid, error=str(exc))
            finally:
                os.close(fd)
    finally:
        _setns(own)
        os.close(own)
    return destroyed


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _one_pid_per_netns(cgroup: pathlib.Path) -> list[int]:
    seen: dict[int, int] = {}
    for procs in cgroup.rglob("cgroup.procs"):
        try:
            pids = [int(line) for line in procs.read_text().split()]
        except OSError:
            continue  # the cgroup went away while we walked
        for pid in pids:
            try:
                inode = os.stat(f"/proc/{pid}/ns/net").st_ino
            except OSError:
                continue
            seen.setdefault(inode, pid)
    return list(seen.values())


def _destroy_here(wanted: set[tuple[int, bytes, int]]) -> int:
    """Destroys the matching sockets of the calling thread's network namespace."""
    protocols = {proto for proto, _, _ in wanted}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        victims = [s for proto in sorted(protocols) for family in (socket.AF_INET, socket.AF_INET6)
                   for s in _dump(nl, family, proto) if (proto, *_peer(s)) in wanted]
        destroyed = 0
        for victim in victims:
            if _destroy(nl, victim):
                destroyed += 1
        return destroyed


def _peer(s: _Socket) -> tuple[bytes, int]:
    _, dport, _, dst, _, _ = _SOCKID.unpack(s.sockid)
    if s.family == socket.AF_INET:
        return dst[:4], dport
    if dst[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped: an IPv6 socket dialling IPv4
        return dst[12:], dport
    return dst, dport


def _request(family: int, protocol: int, sockid: bytes) -> bytes:
    return _REQ_V2.pack(family, protocol, 0, _PINNED_STATES[protocol]) + sockid


def _dump(nl: socket.socket, family: int, protocol: int) -> list[_Socket]:
    """The sockets of `protocol` and `family` in a state that can be pinned to a peer."""
    empty = _SOCKID.pack(0, 0, b"", b"", 0, b"\xff" * 8)
    _send(nl, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, _request(family, protocol, empty))
    found = []
    for kind, payload in _replies(nl):
        if kind == _NLMSG_DONE:
            break
        if kind == _NLMSG_ERROR:
            _raise_if_error(payload)
            break
        msg_family = payload[0]
        found.append(_Socket(msg_family, protocol, payload[_MSG_HEAD.size:_MSG_HEAD.size + _SOCKID.size]))
    return found


def _destroy(nl: socket.socket, victim: _Socket) -> bool:
    _send(nl, _SOCK_DESTROY, _NLM_F_REQUEST | _NLM_F_ACK, _request(victim.family, victim.protocol, victim.sockid))
    for kind, payload in _replies(nl):
        if kind == _NLMSG_ERROR:
            code = -struct.unpack_from("=i", payload)[0]
            if code in (0, errno.ENOENT):  # ENOENT: it closed before we got to it
                return code == 0
            raise OSError(code, f"SOCK_DESTROY: {os.strerror(code)}")
    return False


def _send(nl: socket.socket, kind: int, flags: int, payload: bytes) -> None:
    nl.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(payload), kind, flags, 0, 0) + payload)


def _replies(nl: socket.socket) -> Iterator[tuple[int, bytes]]:
    while True:
        data = nl.recv(1 << 16)
        offset = 0
        while offset + _NLMSG_HDR.size <= len(data):
            length, kind, _, _, _ = _NLMSG_HDR.unpack_from(data, offset)
            yield kind, data[offset + _NLMSG_HDR.size:offset + length]
            if kind in (_NLMSG_DONE, _NLMSG_ERROR):
                return
            offset += (length + 3) & ~3


def _raise_if_error(payload: bytes) -> None:
    code = -struct.unpack_from("=i", payload)[0]
    if code:
        raise OSError(code, f"sock_diag: {os.strerror(code)}")
