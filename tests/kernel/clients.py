"""Client programs run inside lab pods: they report what an application would observe."""

from __future__ import annotations

import json
import textwrap
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
