"""Feeds the planner's state to the node's xDS server without holding up the datapath.

A publication builds Envoy resources for every TCP service port (about 44 ms for one endpoint
change at 10k Services, 1 s for the first): the agent must not wait for that before it programs
the next change, and a node without sidecars should not pay for it at all. The agent `offer`s a
copy of what it planned; a thread of the feed publishes the latest offer, skipping any it did not
get to, and only while sidecars are `wanted` (a meshed pod on the node, or a sidecar connected).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import structlog

from ctlb import desired, model

if TYPE_CHECKING:  # grpc loads only when the agent serves xDS
    from meshredirect.xds.server import XdsServer

log = structlog.get_logger()

# How often an offer that is not wanted yet is looked at again: a sidecar that connects to a
# server with nothing published gets its first snapshot this long after.
_RECHECK_S = 0.25


class XdsFeed:
    def __init__(self, server: XdsServer, *, wanted: Callable[[], bool]) -> None:
        self.server = server
        self._wanted = wanted
        self._wake = threading.Condition()
        self._pending: tuple[dict[desired.ServicePortName, desired.ServicePortState], list[model.Service]] | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="xds-feed", daemon=True)
        self._thread.start()

    def offer(self, states: Mapping[desired.ServicePortName, desired.ServicePortState],
              services: Sequence[model.Service]) -> None:
        """Queues the planner's state for publication; copies it, so the planner may move on."""
        pending = (dict(states), list(services))
        with self._wake:
            self._pending = pending
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)
        self.server.stop()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (self._pending is None or not self._sidecars_wanted()):
                    self._wake.wait(None if self._pending is None else _RECHECK_S)
                if self._closed:
                    return
                states, services = self._pending  # type: ignore[misc]
                self._pending = None
            try:
                self.server.publish(states, services)
            except Exception:  # a bug in building resources must not end the feed
                log.exception("xds_publish_failed")

    def _sidecars_wanted(self) -> bool:
        return self._wanted() or bool(self.server.streams())
