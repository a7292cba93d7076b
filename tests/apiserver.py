"""A fake Kubernetes API server: the list and watch protocol over real HTTP, for the API source.

No API server can be installed here, so the API source is tested by driving the real `kubernetes`
client against this one. It keeps the parts of the protocol a list-watch client depends on: one
global, increasing resourceVersion; paginated lists (limit, continue) that are consistent
snapshots; watches streamed as chunked JSON lines from a retained event history, starting after
the requested resourceVersion; `410 Gone` (as an in-stream ERROR event, or as the HTTP status) when
that version has been compacted away or a continue token has expired; bookmarks; field selectors.

Tests steer it: create, modify and delete objects (each emits its watch event), compact the
history, expire continue tokens, drop every open watch, fail every request with a status, stop
and restart on the same port, and read back every request it served (to tell a relist from a
resumed watch).
"""

from __future__ import annotations

import base64
import bisect
import copy
import datetime
import http
import itertools
import json
import pathlib
import select
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kubernetes

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ResourceType:
    plural: str
    kind: str
    api_version: str
    namespaced: bool

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"


RESOURCES: dict[str, ResourceType] = {
    r.plural: r
    for r in (
        ResourceType("services", "Service", "v1", True),
        ResourceType("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", True),
        ResourceType("namespaces", "Namespace", "v1", False),
        ResourceType("nodes", "Node", "v1", False),
        ResourceType("pods", "Pod", "v1", True),
    )
}
_BY_KIND = {r.kind: r for r in RESOURCES.values()}
# The field labels the real server accepts for these kinds (a subset: the ones agents use).
_FIELD_LABELS = {"metadata.name", "metadata.namespace", "spec.nodeName"}


@dataclass(frozen=True, slots=True)
class Request:
    """One request the server answered: `verb` is "list" or "watch"."""

    resource: str
    verb: str
    params: Mapping[str, str]
    namespace: str | None = None
    authorization: str | None = None  # the Authorization header, to check credentials were sent


@dataclass(frozen=True, slots=True)
class _Event:
    rv: int
    resource: str
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    obj: Obj
    old: Obj | None = None  # the previous version, so a field-selected watch sees objects leave


@dataclass(slots=True)
class _ListSnapshot:
    """The items of a paginated list as of its first page: continued pages read from it."""

    rv: int
    items: list[Obj]


@dataclass(slots=True)
class _Watch:
    generation: int
    done: bool = False


