"""One ADS stream (state of the world, v3): which responses a sidecar needs, when.

Sans I/O: the server hands the stream each request the sidecar sends and each new snapshot, and
sends the responses it returns, in that order. The rules it owns:

- Per type, a response is due when the sidecar asks for a name the last one did not hold, or the
  snapshot's version moved; asking for fewer names needs none.
- A fresh stream has been sent nothing, so a reconnecting sidecar always gets the current
  snapshot, whatever version it says it holds.
- Responses go out in CDS, EDS, LDS, RDS order. Every CDS response is followed by an EDS one and
  every LDS response by an RDS one, even when the endpoints or routes did not change: a cluster
  or listener that Envoy replaces warms again until its endpoints or routes arrive. That EDS
  (RDS) response also holds the endpoints (routes) of the clusters (listeners) just added, so a
  new cluster is warm before the listener that leads to it arrives (make before break).
- A request whose nonce is not the last one sent for its type answers an older response: it is
  ignored (the sidecar sends another once it has read the newer one).
- A NACK (a request with error_detail) is logged with Envoy's message and the rejected version,
  and that version is not sent again on this stream (no NACK loop); the next version is.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from meshredirect.xds import snapshot as snap

log = structlog.get_logger()

# How many rejected versions per type a stream remembers; older ones may be sent again.
_REJECTED_MEMORY = 16


@dataclass(slots=True)
class _Watch:
    """What one type's subscription asked for and what it was last sent."""

    subscribed: bool = False
    names: frozenset[str] | None = None  # None: every resource of the type (wildcard)
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None
    nonce: str = ""  # of the last response sent; "" before the first
    acked_version: str | None = None
    rejected: deque[str] = field(default_factory=lambda: deque(maxlen=_REJECTED_MEMORY))
    # The cluster (listener) type went out: the endpoints (routes) must follow, changed or not.
    follow_up: bool = False


@dataclass(frozen=True, slots=True)
class Nack:
    """The last rejection of a type: for status and tests."""

    type_url: snap.TypeUrl
    version: str | None
    message: str


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """An immutable view of a stream, safe to read from any thread."""

    peer: str
    node: str
    acked: dict[str, str]  # short type name -> version the sidecar accepted last
    nacks: tuple[Nack, ...]


