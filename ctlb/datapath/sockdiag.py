"""Ends connected UDP sockets whose backend stopped serving, through sock_diag's SOCK_DESTROY.

A connected UDP socket was translated once, at connect; the kernel then sends straight to the
backend and no socket program sees it again. When that backend goes (a DNS pod deleted), kube-proxy
clears the flow's conntrack entry and the next datagram is balanced afresh; with connect-time
balancing the socket would stay pinned to the dead address forever. Destroying it disconnects it:
the application's next send fails with EDESTADDRREQ (a blocked receive with ECONNABORTED), and
resolvers open a new socket, which connect balances over the backends that serve.

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
_CLONE_NEWNET = 0x40000000

_NLMSG_HDR = struct.Struct("=IHHII")
# struct inet_diag_sockid: ports big-endian, addresses as 16 raw bytes, interface, cookie.
_SOCKID = struct.Struct(">HH16s16sI8s")
_REQ_V2 = struct.Struct("=BBBxI")  # family, protocol, ext, states; the sockid follows
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans; the sockid follows

_libc = ctypes.CDLL(None, use_errno=True)


class UdpBackends:
    """Counts the UDP service ports each backend serves, to tell when one serves none any more.

    A backend that leaves one Service but still serves another is alive: its sockets stay.
    """

    def __init__(self) -> None:
        self._count: Counter[desired.Backend] = Counter()

    def update(self, moved: Mapping[desired.ServicePortName, desired.ServicePortState | None],
               current: Mapping[desired.ServicePortName, desired.ServicePortState]) -> set[desired.Backend]:
        """Applies the moved service ports; returns the backends no UDP service port has now."""
        left: set[desired.Backend] = set()
        for name, previous in moved.items():
            if name.protocol is not model.Protocol.UDP:
                continue
            old = _all_backends(previous)
            new = _all_backends(current.get(name))
            self._count.update(new - old)
            self._count.subtract(old - new)
            left |= old - new
        gone = {b for b in left if self._count[b] <= 0}
        for backend in gone:
            del self._count[backend]
        return gone


def _all_backends(sp: desired.ServicePortState | None) -> set[desired.Backend]:
    if sp is None:
        return set()
    return {*sp.backends, *(sp.external_backends or ())}


@dataclass(frozen=True, slots=True)
class _Socket:
    family: int
    sockid: bytes  # the raw inet_diag_sockid, as the dump gave it: destroy needs it exact


def destroy_udp_sockets_to(backends: Iterable[desired.Backend], *, cgroup: pathlib.Path) -> int:
    """Destroys every connected UDP socket whose peer is one of `backends`, in every network
    namespace of the processes under `cgroup`. Returns how many were destroyed."""
    wanted = {(b.address.packed, b.port) for b in backends}
    if not wanted:
        return 0
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(_destroy_in_namespaces(wanted, cgroup)),
                              name="ctlb-sockdiag")
    worker.start()
    worker.join()
    return result[0] if result else 0


def _destroy_in_namespaces(wanted: set[tuple[bytes, int]], cgroup: pathlib.Path) -> int:
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


def _destroy_here(wanted: set[tuple[bytes, int]]) -> int:
    """Destroys the matching sockets of the calling thread's network namespace."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        victims = [s for family in (socket.AF_INET, socket.AF_INET6)
                   for s in _dump_udp(nl, family) if _peer(s) in wanted]
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


def _request(family: int, sockid: bytes) -> bytes:
    return _REQ_V2.pack(family, socket.IPPROTO_UDP, 0, 1 << _TCP_ESTABLISHED) + sockid


def _dump_udp(nl: socket.socket, family: int) -> list[_Socket]:
    empty = _SOCKID.pack(0, 0, b"", b"", 0, b"\xff" * 8)
    _send(nl, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, _request(family, empty))
    found = []
    for kind, payload in _replies(nl):
        if kind == _NLMSG_DONE:
            break
        if kind == _NLMSG_ERROR:
            _raise_if_error(payload)
            break
        msg_family = payload[0]
        found.append(_Socket(msg_family, payload[_MSG_HEAD.size:_MSG_HEAD.size + _SOCKID.size]))
    return found


def _destroy(nl: socket.socket, victim: _Socket) -> bool:
    _send(nl, _SOCK_DESTROY, _NLM_F_REQUEST | _NLM_F_ACK, _request(victim.family, victim.sockid))
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
