"""The node-local ADS server: one snapshot for every sidecar of the node, pushed on every change.

Aggregated Discovery Service, state of the world, v3, over gRPC (grpcio's thread-pool server).
Each stream runs in a pool thread that waits on its inbox for the sidecar's requests (a reader
thread feeds them) and for "new snapshot" notes from `publish`; `meshredirect.xds.stream` decides
what to send. Before the first publication nothing is sent: Envoy waits rather than start with
no listener.

Example::

    server = XdsServer(["unix:/run/ctlb/xds.sock"])
    server.start()
    server.publish(planner.state().service_ports, store.objects("Service"))  # any thread
    ...
    server.stop()
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent import futures

import grpc
import structlog
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from ctlb import desired, model
from meshredirect.xds import addresses, errors, resources, snapshot, stream

log = structlog.get_logger()

# The node-local socket's name in the agent's run directory: `unix:/run/ctlb/xds.sock` by default,
# as the sample bootstrap (deploy/envoy-sidecar-bootstrap.yaml) expects.
DEFAULT_SOCKET_NAME = "xds.sock"
DEFAULT_MAX_STREAMS = 512
# Sidecars run as their own UID (1337) and must be able to connect: the socket is not secret
# (Service addresses and endpoints), and it is read-only for them.
DEFAULT_SOCKET_MODE = 0o666
_STOP_WAIT_S = 5.0


class _Closed:
    """The inbox note that ends a stream (server stopping, RPC over, sidecar gone)."""


class _NewSnapshot:
    """The inbox note that a snapshot was published."""


_CLOSED = _Closed()
_NEW_SNAPSHOT = _NewSnapshot()
_Note = discovery_pb2.DiscoveryRequest | _Closed | _NewSnapshot


class _Hub:
    """The current snapshot, and the inbox and last status of every open stream."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: snapshot.Snapshot | None = None
        self._inboxes: dict[queue.SimpleQueue[_Note], stream.StreamStatus | None] = {}
        self._closed = False

    def current(self) -> snapshot.Snapshot | None:
        with self._lock:
            return self._current

    def publish(self, snap: snapshot.Snapshot) -> None:
        with self._lock:
            self._current = snap
            for inbox in self._inboxes:
                inbox.put(_NEW_SNAPSHOT)

    def attach(self, inbox: queue.SimpleQueue[_Note]) -> bool:
        """Registers a stream; False once the server is stopping."""
        with self._lock:
            if self._closed:
                return False
            self._inboxes[inbox] = None
            return True

    def detach(self, inbox: queue.SimpleQueue[_Note]) -> None:
        with self._lock:
            self._inboxes.pop(inbox, None)

    def record(self, inbox: queue.SimpleQueue[_Note], status: stream.StreamStatus) -> None:
        with self._lock:
            if inbox in self._inboxes:
                self._inboxes[inbox] = status

    def statuses(self) -> list[stream.StreamStatus]:
        with self._lock:
            return [s for s in self._inboxes.values() if s is not None]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for inbox in self._inboxes:
                inbox.put(_CLOSED)


class _AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, hub: _Hub) -> None:
        self._hub = hub

    def StreamAggregatedResources(  # noqa: N802 (the gRPC method's name)
        self, request_iterator: Iterator[discovery_pb2.DiscoveryRequest], context: grpc.ServicerContext
    ) -> Iterator[discovery_pb2.DiscoveryResponse]:
        inbox: queue.SimpleQueue[_Note] = queue.SimpleQueue()
        if not self._hub.attach(inbox):
            return  # stopping: the sidecar reconnects to whoever serves next
        ads = stream.AdsStream(peer=context.peer())
        context.add_callback(lambda: inbox.put(_CLOSED))
        reader = threading.Thread(target=_pump, args=(request_iterator, inbox), name="xds-requests", daemon=True)
        reader.start()
        try:
            yield from _serve(ads, inbox=inbox, hub=self._hub)
        finally:
            self._hub.detach(inbox)
            log.info("xds_stream_closed", node=ads.node, peer=ads.peer)


def _pump(requests: Iterator[discovery_pb2.DiscoveryRequest], inbox: queue.SimpleQueue[_Note]) -> None:
    """Moves the sidecar's requests into the inbox until the stream ends."""
    try:
        for request in requests:
            inbox.put(request)
    except grpc.RpcError:
        pass  # cancelled or the peer went away: the stream is over either way
    finally:
        inbox.put(_CLOSED)


def _serve(
    ads: stream.AdsStream, *, inbox: queue.SimpleQueue[_Note], hub: _Hub
) -> Iterator[discovery_pb2.DiscoveryResponse]:
    """The stream's responses, as its requests and new snapshots come, until it is closed."""
    while True:
        note = inbox.get()
        if isinstance(note, _Closed):
            return
        current = hub.current()
        if isinstance(note, _NewSnapshot):
            responses = ads.due(current)
        else:
            responses = ads.on_request(note, current)
        hub.record(inbox, ads.status())
        yield from responses


