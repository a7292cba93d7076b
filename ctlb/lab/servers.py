"""Backend servers for lab pods: an HTTP echo, a UDP echo, and dnsmasq; plus helpers to start them.

Each echo answers with who served and whom it saw, which is what connect-time load-balancing
tests assert on::

    python -m ctlb.lab.servers http --name web-1 --port 8080      # JSON per HTTP request
    python -m ctlb.lab.servers udp --name dns-1 --port 5353       # JSON per datagram

Both print "ready" on stdout once their socket is listening. Run them in a pod with
`start_http`, `start_udp` and `start_dnsmasq`, which wait for readiness.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import os
import select
import socket
import socketserver
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from ctlb.lab import errors, netlab

READY = "ready"
DNS_WHOAMI = "whoami.ctlb.test"
DNS_SVC_DOMAIN = "svc.ctlb.test"
_READY_TIMEOUT_S = 10.0
_MAX_HEAD_LINES = 100
_MAX_LINE = 8192
_IDLE_TIMEOUT_S = 30.0
# The source root, so `python -m ctlb.lab.servers` works in a pod even when ctlb is not installed.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


# --- the servers (run in a pod) ---------------------------------------------------------------


def plain_ip(text: str) -> str:
    """Return an address as users write it: IPv4-mapped IPv6 as IPv4, without a zone index."""
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _family(bind: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET


class _HttpServer(socketserver.ThreadingTCPServer):
    """Thread-per-connection TCP server; bound to "::" it serves IPv4 clients too."""

    daemon_threads = True
    allow_reuse_address = True
    # Bursts of short connections from load tests overflow the default backlog of 5.
    request_queue_size = 4096

    def __init__(self, *, name: str, bind: str, port: int) -> None:
        self.address_family = _family(bind)
        self.backend_name = name
        super().__init__((bind, port), _EchoHandler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request: object, client_address: object) -> None:
        # Resets and timeouts are routine under load tests; a traceback per client is noise.
        pass


class _EchoHandler(socketserver.StreamRequestHandler):
    """Answers each request on a connection (keep-alive aware) with the JSON echo."""

    server: _HttpServer
    timeout = _IDLE_TIMEOUT_S
    disable_nagle_algorithm = True

    def handle(self) -> None:
        body = self._body()
        try:
            while True:
                head = _read_head(self.rfile)
                if head is None:
                    return
                keep_alive = _discard_body(self.rfile, head)
                self.wfile.write(_response(head, body, keep_alive=keep_alive))
                if not keep_alive:
                    return
        except (OSError, ValueError):
            return

    def _body(self) -> bytes:
        peer_host, peer_port = self.client_address[:2]
        local_host = self.request.getsockname()[0]
        echo = {
            "backend": self.server.backend_name,
            "peer": plain_ip(peer_host),
            "peer_port": peer_port,
            "local": plain_ip(local_host),
        }
        return json.dumps(echo).encode()


def _read_head(rfile: io.BufferedIOBase) -> list[str] | None:
    """Read a request line and headers; None when the client closed between requests."""
    lines: list[str] = []
    while len(lines) < _MAX_HEAD_LINES:
        raw = rfile.readline(_MAX_LINE)
        if not raw:
            return None
        line = raw.decode("latin-1").rstrip("\r\n")
        if not line:
            if lines:
                return lines
            continue  # tolerate stray CRLFs between requests (RFC 9112 section 2.2)
        lines.append(line)
    raise ValueError("request head too long")


def _discard_body(rfile: io.BufferedIOBase, head: list[str]) -> bool:
    """Skip a request body; return whether the connection stays open afterwards."""
    version = head[0].rsplit(" ", 1)[-1].upper()
    headers = {}
    for line in head[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip().lower()
    length = int(headers.get("content-length", "0") or "0")
    if length:
        rfile.read(length)
    connection = headers.get("connection", "")
    if version == "HTTP/1.1":
        return connection != "close"
    return connection == "keep-alive"


def _response(head: list[str], body: bytes, *, keep_alive: bool) -> bytes:
    method = head[0].split(" ", 1)[0].upper()
    lines = [
        "HTTP/1.1 200 OK",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        "",
        "",
    ]
    return "\r\n".join(lines).encode() + (b"" if method == "HEAD" else body)


def serve_http(*, name: str, bind: str, port: int) -> None:
    """Serve the HTTP echo forever, printing "ready" once listening."""
    with _HttpServer(name=name, bind=bind, port=port) as server:
        print(READY, flush=True)
        server.serve_forever()


def serve_udp(*, name: str, bind: str, port: int) -> None:
    """Answer each datagram with a JSON echo, forever, printing "ready" once bound."""
    family = _family(bind)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((bind, port))
        print(READY, flush=True)
        while True:
            _data, peer = sock.recvfrom(65535)
            echo = {"backend": name, "peer": plain_ip(peer[0]), "peer_port": peer[1]}
            try:
                sock.sendto(json.dumps(echo).encode(), peer)
            except OSError:
                continue  # an unreachable client must not stop the server


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m ctlb.lab.servers`."""
    parser = argparse.ArgumentParser(prog="python -m ctlb.lab.servers", description=__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind in ("http", "udp"):
        cmd = sub.add_parser(kind, help=f"{kind} echo server")
        cmd.add_argument("--name", required=True, help="backend name reported in every answer")
        cmd.add_argument("--port", type=int, required=True)
        cmd.add_argument("--bind", default="::", help="address to bind (default :: = dual-stack)")
    args = parser.parse_args(argv)
    serve = serve_http if args.kind == "http" else serve_udp
    try:
        serve(name=args.name, bind=args.bind, port=args.port)
    except KeyboardInterrupt:
        return 0
    return 0


# --- helpers (run in the test process) --------------------------------------------------------


def start_http(
    place: netlab.Place,
    *,
    name: str,
    port: int,
    bind: str = "::",
    timeout: float = _READY_TIMEOUT_S,
) -> subprocess.Popen[bytes]:
    """Start the HTTP echo server in a pod (or on the node) and wait until it listens.

    Raises:
        errors.LabError: it exited or was not ready within timeout; carries its stderr.
    """
    return _start_echo(place, kind="http", name=name, port=port, bind=bind, timeout=timeout)


def start_udp(
    place: netlab.Place,
    *,
    name: str,
    port: int,
    bind: str = "::",
    timeout: float = _READY_TIMEOUT_S,
) -> subprocess.Popen[bytes]:
    """Start the UDP echo server in a pod (or on the node) and wait until it is bound.

    Raises:
        errors.LabError: it exited or was not ready within timeout; carries its stderr.
    """
    return _start_echo(place, kind="udp", name=name, port=port, bind=bind, timeout=timeout)


def start_dnsmasq(
    place: netlab.Place, *, name: str, port: int = 53, timeout: float = _READY_TIMEOUT_S
) -> subprocess.Popen[bytes]:
    """Start dnsmasq on the place's addresses and wait until it answers.

    It serves TXT `whoami.ctlb.test` = name (which server answered) and A/AAAA for any name
    under `svc.ctlb.test` = the place's own addresses. It forwards nothing.

    Raises:
        errors.LabError: it exited or did not answer within timeout; carries its stderr.
    """
    argv = [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--bind-interfaces", f"--port={port}", "--user=root", "--pid-file=", "--log-facility=-",
        f"--txt-record={DNS_WHOAMI},{name}",
    ]  # fmt: skip
    argv += [f"--listen-address={addr}" for addr in place.addresses]
    argv += [f"--address=/{DNS_SVC_DOMAIN}/{addr}" for addr in place.addresses]
    # The child keeps its own descriptor of the (unlinked) file after ours is closed.
    with tempfile.TemporaryFile() as stderr:
        proc = place.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        while not _dns_answers(place, port=port, name=name):
            if proc.poll() is not None or time.monotonic() > deadline:
                _fail_start(place, proc, stderr, what=f"dnsmasq {name}")
            time.sleep(0.05)
    return proc


def _start_echo(
    place: netlab.Place, *, kind: str, name: str, port: int, bind: str, timeout: float
) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "ctlb.lab.servers", kind, "--name", name, "--port", str(port)]
    argv += ["--bind", bind]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SOURCE_ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryFile() as stderr:
        proc = place.popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=env
        )
        if not _wait_ready(proc, timeout=timeout):
            _fail_start(place, proc, stderr, what=f"{kind} server {name}")
    return proc


