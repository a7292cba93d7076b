"""A minimal ADS client for tests: what Envoy does on the stream, by hand, with timeouts."""

from __future__ import annotations

import queue
import threading

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from meshredirect.xds import snapshot


class _End:
    """Marks the end of the request or response stream."""


_END = _End()


class AdsClient:
    def __init__(self, target: str, *, node_id: str = "sidecar~10.244.0.2~test.shop") -> None:
        self.node_id = node_id
        self.channel = grpc.insecure_channel(target)
        self._requests: queue.SimpleQueue[discovery_pb2.DiscoveryRequest | _End] = queue.SimpleQueue()
        self._responses: queue.SimpleQueue[discovery_pb2.DiscoveryResponse | grpc.RpcError | _End] = queue.SimpleQueue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self._call = stub.StreamAggregatedResources(iter(self._requests.get, _END))
        self._sent_node = False
        self.end: grpc.RpcError | None = None
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True, name="ads-client").start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
        except grpc.RpcError as exc:
            self.end = exc
        finally:
            self.ended.set()
            self._responses.put(_END)

    def send(self, type_url: snapshot.TypeUrl, *names: str, nonce: str = "", version: str = "",
             error: str | None = None) -> None:
        request = discovery_pb2.DiscoveryRequest(type_url=type_url.value, resource_names=names,
                                                 response_nonce=nonce, version_info=version)
        if not self._sent_node:  # as Envoy with set_node_on_first_message_only
            request.node.id = self.node_id
            request.node.cluster = "shop"
            self._sent_node = True
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._requests.put(request)

    def ack(self, response: discovery_pb2.DiscoveryResponse, *names: str) -> None:
        self.send(snapshot.TypeUrl(response.type_url), *names, nonce=response.nonce, version=response.version_info)

    def nack(self, response: discovery_pb2.DiscoveryResponse, *names: str, kept_version: str, error: str) -> None:
        self.send(snapshot.TypeUrl(response.type_url), *names, nonce=response.nonce, version=kept_version,
                  error=error)

    def receive(self, timeout: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        try:
            got = self._responses.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no response within {timeout}s") from None
        if not isinstance(got, discovery_pb2.DiscoveryResponse):
            raise AssertionError(f"stream ended: {self.end!r}")
        return got

    def receive_types(self, count: int, timeout: float = 5.0) -> list[discovery_pb2.DiscoveryResponse]:
        return [self.receive(timeout) for _ in range(count)]

    def quiet_for(self, seconds: float) -> bool:
        """True if no response arrives within `seconds`."""
        try:
            got = self._responses.get(timeout=seconds)
        except queue.Empty:
            return True
        self._responses.put(got)  # (order no longer matters: the caller fails on False)
        return False

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()
        self.channel.close()
