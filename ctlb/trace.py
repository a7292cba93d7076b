"""socket-trace: the socket programs' decisions, live, with the names behind them.

While a trace session is open, the programs send one event per decision about a Service address
or a meshed pod's connection through the pinned ring buffer `ctlb_trace` (bpf/ctlb.h,
"socket-trace"); with no session, `ctlb_trace_ctl.enabled` is 0 and a decision costs one
inlined array lookup more. A ring buffer has a single consumer position, so one session runs at
a time on a node; the session's pid sits beside the switch, and the agent turns tracing off when
that process is gone (`end_abandoned`), so a killed `ctlb socket-trace` leaves no cost behind.

Events carry ids; names come from the agent's names file (service ports, pods) and, for events
that looked up no frontend (a mesh redirect, a reverse translation), from the frontend tables.
"""

from __future__ import annotations

import ctypes as ct
import datetime
import ipaddress
import os
import pathlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ctlb import desired, errors, model, statefile
from ctlb.datapath import libbpf, maps, netorder, tables

# enum trace_hook in bpf/ctlb.h: (hook, family of the socket).
HOOKS: dict[int, str] = {
    1: "connect4", 2: "sendmsg4", 3: "recvmsg4", 4: "getpeer4",
    5: "connect6", 6: "sendmsg6", 7: "recvmsg6", 8: "getpeer6",
}

# enum trace_verdict in bpf/ctlb.h: (short name, what the application sees or why).
VERDICTS: dict[int, tuple[str, str]] = {
    1: ("balanced", "a backend picked from the socket's hash"),
    2: ("affinity", "the client's backend under sessionAffinity ClientIP"),
    3: ("sticky", "the backend this socket sent to before"),
    4: ("refused", "no backends: ECONNREFUSED"),
    5: ("dropped", "no local endpoints: sent to the drop address"),
    6: ("denied", "source outside loadBalancerSourceRanges: sent to the drop address"),
    7: ("mesh", "sent to the pod's sidecar"),
    8: ("reverse", "the backend's address shown as the frontend's"),
    9: ("refused", "the backend set changed while read: EHOSTUNREACH"),
}
_ERRNO_OF = {4: "ECONNREFUSED", 9: "EHOSTUNREACH"}
VERDICT_MESH, VERDICT_REVERSE = 7, 8  # svc_id is 0: the service is found by the frontend's address
AF_INET = 2  # CTLB_AF_INET
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision of the socket programs, named."""

    time: datetime.datetime
    hook: str  # connect4, sendmsg6, ...
    protocol: str  # TCP, UDP
    verdict: str  # balanced, affinity, sticky, refused, dropped, denied, mesh, reverse
    reason: str
    errno: str | None  # what connect()/sendmsg() returned, if the decision failed it
    asked: str  # the address the socket asked for (reverse: the backend it talks to)
    got: str | None  # the address it got (reverse: the frontend shown to it); None when refused
    service: str | None  # the service port, ns/name[:port]/protocol/family
    svc_id: int
    pod: str | None  # ns/name of the calling pod; None: a process of the node, or a pod ctlb does not know
    pid: int
    comm: str
    cgroup_id: int
    cookie: int

    def as_json(self) -> dict[str, object]:
        return {"time": self.time.isoformat(timespec="microseconds"), "hook": self.hook,
                "protocol": self.protocol, "verdict": self.verdict, "reason": self.reason,
                "errno": self.errno, "from": self.asked, "to": self.got, "service": self.service,
                "svc_id": self.svc_id, "pod": self.pod, "pid": self.pid, "comm": self.comm,
                "cgroup_id": self.cgroup_id, "cookie": self.cookie}

    def line(self) -> str:
        who = self.pod or "node"
        target = f"{self.asked} -> {self.got}" if self.got else f"{self.asked} -> {self.errno or '-'}"
        return (f"{self.time.strftime('%H:%M:%S.%f')} {self.hook:<8} {self.protocol:<3} "
                f"{who} {self.comm}[{self.pid}] {target} "
                f"{self.service or '-'} {self.verdict}: {self.reason}")


@dataclass(frozen=True, slots=True)
class Filter:
    """Which decisions to show: of pods in `namespace`, of the pod `pod` (NAME, or NS/NAME),
    to the Service `service` (NS/NAME, any of its ports)."""

    namespace: str | None = None
    pod: str | None = None
    service: str | None = None

    def admits(self, d: Decision) -> bool:
        if self.namespace is not None and (d.pod is None or d.pod.split("/", 1)[0] != self.namespace):
            return False
        if self.pod is not None and not _pod_matches(d.pod, self.pod):
            return False
        if self.service is not None and not _service_matches(d.service, self.service):
            return False
        return True


def _pod_matches(pod: str | None, wanted: str) -> bool:
    if pod is None:
        return False
    return pod == wanted if "/" in wanted else pod.split("/", 1)[1] == wanted


def _service_matches(service: str | None, wanted: str) -> bool:
    """`wanted` is NS/NAME; a service port's name continues with :port or /protocol."""
    return service is not None and (service == wanted or service.startswith((wanted + ":", wanted + "/")))