class FakeApiServer:
    """The API server; use as a context manager, or `start()` and `stop()`.

    Args:
        history_limit: watch events retained; a watch from before the oldest gets 410 Gone.
        gone_as_status: answer an expired watch with HTTP 410 instead of an ERROR event in a
            200 stream (the real server does the latter; some proxies and old servers the former).
    """

    def __init__(self, *, history_limit: int = 100_000, gone_as_status: bool = False) -> None:
        self.history_limit = history_limit
        self.gone_as_status = gone_as_status
        self.port = 0
        self._cond = threading.Condition()
        self._rv = 1000
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {plural: {} for plural in RESOURCES}
        # Each stored object's JSON as a list item, encoded on its first list (see _list_item).
        self._item_json: dict[tuple[str, tuple[str, str]], tuple[Obj, bytes]] = {}
        self._history: list[_Event] = []
        self._base = 0  # sequence number of the oldest retained event
        self._compacted_rv = self._rv  # a watch from an older resourceVersion is answered 410
        self._snapshots: dict[str, _ListSnapshot] = {}
        self._snapshot_ids = itertools.count(1)
        self._expire_continues = 0
        self._fail_status: int | None = None
        self._drop_generation = 0
        self._watches: dict[str, list[_Watch]] = {plural: [] for plural in RESOURCES}
        self._requests: list[Request] = []
        self._sent: list[tuple[str, str, str]] = []
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> FakeApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Listens on 127.0.0.1: an ephemeral port the first time, the same port after a stop."""
        if self._server is not None:
            return
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.api = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-apiserver-{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops listening and cuts every open connection: the server is unreachable until `start`."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._cond:
            self._drop_generation += 1
            self._cond.notify_all()
            connections = list(self._connections)
        for conn in connections:
            _shut(conn)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def configuration(self) -> kubernetes.client.Configuration:
        """A client configuration for this server: plain HTTP, no auth, no client-side retries."""
        config = kubernetes.client.Configuration(host=self.url)
        config.retries = False  # the source retries with its own backoff; urllib3 would log each retry
        return config

    def api_client(self) -> kubernetes.client.ApiClient:
        return kubernetes.client.ApiClient(configuration=self.configuration())

    def write_kubeconfig(self, path: pathlib.Path) -> pathlib.Path:
        """A kubeconfig file naming this server, as `kubectl config view --raw` would write it."""
        document = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake", "preferences": {},
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }
        path.write_text(json.dumps(document))
        return path

    # --- objects ------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def create(self, obj: Obj) -> Obj:
        """Adds an object (ADDED); server-set metadata is filled in. Returns the stored object."""
        resource = _resource_of(obj)
        with self._cond:
            key = _key(obj)
            if key in self._objects[resource.plural]:
                raise KeyError(f"{resource.kind} {key} exists")
            return self._store(resource, obj, event="ADDED", old=None)

    def update(self, obj: Obj) -> Obj:
        """Replaces an existing object (MODIFIED)."""
        resource = _resource_of(obj)
        with self._cond:
            old = self._objects[resource.plural][_key(obj)]
            return self._store(resource, obj, event="MODIFIED", old=old)

    def apply(self, obj: Obj) -> Obj:
        """Creates or replaces, like `kubectl apply`."""
        resource = _resource_of(obj)
        with self._cond:
            old = self._objects[resource.plural].get(_key(obj))
            return self._store(resource, obj, event="ADDED" if old is None else "MODIFIED", old=old)

    def create_many(self, objects: list[Obj]) -> None:
        """Creates objects in bulk: one lock, no per-object wake-up (for 10k-object set-ups)."""
        with self._cond:
            for obj in objects:
                resource = _resource_of(obj)
                self._store(resource, obj, event="ADDED", old=None, notify=False)
            self._cond.notify_all()

    def delete(self, kind: str, namespace: str, name: str) -> Obj:
        """Removes an object (DELETED, carrying its last state with a new resourceVersion)."""
        resource = _BY_KIND[kind]
        with self._cond:
            old = self._objects[resource.plural].pop((namespace if resource.namespaced else "", name))
            self._rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._record(_Event(self._rv, resource.plural, "DELETED", gone, old))
            return gone

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        resource = _BY_KIND[kind]
        with self._cond:
            obj = self._objects[resource.plural].get((namespace if resource.namespaced else "", name))
            return copy.deepcopy(obj) if obj is not None else None

    def bookmark(self, plural: str | None = None) -> int:
        """Sends a BOOKMARK at the current resourceVersion to the open watches (all resources, or
        one) that asked for bookmarks. Returns that resourceVersion."""
        with self._cond:
            for resource in [RESOURCES[plural]] if plural else RESOURCES.values():
                marker = {"kind": resource.kind, "apiVersion": resource.api_version,
                          "metadata": {"resourceVersion": str(self._rv)}}
                self._record(_Event(self._rv, resource.plural, "BOOKMARK", marker))
            return self._rv

    def inject(self, plural: str, event_type: str, obj: Obj) -> None:
        """Streams a raw event to the open watches without storing anything: a way to send what
        a correct server never would (an object without a name, say)."""
        with self._cond:
            self._rv += 1
            self._record(_Event(self._rv, plural, event_type, obj))

    def advance(self, steps: int = 1) -> int:
        """Moves the global resourceVersion on, as writes to other kinds of object would."""
        with self._cond:
            self._rv += steps
            return self._rv

    # --- faults -------------------------------------------------------------------------------

    def compact(self) -> None:
        """Forgets the event history and every list snapshot, as etcd compaction does: a watch
        from an older resourceVersion, or a continue token, is answered 410 Gone."""
        with self._cond:
            self._base += len(self._history)
            self._history.clear()
            self._compacted_rv = self._rv
            self._snapshots.clear()

    def expire_continues(self, count: int = 1) -> None:
        """The next `count` requests carrying a continue token get 410 Gone (Expired)."""
        with self._cond:
            self._expire_continues += count

    def fail_requests(self, status: int | None) -> None:
        """Answers every list and watch with this HTTP status (None: serve normally again)."""
        with self._cond:
            self._fail_status = status

    def drop_watches(self) -> None:
        """Cuts every open watch connection mid-stream, without the final chunk."""
        with self._cond:
            self._drop_generation += 1
            self._cond.notify_all()

    # --- what happened ------------------------------------------------------------------------

    def requests(self, resource: str | None = None, verb: str | None = None) -> list[Request]:
        with self._cond:
            return [r for r in self._requests
                    if (resource is None or r.resource == resource) and (verb is None or r.verb == verb)]

    def count(self, resource: str, verb: str) -> int:
        return len(self.requests(resource, verb))

    def sent(self, resource: str) -> list[tuple[str, str]]:
        """(event type, resourceVersion) of every watch event written to a `resource` watcher."""
        with self._cond:
            return [(t, rv) for r, t, rv in self._sent if r == resource]

    def open_watches(self, resource: str) -> int:
        with self._cond:
            return sum(1 for w in self._watches[resource] if not w.done)

    # --- internals: state ---------------------------------------------------------------------

    def _store(self, resource: ResourceType, obj: Obj, *, event: str, old: Obj | None,
               notify: bool = True) -> Obj:
        self._rv += 1
        stored = copy.deepcopy(obj)
        meta = stored.setdefault("metadata", {})
        if not resource.namespaced:
            meta.pop("namespace", None)
        elif not meta.get("namespace"):
            meta["namespace"] = "default"
        meta["resourceVersion"] = str(self._rv)
        if old is not None:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        stored["kind"] = resource.kind
        stored["apiVersion"] = resource.api_version
        self._objects[resource.plural][_key(stored)] = stored
        self._record(_Event(self._rv, resource.plural, event, stored, old), notify=notify)
        return copy.deepcopy(stored)

    def _record(self, event: _Event, *, notify: bool = True) -> None:
        self._history.append(event)
        if len(self._history) > self.history_limit:
            dropped = self._history[: len(self._history) - self.history_limit]
            del self._history[: len(dropped)]
            self._base += len(dropped)
            self._compacted_rv = max(self._compacted_rv, dropped[-1].rv)
        if notify:
            self._cond.notify_all()

    def _matching(self, resource: ResourceType, *, namespace: str | None,
                  selector: list[tuple[str, str, bool]]) -> list[Obj]:
        objects = self._objects[resource.plural]
        return [objects[key] for key in sorted(objects)
                if _matches(objects[key], namespace=namespace, selector=selector)]

    # --- internals: requests ------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        url = urllib.parse.urlsplit(handler.path)
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        route = _route(url.path)
        if route is None:
            _send_status(handler, 404, "NotFound", f"the server could not find the requested resource ({url.path})")
            return
        resource, namespace = route
        watching = params.get("watch", "").lower() in ("true", "1")
        with self._cond:
            self._requests.append(Request(resource.plural, "watch" if watching else "list", params, namespace,
                                          handler.headers.get("Authorization")))
            fail = self._fail_status
        if fail is not None:
            _send_status(handler, fail, http.HTTPStatus(fail).phrase.replace(" ", ""), "injected failure")
            return
        try:
            selector = _field_selector(params.get("fieldSelector", ""))
        except ValueError as bad:
            _send_status(handler, 400, "BadRequest", str(bad))
            return
        if watching:
            self._serve_watch(handler, resource, namespace=namespace, selector=selector, params=params)
        else:
            self._serve_list(handler, resource, namespace=namespace, selector=selector, params=params)

    def _serve_list(self, handler: _Handler, resource: ResourceType, *, namespace: str | None,
                    selector: list[tuple[str, str, bool]], params: Mapping[str, str]) -> None:
        limit = int(params.get("limit") or 0)
        token = params.get("continue") or ""
        with self._cond:
            if token:
                snapshot_id, offset = _decode_continue(token)
                snapshot = self._snapshots.get(snapshot_id)
                if self._expire_continues > 0 or snapshot is None:
                    self._expire_continues = max(0, self._expire_continues - 1)
                    self._snapshots.pop(snapshot_id, None)
                    _send_status(handler, 410, "Expired", _CONTINUE_EXPIRED)
                    return
            else:
                snapshot_id, offset = str(next(self._snapshot_ids)), 0
                snapshot = _ListSnapshot(self._rv, self._matching(resource, namespace=namespace, selector=selector))
            end = offset + limit if limit > 0 else len(snapshot.items)
            page = snapshot.items[offset:end]
            metadata: Obj = {"resourceVersion": str(snapshot.rv)}
            if end < len(snapshot.items):
                self._snapshots[snapshot_id] = snapshot
                metadata["continue"] = _encode_continue(snapshot_id, end)
                metadata["remainingItemCount"] = len(snapshot.items) - end
            else:
                self._snapshots.pop(snapshot_id, None)
        head = {"kind": f"{resource.kind}List", "apiVersion": resource.api_version, "metadata": metadata}
        items = b",".join([self._list_item(resource, obj) for obj in page])
        _send_bytes(handler, 200, _json(head)[:-1] + b',"items":[' + items + b"]}")

    def _list_item(self, resource: ResourceType, obj: Obj) -> bytes:
        """An object's JSON as a list item, without kind and apiVersion, as the real server serves
        typed lists. Encoded once per stored version: a stored object is never changed, only
        replaced. The real server serves lists from its watch cache, in Go, on other machines;
        re-encoding 19 MB of EndpointSlices per list in Python, on the two cores the agent under
        test runs on, made this server the pace of the start-up bench (bench/api_scale.py)."""
        key = (resource.plural, _key(obj))
        cached = self._item_json.get(key)
        if cached is None or cached[0] is not obj:
            cached = (obj, _json({k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}))
            self._item_json[key] = cached
        return cached[1]

    def _serve_watch(self, handler: _Handler, resource: ResourceType, *, namespace: str | None,
                     selector: list[tuple[str, str, bool]], params: Mapping[str, str]) -> None:
        requested = params.get("resourceVersion") or ""
        bookmarks = params.get("allowWatchBookmarks", "").lower() in ("true", "1")
        timeout = float(params.get("timeoutSeconds") or 0)
        deadline = time.monotonic() + timeout if timeout > 0 else None
        with self._cond:
            watch = _Watch(self._drop_generation)
            initial: list[_Event] = []
            if requested in ("", "0"):
                # "Any version": synthetic ADDED events for what exists, then what follows.
                initial = [_Event(self._rv, resource.plural, "ADDED", obj)
                           for obj in self._matching(resource, namespace=namespace, selector=selector)]
                cursor = self._rv
            elif int(requested) < self._compacted_rv:
                cursor = -1
            else:
                cursor = int(requested)
            position = self._position_after(cursor) if cursor >= 0 else 0
            gone_message = f"too old resource version: {requested} ({self._compacted_rv})"
            self._watches[resource.plural].append(watch)
        try:
            if cursor < 0 and self.gone_as_status:
                _send_status(handler, 410, "Expired", gone_message)
                return
            _start_chunked(handler)
            if cursor < 0:
                _write_event(handler, "ERROR", _status(410, "Expired", gone_message))
                _end_chunked(handler)
                return
            for event in initial:
                _write_event(handler, event.type, event.obj)
                self._note_sent(resource, event.type, event.obj)
            self._stream(handler, watch, resource, position=position, deadline=deadline, bookmarks=bookmarks,
                         namespace=namespace, selector=selector)
        except OSError:
            handler.close_connection = True  # the client went away
        finally:
            with self._cond:
                watch.done = True
                self._watches[resource.plural].remove(watch)

    def _note_sent(self, resource: ResourceType, event_type: str, obj: Obj) -> None:
        with self._cond:
            self._sent.append((resource.plural, event_type, obj["metadata"].get("resourceVersion", "")))

    def _position_after(self, rv: int) -> int:
        """Sequence number of the first retained event newer than `rv` (history is in rv order)."""
        return self._base + bisect.bisect_right(self._history, rv, key=_rv_of)

    def _stream(self, handler: _Handler, watch: _Watch, resource: ResourceType, *, position: int,
                deadline: float | None, bookmarks: bool, namespace: str | None,
                selector: list[tuple[str, str, bool]]) -> None:
        # `position` is a sequence number: history indexes shift when old events are trimmed.
        while True:
            with self._cond:
                while True:
                    if watch.generation != self._drop_generation:
                        _drop(handler)
                        return
                    if position < self._base + len(self._history):
                        break
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        _end_chunked(handler)
                        return
                    if _client_left(handler.connection):
                        handler.close_connection = True
                        return
                    self._cond.wait(timeout=0.2 if remaining is None else min(remaining, 0.2))
                if position < self._base:
                    # Fell behind the retained window while connected: the real server ends the watch.
                    gone = _status(410, "Expired", f"too old resource version ({self._compacted_rv})")
                    pending = [_Event(0, resource.plural, "ERROR", gone)]
                else:
                    pending = self._history[position - self._base:]
                    position = self._base + len(self._history)
            for event in pending:
                if event.type == "ERROR":
                    _write_event(handler, "ERROR", event.obj)
                    _end_chunked(handler)
                    return
                translated = _for_watcher(event, resource=resource, bookmarks=bookmarks, namespace=namespace,
                                          selector=selector)
                if translated is not None:
                    _write_event(handler, *translated)
                    self._note_sent(resource, *translated)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    api: FakeApiServer

    def process_request(self, request: socket.socket, client_address: Any) -> None:  # type: ignore[override]
        with self.api._cond:
            self.api._connections.add(request)
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-request (the source cutting its connections on close) is normal.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self.api._cond:
            self.api._connections.discard(request)
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked transfer, as the real server speaks
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.api._handle(self)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet: tests read `requests()` instead


# --- object builders: the shapes the real server returns ------------------------------------


def service(namespace: str, name: str, *, cluster_ip: str = "10.96.0.10",
            ports: list[tuple[str, int, int | str]] | None = None, node_port: int | None = None,
            labels: Mapping[str, str] | None = None) -> Obj:
    """A ClusterIP (or, with a node port, NodePort) Service as `kubectl get -o json` shows it."""
    port_list = ports if ports is not None else [("http", 80, 8080)]
    spec_ports = []
    for port_name, port, target in port_list:
        entry: Obj = {"name": port_name, "port": port, "protocol": "TCP", "targetPort": target}
        if node_port is not None:
            entry["nodePort"] = node_port
        spec_ports.append(entry)
    family = "IPv6" if ":" in cluster_ip else "IPv4"
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {"app": name}),
                     "managedFields": [_managed_field("kubectl-client-side-apply", "v1")]},
        "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "internalTrafficPolicy": "Cluster",
                 "ipFamilies": [family], "ipFamilyPolicy": "SingleStack", "ports": spec_ports,
                 "selector": {"app": name}, "sessionAffinity": "None",
                 "type": "NodePort" if node_port is not None else "ClusterIP"},
        "status": {"loadBalancer": {}},
    }


def endpoint_slice(namespace: str, name: str, *, service_name: str, addresses: list[str],
                   port: int = 8080, port_name: str = "http", node_name: str = "node-1") -> Obj:
    """An EndpointSlice as the EndpointSlice controller writes it: one endpoint per address."""
    family = "IPv6" if addresses and ":" in addresses[0] else "IPv4"
    endpoints = [
        {"addresses": [address], "conditions": {"ready": True, "serving": True, "terminating": False},
         "nodeName": node_name, "zone": "zone-a",
         "targetRef": {"kind": "Pod", "name": f"{service_name}-{i}", "namespace": namespace,
                       "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{name}/{i}"))}}
        for i, address in enumerate(addresses)
    ]
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "generateName": f"{service_name}-", "generation": 1,
                     "labels": {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                                "kubernetes.io/service-name": service_name},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2024-05-02T10:11:12Z"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service_name,
                                          "blockOwnerDeletion": True, "controller": True,
                                          "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{service_name}"))}],
                     "managedFields": [_managed_field("endpointslice-controller.k8s.io", "discovery.k8s.io/v1")]},
        "addressType": family,
        "endpoints": endpoints,
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    }


def node(name: str, *, internal_ip: str = "192.168.0.10") -> Obj:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": internal_ip}, {"type": "Hostname", "address": name}],
                   "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]},
    }


def namespace(name: str, *, labels: Mapping[str, str] | None = None) -> Obj:
    all_labels = {"kubernetes.io/metadata.name": name, **(labels or {})}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": all_labels},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def pod(namespace: str, name: str, *, node_name: str, ip: str) -> Obj:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"nodeName": node_name, "containers": [{"name": "app", "image": "nginx:1.27"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "qosClass": "BestEffort"},
    }


# --- helpers ---------------------------------------------------------------------------------

_CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. You can start a new "
    "list without the continue parameter, or use the continue token in this response to retrieve the "
    "remainder of the results. Continuing with the provided token results in an inconsistent list - "
    "objects that were created, modified, or deleted between the time the first chunk was returned and "
    "now may show up in the list."
)


def _managed_field(manager: str, api_version: str) -> Obj:
    return {"apiVersion": api_version, "fieldsType": "FieldsV1", "manager": manager, "operation": "Update",
            "time": "2024-05-02T10:11:12Z", "fieldsV1": {"f:metadata": {"f:labels": {".": {}}}}}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _resource_of(obj: Obj) -> ResourceType:
    return _BY_KIND[obj["kind"]]


def _rv_of(event: _Event) -> int:
    return event.rv


def _key(obj: Obj) -> tuple[str, str]:
    meta = obj["metadata"]
    if not _BY_KIND[obj["kind"]].namespaced:
        return ("", meta["name"])
    return (meta.get("namespace") or "default", meta["name"])


def _route(path: str) -> tuple[ResourceType, str | None] | None:
    """(resource, namespace) for a collection path, cluster-wide or namespaced."""
    for resource in RESOURCES.values():
        prefix = resource.prefix
        if path == f"{prefix}/{resource.plural}":
            return resource, None
        parts = path.removeprefix(prefix + "/").split("/")
        if (resource.namespaced and path.startswith(prefix + "/") and len(parts) == 3
                and parts[0] == "namespaces" and parts[2] == resource.plural):
            return resource, parts[1]
    return None


def _field_selector(text: str) -> list[tuple[str, str, bool]]:
    """Terms of a field selector as (field, value, equal); raises ValueError like the server's 400."""
    terms = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        for op, equal in (("!=", False), ("==", True), ("=", True)):
            if op in term:
                name, value = term.split(op, 1)
                break
        else:
            raise ValueError(f"invalid selector: {term!r}")
        if name not in _FIELD_LABELS:
            raise ValueError(f'field label not supported: {name}')
        terms.append((name, value, equal))
    return terms