def _wait_ready(proc: subprocess.Popen[bytes], *, timeout: float) -> bool:
    """Read proc's stdout until a "ready" line; False on EOF or timeout."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            break
        # os.read, not readline: the pipe object's buffer would hide data from select().
        chunk = os.read(fd, 4096)
        if not chunk:
            return False
        seen += chunk
        if READY.encode() in seen.splitlines():
            return True
    return False


def _dns_answers(place: netlab.Place, *, port: int, name: str) -> bool:
    server = str(place.addresses[0])
    argv = ["dig", f"@{server}", "-p", str(port), DNS_WHOAMI, "TXT", "+short"]
    argv += ["+time=1", "+tries=1"]
    try:
        done = place.run(argv, timeout=5.0)
    except subprocess.TimeoutExpired:
        return False
    return done.stdout.strip() == f'"{name}"'


def _fail_start(
    place: netlab.Place, proc: subprocess.Popen[Any], stderr: IO[bytes], *, what: str
) -> NoReturn:
    exited = proc.poll()
    place.kill(proc)
    stderr.seek(0)
    said = stderr.read().decode(errors="replace").strip()
    state = f"exited with {exited}" if exited is not None else "not ready in time"
    raise errors.LabError(f"{what} in {place.netns}: {state}: {said or '(no stderr)'}")


if __name__ == "__main__":
    sys.exit(main())