# --- names ----------------------------------------------------------------------------------------


class Names:
    """Ids to names: the agent's names file, read again when it changes, and the frontend tables,
    read again when an address is not found (at most every `refresh_s`)."""

    def __init__(self, run_dir: pathlib.Path, bpffs: pathlib.Path, layouts: dict[str, maps.Layout], *,
                 refresh_s: float = 1.0) -> None:
        self._run_dir = run_dir
        self._bpffs = bpffs
        self._layouts = layouts
        self._refresh_s = refresh_s
        self._names_stamp: float | None = None
        self._names_checked = float("-inf")
        self._services: dict[str, str] = {}
        self._pods: dict[str, str] = {}
        self._frontends: dict[desired.Frontend, int] = {}
        self._frontends_read = float("-inf")

    def service(self, svc_id: int) -> str | None:
        self._read_names()
        return self._services.get(str(svc_id))

    def pod(self, pod_id: int) -> str | None:
        if pod_id == 0:
            return None
        self._read_names()
        return self._pods.get(str(pod_id))

    def service_at(self, fe: desired.Frontend) -> tuple[int, str | None]:
        """The service port of a frontend address: (svc_id, name); (0, None) if none is there."""
        svc_id = self._frontends.get(fe)
        if svc_id is None and time.monotonic() - self._frontends_read >= self._refresh_s:
            self._read_frontends()
            svc_id = self._frontends.get(fe)
        return (0, None) if svc_id is None else (svc_id, self.service(svc_id))

    def _read_names(self) -> None:
        """Reads the names file again if it changed; looks at most every `refresh_s`, not once
        per event."""
        now = time.monotonic()
        if now - self._names_checked < self._refresh_s:
            return
        self._names_checked = now
        path = self._run_dir / statefile.NAMES_FILE
        try:
            stamp = path.stat().st_mtime
        except FileNotFoundError:
            return
        if stamp == self._names_stamp:
            return
        names = statefile.read_names(self._run_dir)
        self._names_stamp = stamp
        self._services = names.get("services", {})
        self._pods = names.get("pods", {})

    def _read_frontends(self) -> None:
        self._frontends_read = time.monotonic()
        found: dict[desired.Frontend, int] = {}
        for family, name in maps.FRONTENDS.items():
            try:
                pinned = maps.PinnedMap(self._bpffs / name, self._layouts[name])
            except libbpf.BpfError:
                continue
            try:
                table = tables.KernelFrontendTable(pinned, family)
                found.update((fe, value.svc_id) for fe, value in table.items())
            finally:
                pinned.close()
        self._frontends = found


# --- events -------------------------------------------------------------------------------------


class Decoder:
    """Raw ring-buffer records to Decisions, with the clock and the names of this node."""

    def __init__(self, event_type: type, names: Names) -> None:
        self._event_type = event_type
        self._size = ct.sizeof(event_type)
        self._names = names
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC: its offset to the wall clock, once.
        self._wall_offset_ns = time.time_ns() - time.monotonic_ns()

    def decode(self, record: bytes) -> Decision:
        ev = self._event_type.from_buffer_copy(record[:self._size])
        family = 4 if ev.family == AF_INET else 6
        protocol = str(tables.PROTO_NAMES.get(ev.proto, ev.proto))
        asked = _endpoint(ev, "from", family)
        got = _endpoint(ev, "to", family) if ev.verdict not in _ERRNO_OF else None
        svc_id = ev.svc_id
        if ev.verdict in (VERDICT_MESH, VERDICT_REVERSE):
            frontend_field = "to" if ev.verdict == VERDICT_REVERSE else "from"
            fe = desired.Frontend(_address(ev, frontend_field, family), netorder.from_be16(
                getattr(ev, f"{frontend_field}_port")), model.Protocol(protocol))
            svc_id, service = self._names.service_at(fe)
        else:
            service = self._names.service(svc_id)
        verdict, reason = VERDICTS.get(ev.verdict, (f"#{ev.verdict}", "unknown verdict"))
        return Decision(
            time=datetime.datetime.fromtimestamp((ev.ktime_ns + self._wall_offset_ns) / 1e9).astimezone(),
            hook=HOOKS.get(ev.hook, f"#{ev.hook}"), protocol=protocol, verdict=verdict, reason=reason,
            errno=_ERRNO_OF.get(ev.verdict), asked=asked, got=got, service=service, svc_id=svc_id,
            pod=self._names.pod(ev.pod_id), pid=ev.tgid, comm=bytes(ev.comm).split(b"\0", 1)[0].decode(errors="replace"),
            cgroup_id=ev.cgroup_id, cookie=ev.cookie,
        )