def _field(obj: Obj, name: str) -> str:
    value: Any = obj
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, str) else ""


def _matches(obj: Obj | None, *, namespace: str | None, selector: list[tuple[str, str, bool]]) -> bool:
    if obj is None:
        return False
    if namespace is not None and obj["metadata"].get("namespace") != namespace:
        return False
    return all((_field(obj, name) == value) == equal for name, value, equal in selector)


def _for_watcher(event: _Event, *, resource: ResourceType, bookmarks: bool, namespace: str | None,
                 selector: list[tuple[str, str, bool]]) -> tuple[str, Obj] | None:
    """The event as one watcher sees it: other resources and unmatched objects filtered out, and
    an object moving out of (into) its field selector seen as DELETED (ADDED)."""
    if event.resource != resource.plural:
        return None
    if event.type == "BOOKMARK":
        return ("BOOKMARK", event.obj) if bookmarks else None
    now = _matches(event.obj, namespace=namespace, selector=selector)
    before = _matches(event.old, namespace=namespace, selector=selector)
    if event.type == "DELETED":
        return ("DELETED", event.obj) if before or now else None
    if event.type == "MODIFIED" and before != now:
        return ("ADDED", event.obj) if now else ("DELETED", event.obj)
    return (event.type, event.obj) if now else None


