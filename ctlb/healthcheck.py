"""kube-proxy's two health servers, served by the agent in its place.

- A Service health check per Service that `semantics.health_check` names (a LoadBalancer with
  externalTrafficPolicy Local and a healthCheckNodePort): a listener on that port, on every
  address of the node, answering any request with 200 while this node has a ready endpoint of
  the Service and the proxy is healthy, else 503, with kube-proxy's JSON body and headers
  (pkg/proxy/healthcheck/service_health.go). Cloud load balancers send a Service's traffic only
  to the nodes that answer 200.
- The proxy's own server (`--healthz-bind-address`, 0.0.0.0:10256 by default): `/healthz` and
  `/livez`, 200 while no change has waited for a sync longer than the health timeout, and
  `/healthz` 503 as well when the node is going away (pkg/proxy/healthcheck/proxy_health.go).

What is served and what counts as healthy are decided in `semantics`; this module holds the
sockets, the threads and the HTTP. A listener is a socket with a thread blocked in accept(); each
connection gets a thread of its own (health checks are few and short), served by `http.server`.
A port that cannot be listened on is reported and tried again every few seconds, as kube-proxy
does; the other listeners are not affected.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import structlog

from ctlb import model, semantics

log = structlog.get_logger()

DEFAULT_HEALTHZ_PORT = 10256
DEFAULT_HEALTHZ_ADDRESS = f"0.0.0.0:{DEFAULT_HEALTHZ_PORT}"
# kube-proxy's healthTimeout: twice its sync period (30 s by default).
DEFAULT_HEALTH_TIMEOUT = 60.0
# kube-proxy retries a failed healthz listen every 5 s (and a Service's at every sync).
RETRY_INTERVAL = 5.0

ServiceKey = tuple[str, str]  # namespace, name

# ctlb programs both families in one sync, so kube-proxy's per-family status carries both.
_FAMILIES = (model.IPFamily.IPv4, model.IPFamily.IPv6)
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})
_GO_ZERO_TIME = "0001-01-01T00:00:00Z"
_MAX_DISCARDED_BODY = 64 * 1024


# --- addresses -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BindAddress:
    """Where a server listens: `host` "" (or 0.0.0.0, ::) is every address, of both families."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, default_port: int = DEFAULT_HEALTHZ_PORT) -> BindAddress | None:
        """Reads `IP:PORT`, `[IPv6]:PORT` or a bare IP (on `default_port`); "" or "none" is None (off).

        Raises:
            ValueError: not an address, or the port is not 0-65535 (0: any free port).
        """
        text = text.strip()
        if text in ("", "none"):
            return None
        host, port_text = text, str(default_port)
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"{text!r} is not IP:PORT")
            port_text = rest[1:] if rest else port_text
        elif text.count(":") == 1:
            host, port_text = text.split(":")
        if host:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ValueError(f"{text!r}: {port_text!r} is not a port (0-65535)")
        return cls(host=host, port=int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host or '0.0.0.0'}:{self.port}"