def _address(ev: ct.Structure, which: str, family: int) -> model.IPAddress:
    if family == 4:  # in word 0 of the four
        return ipaddress.IPv4Address(int(getattr(ev, f"{which}_addr")[0]).to_bytes(4, sys.byteorder))
    return netorder.get_addr(ev, 6, f"{which}_addr")


def _endpoint(ev: ct.Structure, which: str, family: int) -> str:
    address = _address(ev, which, family)
    port = netorder.from_be16(getattr(ev, f"{which}_port"))
    return f"[{address}]:{port}" if family == 6 else f"{address}:{port}"


# --- the session ----------------------------------------------------------------------------------


class NotInstalled(errors.CtlbError):
    """No socket programs with tracing are pinned where the command looks."""


class TraceBusy(errors.CtlbError):
    """Another socket-trace holds this node's ring buffer."""


class Session:
    """Tracing on this node, from `open` to `close`: the switch is on and this process reads
    the ring buffer; records reach `on_record` from `poll`."""

    def __init__(self, bpffs: pathlib.Path, layouts: dict[str, maps.Layout],
                 on_record: Callable[[bytes], None]) -> None:
        self._ctl = _open_pin(bpffs, maps.TRACE_CTL, lambda path: maps.PinnedMap(path, layouts[maps.TRACE_CTL]))
        self._ring_fd = -1
        self._ring: libbpf.RingBuffer | None = None
        try:
            self._ring_fd = _open_pin(bpffs, maps.TRACE_RING, lambda path: libbpf.obj_get(str(path)))
            _claim(self._ctl)
            # Records an earlier session left unread are not this session's.
            self._ring = libbpf.RingBuffer(self._ring_fd, lambda _record: None)
            self._ring.consume()
            self._ring.close()
            self._ring = libbpf.RingBuffer(self._ring_fd, on_record)
            self._lost_at_start = _ctl_entry(self._ctl).lost
            _switch(self._ctl, enabled=True)
        except BaseException:
            self.close()
            raise

    def poll(self, timeout_ms: int) -> int:
        assert self._ring is not None
        return self._ring.poll(timeout_ms)

    def drain(self) -> int:
        """Hands over what is in the buffer now, without waiting."""
        assert self._ring is not None
        return self._ring.consume()

    @property
    def lost(self) -> int:
        """Events the programs had no room for since this session began."""
        return _ctl_entry(self._ctl).lost - self._lost_at_start

    def close(self) -> None:
        """Turns tracing off (if this process owns it) and frees the reader."""
        if self._ctl.fd >= 0:
            entry = _ctl_entry(self._ctl)
            if entry.owner_pid == os.getpid():
                _switch(self._ctl, enabled=False)
            self._ctl.close()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._ring_fd >= 0:
            os.close(self._ring_fd)
            self._ring_fd = -1


def _open_pin(bpffs: pathlib.Path, name: str, opener: Callable[[pathlib.Path], T]) -> T:
    try:
        return opener(bpffs / name)
    except libbpf.BpfError as exc:
        raise NotInstalled(
            f"no socket programs with tracing in {bpffs} (pin {name}: {exc.strerror}): "
            "start `ctlb agent` (this version) first") from exc


def _ctl_entry(ctl: maps.PinnedMap) -> ct.Structure:
    entry = ctl.get(ct.c_uint32(0))
    return entry if entry is not None else ctl.layout.leaf()


def _claim(ctl: maps.PinnedMap) -> None:
    entry = _ctl_entry(ctl)
    owner = entry.owner_pid
    if entry.enabled and owner != os.getpid() and statefile.pid_alive(owner):
        raise TraceBusy(f"socket-trace pid {owner} is already tracing on this node: one at a time, "
                        "since both would read one ring buffer")


def _switch(ctl: maps.PinnedMap, *, enabled: bool) -> None:
    """Writes the switch; `lost` is the programs' counter and is kept as it is."""
    entry = _ctl_entry(ctl)
    entry.enabled = 1 if enabled else 0
    entry.owner_pid = os.getpid() if enabled else 0
    ctl.put(ct.c_uint32(0), entry)


def end_abandoned(ctl: maps.PinnedMap) -> int | None:
    """Turns tracing off if the process that turned it on is gone; returns that pid, or None."""
    entry = _ctl_entry(ctl)
    if not entry.enabled or statefile.pid_alive(entry.owner_pid):
        return None
    owner = entry.owner_pid
    entry.enabled = 0
    entry.owner_pid = 0
    ctl.put(ct.c_uint32(0), entry)
    return owner