def _encode_continue(snapshot_id: str, offset: int) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "id": snapshot_id, "start": offset}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_continue(token: str) -> tuple[str, int]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        return str(data["id"]), int(data["start"])
    except (ValueError, KeyError, TypeError):
        return "", 0


def _status(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _json(body: Obj) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _send_json(handler: _Handler, code: int, body: Obj) -> None:
    _send_bytes(handler, code, _json(body))


def _send_bytes(handler: _Handler, code: int, data: bytes) -> None:
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _send_status(handler: _Handler, code: int, reason: str, message: str) -> None:
    _send_json(handler, code, _status(code, reason, message))


def _start_chunked(handler: _Handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()


def _write_event(handler: _Handler, event_type: str, obj: Obj) -> None:
    line = json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"
    handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))


def _end_chunked(handler: _Handler) -> None:
    handler.wfile.write(b"0\r\n\r\n")


def _drop(handler: _Handler) -> None:
    """Cuts the connection mid-stream, as a crashed server or a broken network would."""
    handler.close_connection = True
    _shut(handler.connection)


def _client_left(conn: socket.socket) -> bool:
    """True once the client closed its end: an idle watch would otherwise notice only on a write."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _shut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def wait_for(condition: Callable[[], bool], *, timeout: float = 10.0, interval: float = 0.01,
             what: str = "condition") -> None:
    """Polls until `condition()` holds; raises AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


__all__ = ["FakeApiServer", "Request", "RESOURCES", "endpoint_slice", "namespace", "node", "pod", "service",
           "wait_for"]