def listen(address: BindAddress) -> socket.socket:
    """A listening TCP socket. A wildcard host listens on both families, as Go's net.Listen does.

    Raises:
        OSError: the address cannot be bound (in use, not local, no privilege).
    """
    if address.host in _WILDCARDS:
        sock = _dual_stack_socket()
        host = "::" if sock.family == socket.AF_INET6 else "0.0.0.0"
    else:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock, host = socket.socket(family, socket.SOCK_STREAM), address.host
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go: a restart is not refused
        sock.bind((host, address.port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _dual_stack_socket() -> socket.socket:
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:  # no IPv6 in this kernel
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return sock


def _show(sockname: tuple[object, ...]) -> str:
    host, port = str(sockname[0]), int(str(sockname[1]))
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family_of(conn: socket.socket) -> model.IPFamily:
    """The family a connection came in over; an IPv4 peer on a dual-stack socket is IPv4."""
    address = ipaddress.ip_address(str(conn.getsockname()[0]).split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return model.IPFamily.IPv6
    return model.IPFamily.IPv4


# --- HTTP ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


# What a listener answers: (request path, family the request came over) -> reply.
Answer = Callable[[str, model.IPFamily], Reply]

# Go's http.NotFound, which kube-proxy's ServeMux answers other paths with.
_NOT_FOUND = Reply(404, b"404 page not found\n", content_type="text/plain; charset=utf-8")


class _Handler(http.server.BaseHTTPRequestHandler):
    """One connection: every request, whatever its method, gets the listener's answer."""

    protocol_version = "HTTP/1.1"  # keep-alive, as Go's server
    timeout = 10  # an idle connection is closed after this many seconds
    server: _Context  # type: ignore[assignment]

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._respond(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(body=False)

    # kube-proxy's handlers look at no method: each gets the same answer.
    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _respond(self, *, body: bool) -> None:
        self._discard_body()
        reply = self.server.answer(urlsplit(self.path).path, _family_of(self.connection))
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if body:
            self.wfile.write(reply.body)

    def _discard_body(self) -> None:
        """Reads a small request body away, so the next request on the connection parses."""
        length = self.headers.get("Content-Length", "0")
        if self.headers.get("Transfer-Encoding") or not length.isdigit() or int(length) > _MAX_DISCARDED_BODY:
            self.close_connection = True
        elif int(length):
            self.rfile.read(int(length))

    def send_response(self, code: int, message: str | None = None) -> None:
        # No Server header, as Go sends none.
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        """Requests are not logged, as kube-proxy logs none."""


@dataclass(frozen=True, slots=True)
class _Context:
    """What `_Handler` finds as its `server`."""

    answer: Answer


def _serve_connection(conn: socket.socket, peer: tuple[object, ...], context: _Context) -> None:
    try:
        _Handler(conn, peer, context)  # type: ignore[arg-type]
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the client went away
    finally:
        conn.close()


class _Listener:
    """A listening socket, and its thread handing each connection to a thread of its own."""

    def __init__(self, sock: socket.socket, *, answer: Answer, name: str) -> None:
        self._sock = sock
        self._context = _Context(answer)
        self._closing = False
        self.address = _show(sock.getsockname())
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, name=name, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self._sock.accept()
            except OSError as err:
                if self._closing:
                    return
                log.warning("health_accept_failed", address=self.address, error=str(err))
                time.sleep(0.1)  # out of descriptors, say: do not spin
                continue
            threading.Thread(target=_serve_connection, args=(conn, peer, self._context),
                             name=f"{self._thread.name}-conn", daemon=True).start()

    def close(self) -> None:
        """Stops listening; connections being served finish on their own."""
        self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (EINVAL)
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._sock.close()


def _go_time(moment: datetime.datetime | None) -> str:
    """A time as Go's encoding/json writes a time.Time (RFC 3339, nanoseconds trimmed), in UTC."""
    if moment is None:
        return _GO_ZERO_TIME
    moment = moment.astimezone(datetime.timezone.utc)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


# --- the proxy's health ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyReport:
    healthy: bool
    last_updated: datetime.datetime | None  # the last completed sync; None before the first
    current_time: datetime.datetime
    node_eligible: bool


class ProxyHealth:
    """How the agent's syncs keep up, as kube-proxy's ProxyHealthServer tracks its proxiers.

    The agent calls `queued` when a sync takes changes and `updated` when that sync is done;
    changes the source wrote but no sync has taken yet come from `pending` (the store's oldest).
    Read from the servers' threads: every method is thread-safe.
    """

    def __init__(self, *, timeout: float, pending: Callable[[], float | None] = lambda: None) -> None:
        self._lock = threading.Lock()
        self._timeout = timeout
        self._pending = pending
        self._queued: float | None = None  # time.monotonic() of the oldest change a running sync took
        self._last_updated: datetime.datetime | None = None
        self._node_eligible = False  # until a sync has looked at this node's Node object

    def queued(self, since: float) -> None:
        """A sync took changes, the oldest of which came at `since` (time.monotonic())."""
        with self._lock:
            if self._queued is None:
                self._queued = since

    def updated(self) -> None:
        """A sync completed: everything it took is programmed."""
        with self._lock:
            self._queued = None
            self._last_updated = datetime.datetime.now(datetime.timezone.utc)

    def set_node_eligible(self, eligible: bool) -> None:
        with self._lock:
            self._node_eligible = eligible

    def report(self) -> ProxyReport:
        pending = self._pending()
        with self._lock:
            oldest = min((t for t in (self._queued, pending) if t is not None), default=None)
            healthy = semantics.proxy_healthy(synced=self._last_updated is not None, oldest_pending=oldest,
                                              now=time.monotonic(), timeout=self._timeout)
            return ProxyReport(healthy=healthy, last_updated=self._last_updated,
                               current_time=datetime.datetime.now(datetime.timezone.utc),
                               node_eligible=self._node_eligible)


def healthz_reply(report: ProxyReport) -> Reply:
    """kube-proxy's /healthz: healthy and the node eligible; nodeEligible in the body."""
    return _proxy_reply(report, healthy=report.healthy and report.node_eligible, with_node=True)


def livez_reply(report: ProxyReport) -> Reply:
    """kube-proxy's /livez: healthy, whatever the node."""
    return _proxy_reply(report, healthy=report.healthy, with_node=False)


def _proxy_reply(report: ProxyReport, *, healthy: bool, with_node: bool) -> Reply:
    # kube-proxy's ProxyHealth as Go's json.Marshal writes it: fields in declaration order, an
    # empty per-family status omitted, and a healthy answer's lastUpdated set to the current time
    # (as older releases, which updated it on every sync loop, did).
    body: dict[str, object] = {
        "lastUpdated": _go_time(report.current_time if healthy else report.last_updated),
        "currentTime": _go_time(report.current_time),
    }
    if with_node:
        body["nodeEligible"] = report.node_eligible
    body["healthy"] = report.healthy
    if report.last_updated is not None:
        body["status"] = {str(family): {"lastUpdated": _go_time(report.last_updated), "healthy": report.healthy}
                          for family in _FAMILIES}
    return Reply(200 if healthy else 503, json.dumps(body, separators=(",", ":")).encode())


def service_reply(check: semantics.HealthCheck, *, family: model.IPFamily, proxy_healthy: bool) -> Reply:
    """kube-proxy's answer for a Service: 200 with a local endpoint while the proxy is healthy.

    The body is kube-proxy's, byte for byte: tab-indented JSON without a final newline.
    """
    count = check.local_endpoints_for(family)
    body = (
        "{\n"
        '\t"service": {\n'
        f"\t\t\"namespace\": {json.dumps(check.namespace)},\n"
        f"\t\t\"name\": {json.dumps(check.name)}\n"
        "\t},\n"
        f"\t\"localEndpoints\": {count},\n"
        f"\t\"serviceProxyHealthy\": {json.dumps(proxy_healthy)}\n"
        "}"
    )
    status = 200 if count and proxy_healthy else 503
    return Reply(status, body.encode(), headers=(("X-Load-Balancing-Endpoint-Weight", str(count)),))


class ProxyHealthServer:
    """The `--healthz-bind-address` server: /healthz and /livez."""

    def __init__(self, address: BindAddress, *, health: ProxyHealth) -> None:
        self.address = address
        self._health = health
        self._listener: _Listener | None = None
        self.error: str | None = None
        self._next_try = 0.0
        self._try()

    def retry(self) -> bool:
        """Listens again if the last try failed and `RETRY_INTERVAL` has passed; True if it now does."""
        if self._listener is not None or time.monotonic() < self._next_try:
            return False
        self._try()
        return self._listener is not None

    def status(self) -> dict[str, object]:
        listening = self._listener is not None
        return {"address": self._listener.address if self._listener else str(self.address),
                "listening": listening, "error": self.error}

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _try(self) -> None:
        try:
            sock = listen(self.address)
        except OSError as err:
            reason = f"cannot listen on {self.address}: {err.strerror or err}"
            if reason != self.error:
                log.error("healthz_listen_failed", address=str(self.address), reason=reason,
                          retry_s=RETRY_INTERVAL)
            self.error = reason
            self._next_try = time.monotonic() + RETRY_INTERVAL
            return
        self._listener = _Listener(sock, answer=self._answer, name="ctlb-healthz")
        self.error = None
        log.info("healthz_listening", address=self._listener.address)

    def _answer(self, path: str, family: model.IPFamily) -> Reply:
        if path == "/healthz":
            return healthz_reply(self._health.report())
        if path == "/livez":
            return livez_reply(self._health.report())
        return _NOT_FOUND


# --- Service health checks -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Failure:
    port: int
    reason: str


class ServiceHealthServers:
    """One listener per Service health check, opened, moved and closed as the checks change.

    Only the agent's thread calls `update`, `retry` and `close`; the listeners' threads read the
    current checks, which `update` replaces as a whole.
    """

    def __init__(self, *, health: ProxyHealth, host: str = "") -> None:
        self._health = health
        self._host = host
        self._checks: dict[ServiceKey, semantics.HealthCheck] = {}
        self._listeners: dict[ServiceKey, _Listener] = {}
        self._failed: dict[ServiceKey, _Failure] = {}
        self._next_retry = 0.0

    def update(self, checks: Mapping[ServiceKey, semantics.HealthCheck]) -> None:
        """Serves `checks`: new counts at once; a port that came, moved or went is opened or closed.

        Every listener that must go is closed before any is opened, so two Services may swap ports.
        """
        self._checks = dict(checks)
        for key, listener in list(self._listeners.items()):
            check = self._checks.get(key)
            if check is None or check.port != listener.port:
                listener.close()
                del self._listeners[key]
                log.info("health_check_closed", service=_name(key), port=listener.port)
        for key, failure in list(self._failed.items()):
            check = self._checks.get(key)
            if check is None or check.port != failure.port:
                del self._failed[key]
        for key in sorted(self._checks):
            if key not in self._listeners:
                self._open(key, self._checks[key])

    def retry(self) -> bool:
        """Tries the ports that could not be listened on again, once per `RETRY_INTERVAL`;
        True if any now listens."""
        if not self._failed or time.monotonic() < self._next_retry:
            return False
        before = len(self._failed)
        for key in sorted(self._failed):
            self._open(key, self._checks[key])
        return len(self._failed) < before

    def problems(self) -> list[model.Problem]:
        """The Services whose health check port could not be listened on, with the reason."""
        return [model.Problem(ref=str(model.ObjectRef("Service", *key)), reason=failure.reason)
                for key, failure in sorted(self._failed.items())]

    def status(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for key, check in sorted(self._checks.items()):
            listener, failure = self._listeners.get(key), self._failed.get(key)
            out.append({"service": _name(key), "port": check.port, "listening": listener is not None,
                        "address": listener.address if listener else None,
                        "local_endpoints": {str(family): n for family, n in check.local_endpoints},
                        "error": failure.reason if failure else None})
        return out

    def close(self) -> None:
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()

    def _open(self, key: ServiceKey, check: semantics.HealthCheck) -> None:
        address = BindAddress(self._host, check.port)
        try:
            sock = listen(address)
        except OSError as err:
            reason = f"healthCheckNodePort {check.port}: cannot listen on {address}: {err.strerror or err}"
            previous = self._failed.get(key)
            if previous is None or previous.reason != reason:
                log.error("health_check_listen_failed", service=_name(key), port=check.port, reason=reason,
                          retry_s=RETRY_INTERVAL)
            self._failed[key] = _Failure(check.port, reason)
            self._next_retry = time.monotonic() + RETRY_INTERVAL
            return
        self._failed.pop(key, None)
        self._listeners[key] = _Listener(sock, answer=lambda path, family: self._answer(key, family),
                                         name=f"ctlb-hc-{check.port}")
        log.info("health_check_listening", service=_name(key), port=check.port,
                 address=self._listeners[key].address)

    def _answer(self, key: ServiceKey, family: model.IPFamily) -> Reply:
        check = self._checks.get(key)
        if check is None:
            # Closing while a request was in flight: nothing local to offer. (kube-proxy answers
            # an empty 200 then; a load balancer is better told no.)
            check = semantics.HealthCheck(namespace=key[0], name=key[1], port=0, local_endpoints=())
        return service_reply(check, family=family, proxy_healthy=self._health.report().healthy)


def _name(key: ServiceKey) -> str:
    return f"{key[0]}/{key[1]}"