class XdsServer:
    """The node's ADS server. `publish` and `stop` may be called from any thread.

    Args:
        listen: addresses, each `unix:/path` or `host:port` (port 0: any free port).
        options: what every sidecar's resources share (outbound port, access log, ...).
        max_streams: sidecars served at once; more are refused (RESOURCE_EXHAUSTED) and retry.
        socket_mode: permissions of the Unix sockets.

    Raises:
        errors.XdsError: a malformed listen address, or none.
    """

    def __init__(
        self,
        listen: Sequence[str],
        *,
        options: resources.Options = resources.Options(),
        max_streams: int = DEFAULT_MAX_STREAMS,
        socket_mode: int = DEFAULT_SOCKET_MODE,
    ) -> None:
        if not listen:
            raise errors.XdsError("the xDS server needs at least one listen address")
        self._listen = [addresses.parse(text) for text in listen]
        self.options = options
        self._max_streams = max_streams
        self._socket_mode = socket_mode
        self._hub = _Hub()
        self._builder = snapshot.SnapshotBuilder(options)
        self._publish_lock = threading.Lock()
        self._serial = 0
        self._server: grpc.Server | None = None
        self._bound: list[str] = []
        self._sockets: list[pathlib.Path] = []  # Unix sockets this server made, removed on stop

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Binds every listen address and starts serving.

        Raises:
            errors.XdsError: an address cannot be bound (in use, no permission); nothing is left
                bound.
        """
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._max_streams + 2, thread_name_prefix="xds"),
            maximum_concurrent_rpcs=self._max_streams,
            # grpcio sets SO_REUSEPORT by default: a second server on the same port would then
            # silently share it instead of failing.
            options=[("grpc.so_reuseport", 0)],
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_AdsServicer(self._hub), server)
        try:
            self._bound = [self._bind(server, address) for address in self._listen]
        except errors.XdsError:
            server.stop(None)
            self._remove_sockets()
            raise
        server.start()
        for path in self._sockets:
            os.chmod(path, self._socket_mode)
        self._server = server
        log.info("xds_server_listening", addresses=self._bound)

    def stop(self, grace: float = 1.0) -> None:
        """Ends every stream (sidecars keep their config and reconnect to the next server),
        stops serving and removes the Unix sockets. Safe to call twice; a stopped server does
        not start again (make a new one)."""
        self._hub.close()
        if self._server is not None:
            self._server.stop(grace).wait(grace + _STOP_WAIT_S)
            self._server = None
            log.info("xds_server_stopped", addresses=self._bound)
        self._remove_sockets()

    def __enter__(self) -> XdsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def addresses(self) -> tuple[str, ...]:
        """What the server listens on, as `unix:/path` or `host:port` (the real port for port 0)."""
        return tuple(self._bound)

    # --- publishing -----------------------------------------------------------------------------

    def publish(
        self,
        states: Mapping[desired.ServicePortName, desired.ServicePortState],
        services: Iterable[model.Service],
    ) -> snapshot.Snapshot:
        """Makes `states` what every sidecar is served, and pushes what changed to each of them.

        Args:
            states: the planner's service-port states (`Planner.state().service_ports`); read
                before this returns, so the planner may not update meanwhile.
            services: the Services of those states (e.g. `store.objects("Service")`).

        Returns:
            The snapshot now served; its `problems` name the service ports it could not serve.
        """
        with self._publish_lock:
            return self._install(self._builder.build(states, services, serial=self._serial + 1))

    def publish_resources(self, built: resources.Resources) -> snapshot.Snapshot:
        """Serves resources built elsewhere, as they are: for tools and tests (a deliberately
        bad resource, say). The next `publish` serves the planner's state again."""
        with self._publish_lock:
            return self._install(snapshot.from_resources(built, serial=self._serial + 1))

    def _install(self, snap: snapshot.Snapshot) -> snapshot.Snapshot:
        current = self._hub.current()
        if current is not None and current.versions() == snap.versions():
            return current
        self._serial = snap.serial
        self._hub.publish(snap)
        counts = {t.short: len(snap.types[t].resources) for t in snapshot.PUSH_ORDER}
        log.info("xds_snapshot_published", serial=snap.serial, versions=snap.versions(), resources=counts,
                 problems=len(snap.problems))
        return snap

    # --- status ---------------------------------------------------------------------------------

    @property
    def current(self) -> snapshot.Snapshot | None:
        return self._hub.current()

    def streams(self) -> list[stream.StreamStatus]:
        """Each connected sidecar: its node id, the versions it accepted, what it rejected."""
        return self._hub.statuses()

    # --- internals ------------------------------------------------------------------------------

    def _bind(self, server: grpc.Server, address: addresses.ListenAddress) -> str:
        if address.path is not None:
            addresses.prepare_unix_socket(address.path)
        try:
            port = server.add_insecure_port(address.grpc_target)
        except RuntimeError as exc:  # grpcio's way of saying the bind failed
            raise errors.XdsError(f"xDS server cannot listen on {address.text}: {exc}") from exc
        if address.path is not None:
            self._sockets.append(address.path)
            return address.grpc_target
        if port == 0:
            raise errors.XdsError(f"xDS server cannot listen on {address.text}")
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"{host}:{port}"

    def _remove_sockets(self) -> None:
        for path in self._sockets:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._sockets = []