class AdsStream:
    def __init__(self, *, peer: str) -> None:
        self.peer = peer
        self.node = ""
        self._watches = {t: _Watch() for t in snap.PUSH_ORDER}
        self._nonces = itertools.count(1)
        self._nacks: list[Nack] = []
        self._log = log.bind(peer=peer)

    # --- events ---------------------------------------------------------------------------------

    def on_request(
        self, request: discovery_pb2.DiscoveryRequest, current: snap.Snapshot | None
    ) -> list[discovery_pb2.DiscoveryResponse]:
        """Takes one request; returns the responses due now, in push order."""
        self._learn_node(request)
        try:
            type_url = snap.TypeUrl(request.type_url)
        except ValueError:
            self._log.warning("xds_unknown_type", type_url=request.type_url)
            return []
        watch = self._watches[type_url]
        if request.response_nonce and watch.nonce and request.response_nonce != watch.nonce:
            self._log.debug("xds_stale_request", type=type_url.short, nonce=request.response_nonce)
            return []
        if request.response_nonce and request.response_nonce == watch.nonce:
            self._settle(type_url, watch=watch, request=request)
        watch.subscribed = True
        watch.names = _requested_names(type_url, request)
        return self.due(current)

    def due(self, current: snap.Snapshot | None) -> list[discovery_pb2.DiscoveryResponse]:
        """The responses the sidecar needs for `current`, in push order (on a new snapshot, call
        this alone). Nothing before the first snapshot: Envoy waits rather than start empty."""
        if current is None:
            return []
        responses = []
        for type_url in snap.PUSH_ORDER:
            watch = self._watches[type_url]
            if self._needs(watch, current.version(type_url)):
                responses.append(self._respond(type_url, watch=watch, current=current))
        return responses

    def status(self) -> StreamStatus:
        acked = {t.short: w.acked_version for t, w in self._watches.items() if w.acked_version is not None}
        return StreamStatus(peer=self.peer, node=self.node, acked=acked, nacks=tuple(self._nacks))

    # --- internals ------------------------------------------------------------------------------

    def _learn_node(self, request: discovery_pb2.DiscoveryRequest) -> None:
        # Envoy sends its node only on the first request (set_node_on_first_message_only).
        if request.HasField("node") and not self.node:
            self.node = request.node.id
            self._log = self._log.bind(node=self.node)
            self._log.info("xds_stream_opened", cluster=request.node.cluster,
                           envoy=_envoy_version(request.node))

    def _settle(self, type_url: snap.TypeUrl, *, watch: _Watch, request: discovery_pb2.DiscoveryRequest) -> None:
        """An ACK or NACK of the last response of this type."""
        if not request.HasField("error_detail"):
            watch.acked_version = request.version_info
            self._log.debug("xds_ack", type=type_url.short, version=request.version_info)
            return
        rejected = watch.sent_version
        if rejected is not None:
            watch.rejected.append(rejected)
        message = request.error_detail.message
        self._nacks.append(Nack(type_url=type_url, version=rejected, message=message))
        self._log.error("xds_nack", type=type_url.short, rejected_version=rejected,
                        kept_version=request.version_info or None, code=request.error_detail.code, error=message)

    def _needs(self, watch: _Watch, version: str) -> bool:
        if not watch.subscribed:
            return False
        asked_anew = watch.sent_version is None or not _covers(watch.sent_names, watch.names)
        if version in watch.rejected and not asked_anew:
            return False
        return asked_anew or watch.follow_up or version != watch.sent_version

    def _respond(
        self, type_url: snap.TypeUrl, *, watch: _Watch, current: snap.Snapshot
    ) -> discovery_pb2.DiscoveryResponse:
        version = current.version(type_url)
        names = watch.names
        if watch.follow_up and names is not None:
            # Following clusters (listeners) just sent: add the endpoints (routes) of the new
            # ones, which Envoy subscribes to while it applies them, before it reads this. They
            # then warm at once, before the listener that leads to them arrives.
            names = names | frozenset(current.types[type_url].resources)
        resources = current.resources(type_url, names)
        nonce = str(next(self._nonces))
        watch.sent_version, watch.sent_names, watch.nonce, watch.follow_up = version, names, nonce, False
        follower = _FOLLOWERS.get(type_url)
        if follower is not None:
            self._watches[follower].follow_up = True
        self._log.debug("xds_response_sent", type=type_url.short, version=version, serial=current.serial,
                        resources=len(resources), nonce=nonce)
        return discovery_pb2.DiscoveryResponse(
            version_info=version, resources=resources, type_url=type_url.value, nonce=nonce)


# Whose response must follow whose (see the module docstring).
_FOLLOWERS = {snap.TypeUrl.CLUSTER: snap.TypeUrl.ENDPOINT, snap.TypeUrl.LISTENER: snap.TypeUrl.ROUTE}


def _covers(sent: frozenset[str] | None, asked: frozenset[str] | None) -> bool:
    """Whether the last response held everything now asked for (a wildcard only covers a
    wildcard); asking for fewer names needs no new response."""
    if sent is None or asked is None:
        return sent is None and asked is None
    return asked <= sent


def _requested_names(type_url: snap.TypeUrl, request: discovery_pb2.DiscoveryRequest) -> frozenset[str] | None:
    names = frozenset(request.resource_names)
    if type_url in snap.WILDCARD_TYPES and (not names or "*" in names):
        return None
    return names - {"*"}


def _envoy_version(node: base_pb2.Node) -> str:
    build = node.user_agent_build_version.version
    if build.major_number or build.minor_number:
        return f"{build.major_number}.{build.minor_number}.{build.patch}"
    return node.user_agent_version or ""
