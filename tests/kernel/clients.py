"""Client programs run inside lab pods: they report what an application would observe."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ctlb import lab as ctlb_lab

_HTTP = textwrap.dedent("""
    import json, socket, sys
    host, port, count, family = {host!r}, {port}, {count}, socket.{family}
    out = []
    for _ in range(count):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.connect((host, port))
            peer = s.getpeername()
            s.sendall(b"GET / HTTP/1.0\\r\\nHost: svc\\r\\n\\r\\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            body = json.loads(data.split(b"\\r\\n\\r\\n", 1)[1])
            body["getpeername"] = [peer[0], peer[1]]
            out.append(body)
        except OSError as e:
            out.append({{"errno": e.errno, "error": str(e)}})
        finally:
            s.close()
    print(json.dumps(out))
""")

_UDP = textwrap.dedent("""
    import json, socket
    host, port, connected, family = {host!r}, {port}, {connected}, socket.{family}
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        if connected:
            s.connect((host, port))
            s.send(b"hello")
            data = s.recv(65536)
            src = s.getpeername()
        else:
            s.sendto(b"hello", (host, port))
            data, src = s.recvfrom(65536)
        body = json.loads(data)
        body["reply_from"] = [src[0], src[1]]
        print(json.dumps(body))
    except OSError as e:
        print(json.dumps({{"errno": e.errno, "error": str(e)}}))
""")


def _family(host: str) -> str:
    return "AF_INET6" if ":" in host else "AF_INET"


def http_requests(place: ctlb_lab.Place, host: str, port: int, *, count: int = 1,
                  family: str | None = None) -> list[dict[str, Any]]:
    """`count` connections, one HTTP GET each; per connection the echo's JSON plus getpeername,
    or the errno the connect failed with."""
    code = _HTTP.format(host=host, port=port, count=count, family=family or _family(host))
    out = place.python(code, timeout=30 + count * 0.05, check=True)
    return json.loads(out.stdout)


def udp_exchange(place: ctlb_lab.Place, host: str, port: int, *, connected: bool) -> dict[str, Any]:
    code = _UDP.format(host=host, port=port, connected=connected, family=_family(host))
    out = place.python(code, timeout=15, check=True)
    return json.loads(out.stdout)


# Client probes: what an application observes, as JSON.
TCP_PROBE = textwrap.dedent("""
    import json, socket, struct, time
    host, port, timeout = {host!r}, {port}, {timeout}
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    started = time.monotonic()
    try:
        s.connect((host, port))
        out = {{"connected": True}}
    except OSError as e:
        # struct tcp_info: state, ca_state, retransmits (SYNs resent so far), ...
        state, _, retransmits = struct.unpack_from("BBB", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104))
        out = {{"errno": e.errno, "error": str(e), "state": state, "retransmits": retransmits}}
    out["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(out), flush=True)
""")

_UDP_PROBE = textwrap.dedent("""
    import json, socket
    host, port = {host!r}, {port}
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    out = {{}}
    for mode in ("unconnected", "connected"):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(1.5)
        try:
            if mode == "connected":
                s.connect((host, port))
                out["getpeername"] = list(s.getpeername()[:2])
                out[mode + "_sent"] = s.send(b"hello")
            else:
                out[mode + "_sent"] = s.sendto(b"hello", (host, port))
            out[mode + "_reply"] = s.recv(65536).decode()
        except OSError as e:
            out[mode + "_error"] = e.errno if e.errno is not None else "timeout"
        finally:
            s.close()
    print(json.dumps(out))
""")

# Prints the TCP and UDP packets sent by `sources` that cross any interface of the netns it runs
# in, as [source, destination, protocol, destination port], once a line arrives on stdin.
_SNIFFER = textwrap.dedent("""
    import ipaddress, json, select, socket, sys
    sources = {sources!r}
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    seen = []
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([raw, sys.stdin], [], [])
        if sys.stdin in ready:
            break
        frame = raw.recv(65536)
        kind = frame[12:14]
        if kind == b"\\x08\\x00":
            proto, src, dst, l4 = frame[23], frame[26:30], frame[30:34], 14 + (frame[14] & 0xF) * 4
        elif kind == b"\\x86\\xdd":
            proto, src, dst, l4 = frame[20], frame[22:38], frame[38:54], 54
        else:
            continue
        src, dst = str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst))
        if proto in (6, 17) and src in sources:
            seen.append([src, dst, proto, int.from_bytes(frame[l4 + 2:l4 + 4], "big")])
    print(json.dumps(seen), flush=True)
""")


def tcp_probe(place: ctlb_lab.Place, host: str, port: int, *, timeout: float = 2.5) -> dict[str, Any]:
    out = place.python(TCP_PROBE.format(host=host, port=port, timeout=timeout), timeout=timeout + 10, check=True)
    return json.loads(out.stdout)


def udp_probe(place: ctlb_lab.Place, host: str, port: int) -> dict[str, Any]:
    out = place.python(_UDP_PROBE.format(host=host, port=port), timeout=15, check=True)
    return json.loads(out.stdout)


@contextmanager
def sniffing(lab: ctlb_lab.Lab, client: ctlb_lab.Pod) -> Iterator[list[list[Any]]]:
    """Records what `client` sends across the node while the block runs; the list fills on exit."""
    sources = [str(a) for a in client.addresses]
    proc = lab.node.popen([sys.executable, "-c", _SNIFFER.format(sources=sources)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen: list[list[Any]] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield seen
        time.sleep(0.2)  # let the last frames of the block arrive
        out, _ = proc.communicate("stop\n", timeout=10)
        seen.extend(json.loads(out))
    finally:
        lab.node.kill(proc)
