"""The Kubernetes API source: lists and watches the API server into the object store.

It owns the list-watch protocol for the five kinds ctlb serves, one thread per resource: a
paginated list, then a watch from the list's resourceVersion, resumed from the last version seen
(bookmarks included) whenever the stream drops, and a full relist only when the server answers
410 Gone. A relist is also when objects deleted while the watch was down are noticed: whatever
the store holds that the list no longer has is deleted. An unreachable or failing server is
retried with jittered backoff and never costs the store an object, so the datapath keeps serving
what it had. Objects are converted by `ctlb.kubeobjects`, the same conversion the manifest
source uses; an invalid new version of an object leaves its last valid version in place.

It talks through the official `kubernetes` client (configuration, auth, TLS, the REST layer) but
reads responses as raw JSON (`_preload_content=False`): the client's generated models cost
seconds at 10k objects, and their snake_case is not the shape `kubeobjects` reads.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import http.client
import json
import pathlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import kubernetes
import msgspec
import structlog
import urllib3
import yaml

from ctlb import errors, kubeobjects, model
from ctlb.sources import backoff as backoff_
from ctlb.sources import store as store_

log = structlog.get_logger()

DEFAULT_PAGE_SIZE = 500
_GONE = 410
# Errors of the transport: the server is unreachable, or the connection broke mid-response.
_TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


class ApiConfigError(errors.CtlbError):
    """No usable client configuration: not in a cluster, or the kubeconfig file is bad."""


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """How the source stands, for `ctlb status` and the agent's logs.

    `stale_since` is when the source lost the server (ISO-8601, UTC), None while connected;
    `last_error` is the most recent failure, kept after recovery so a flapping server shows.
    """

    connected: bool
    synced: bool
    stale_since: str | None
    last_error: str | None


def api_client(kubeconfig: pathlib.Path | None) -> kubernetes.client.ApiClient:
    """A client for the API server: the pod's service account, or a kubeconfig file.

    Args:
        kubeconfig: the kubeconfig file (its current context), or None for the in-cluster
            configuration (service account token and CA, KUBERNETES_SERVICE_HOST/PORT).

    Returns:
        The client, with urllib3's own retries off: the source retries with its own backoff.

    Raises:
        ApiConfigError: not running in a cluster, or the kubeconfig cannot be read or used.
    """
    configuration = kubernetes.client.Configuration()
    try:
        if kubeconfig is None:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        else:
            # persist_config=False: refreshing a token must never rewrite the user's file.
            kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration,
                                               persist_config=False)
    except (kubernetes.config.ConfigException, OSError, yaml.YAMLError, ValueError) as error:
        where = "in-cluster configuration" if kubeconfig is None else f"kubeconfig {kubeconfig}"
        raise ApiConfigError(f"{where}: {error}") from None
    configuration.retries = False
    return kubernetes.client.ApiClient(configuration=configuration)


@dataclass(frozen=True, slots=True)
class _Resource:
    """One watched collection: its kind, and the client method that lists and watches it."""

    kind: str
    api_version: str
    plural: str
    namespaced: bool
    field_selector: str | None
    call: Callable[..., urllib3.BaseHTTPResponse]


def _resources(client: kubernetes.client.ApiClient, node_name: str) -> tuple[_Resource, ...]:
    core = kubernetes.client.CoreV1Api(client)
    discovery = kubernetes.client.DiscoveryV1Api(client)
    return (
        _Resource("Service", "v1", "services", True, None, core.list_service_for_all_namespaces),
        _Resource("EndpointSlice", "discovery.k8s.io/v1", "endpointslices", True, None,
                  discovery.list_endpoint_slice_for_all_namespaces),
        _Resource("Namespace", "v1", "namespaces", False, None, core.list_namespace),
        # Only this node's Node and Pods: a node agent has no use for the rest of the cluster's.
        _Resource("Node", "v1", "nodes", False, f"metadata.name={node_name}", core.list_node),
        _Resource("Pod", "v1", "pods", True, f"spec.nodeName={node_name}", core.list_pod_for_all_namespaces),
    )


@dataclass(frozen=True, slots=True)
class _Timeouts:
    connect: float
    read: float  # the longest silence on a connection before it counts as dead
    watch: float  # what the server is asked to keep a watch open for (timeoutSeconds), jittered up to 2x


class KubeApiSource:
    """Lists and watches Services, EndpointSlices, Namespaces, this node's Node and its Pods.

    Args:
        store: where objects and problems go.
        client: the API client (see `api_client`).
        node_name: this node: selects the Node object and the Pods scheduled here.
        page_size: items per list page (`limit`).
        backoff_base: the first wait after a failure, in seconds.
        backoff_cap: the longest wait between attempts, in seconds.
        watch_timeout: how long each watch asks the server to stay open (timeoutSeconds, jittered
            up to twice that, so the agents of a cluster do not all reconnect at once).
        read_timeout: seconds of silence after which a connection counts as dead.
        connect_timeout: seconds to wait for the server to accept a connection.
    """

    def __init__(self, store: store_.ObjectStore, *, client: kubernetes.client.ApiClient, node_name: str,
                 page_size: int = DEFAULT_PAGE_SIZE, backoff_base: float = 0.2, backoff_cap: float = 30.0,
                 watch_timeout: float = 300.0, read_timeout: float = 90.0, connect_timeout: float = 10.0) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        self._client = client
        self._stop = threading.Event()
        timeouts = _Timeouts(connect=connect_timeout, read=read_timeout, watch=watch_timeout)
        self._watchers = [
            _ListWatch(resource, store=store, stop=self._stop, page_size=page_size, timeouts=timeouts,
                       backoff=backoff_.Backoff(base=backoff_base, cap=backoff_cap))
            for resource in _resources(client, node_name)
        ]
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Starts one list-watch thread per resource and returns at once."""
        if self._threads:
            raise RuntimeError("the API source is already started")
        log.info("api_source_starting", server=self._client.configuration.host)
        for watcher in self._watchers:
            thread = threading.Thread(target=watcher.run_guarded, name=f"ctlb-watch-{watcher.resource.plural}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stops the threads and waits for them; open connections are cut so none lingers in a read.

        The store keeps every object: stopping the source withdraws nothing.
        """
        self._stop.set()
        for watcher in self._watchers:
            watcher.abort()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                # Stuck connecting (no answer yet to abort): a daemon thread, it dies with the process.
                log.warning("watch_thread_not_stopped", thread=thread.name)

    def describe(self) -> str:
        return f"kubernetes:{self._client.configuration.host}"

    def synced(self) -> bool:
        """True once every resource has completed its first full list."""
        return all(watcher.health().synced for watcher in self._watchers)

    def status(self) -> SourceStatus:
        healths = [watcher.health() for watcher in self._watchers]
        connected = all(h.connected for h in healths)
        lost = [h.lost_at for h in healths if not h.connected and h.lost_at is not None]
        failures = [(h.error_at, h.last_error) for h in healths if h.error_at is not None and h.last_error]
        return SourceStatus(
            connected=connected,
            synced=all(h.synced for h in healths),
            stale_since=_iso(min(lost)) if lost and not connected else None,
            last_error=max(failures)[1] if failures else None,
        )

    def check(self) -> None:
        """Raises the error that ended a watch thread, if one did: a bug, which must stop the agent."""
        for watcher in self._watchers:
            if watcher.crash is not None:
                raise watcher.crash


# --- one resource's list-watch loop ----------------------------------------------------------


class _Gone(Exception):
    """410 Gone: the resourceVersion or continue token is too old; only a fresh list helps."""


class _Failure(Exception):
    """The server is unreachable, or answered with an error: retry after a backoff."""

    def __init__(self, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True, slots=True)
class _Health:
    connected: bool
    synced: bool
    lost_at: datetime.datetime | None
    last_error: str | None
    error_at: datetime.datetime | None


class _ListWatch:
    """Keeps the store's objects of one resource equal to the server's, in its own thread."""

    def __init__(self, resource: _Resource, *, store: store_.ObjectStore, stop: threading.Event, page_size: int,
                 timeouts: _Timeouts, backoff: backoff_.Backoff) -> None:
        self.resource = resource
        self.crash: Exception | None = None
        self._store = store
        self._stop = stop
        self._page_size = page_size
        self._timeouts = timeouts
        self._backoff = backoff
        self._log = log.bind(resource=resource.plural)
        self._rv: str | None = None  # where the watch resumes; None: list first
        self._retried_at_once = False
        self._problem_keys: set[store_.Key] = set()  # objects whose latest version is invalid
        self._unnamed: set[model.Problem] = set()  # objects too malformed to be named
        self._lock = threading.Lock()
        self._response: urllib3.BaseHTTPResponse | None = None
        self._connected = False
        self._synced = False
        self._lost_at: datetime.datetime | None = None
        self._dropped_at: datetime.datetime | None = None
        self._last_error: str | None = None
        self._error_at: datetime.datetime | None = None

    # --- thread ---------------------------------------------------------------------------------

    def run_guarded(self) -> None:
        # The thread's boundary: an unexpected error is a bug; keep it for `check` to raise in the
        # agent's thread, where it stops the agent, instead of dying silently with this thread.
        try:
            self.run()
        except Exception as bug:  # noqa: BLE001
            self._log.exception("watch_crashed")
            self.crash = bug

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._rv is None:
                    self._list()
                if not self._stop.is_set():
                    self._watch()
            except _Gone as gone:
                if self._stop.is_set():
                    return
                self._rv = None
                self._log.info("relist", reason=str(gone))
                self._retry_soon()
            except _Failure as failure:
                if self._stop.is_set():
                    return
                self._failed(failure)

    def abort(self) -> None:
        """Cuts the connection this thread is reading from, so `close` need not wait for a timeout."""
        with self._lock:
            response = self._response
        if response is not None:
            _shut(response)

    def health(self) -> _Health:
        with self._lock:
            return _Health(self._connected, self._synced, self._lost_at, self._last_error, self._error_at)

    # --- list -----------------------------------------------------------------------------------

    def _list(self) -> None:
        """Lists every page, then deletes what the store holds that the list no longer has."""
        started = time.monotonic()
        seen: set[store_.Key] = set()
        unnamed: set[model.Problem] = set()
        pages = 0
        # The next page is asked for as soon as this one's continue token is known, so the server
        # prepares it while this thread converts this one: the list then takes about as long as
        # the slower of the two, not their sum (10k EndpointSlices: 20 pages of 500).
        with concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                   thread_name_prefix=f"ctlb-list-{self.resource.plural}") as fetcher:
            upcoming = fetcher.submit(self._list_page, None)
            while True:
                page = upcoming.result()
                pages += 1
                token = page.metadata.continue_token or None
                if token is not None and not self._stop.is_set():
                    upcoming = fetcher.submit(self._list_page, token)
                for item in page.items or ():
                    self._apply_listed(item, seen=seen, unnamed=unnamed)
                if token is None:
                    break
                if self._stop.is_set():
                    return
        self._remove_missing(seen)
        self._set_unnamed(unnamed)
        self._rv = page.metadata.resource_version
        with self._lock:
            self._synced = True
        self._store.notify()  # whoever waits for the first list wakes now
        self._succeeded()
        self._log.info("resource_listed", objects=len(seen), pages=pages, resource_version=self._rv,
                       seconds=round(time.monotonic() - started, 3))

    def _list_page(self, token: str | None) -> _ListPage:
        response = self._request(limit=self._page_size, _continue=token, field_selector=self.resource.field_selector,
                                 _request_timeout=(self._timeouts.connect, self._timeouts.read))
        complete = False
        try:
            data = response.data
            complete = True
        except _TRANSPORT_ERRORS as error:
            raise _Failure(f"reading the {self.resource.plural} list: {_describe(error)}", unreachable=True) from None
        finally:
            self._finish(response, complete=complete)
        try:
            return _PAGE.decode(data)
        except msgspec.DecodeError:
            return self._list_page_of_document(data)  # not the common form: the stdlib says what is wrong

    def _list_page_of_document(self, data: bytes) -> _ListPage:
        try:
            body = json.loads(data)
        except ValueError as error:
            raise _Failure(f"the {self.resource.plural} list is not JSON: {error}", unreachable=False) from None
        if not _is_list(body):
            raise _Failure(f"the {self.resource.plural} list has no items or metadata.resourceVersion",
                           unreachable=False)
        meta = body["metadata"]
        continue_token = meta.get("continue")
        return _ListPage(
            metadata=_ListMeta(resource_version=meta["resourceVersion"],
                               continue_token=continue_token if isinstance(continue_token, str) else None),
            items=[msgspec.Raw(json.dumps(item).encode()) for item in body["items"] or ()],
        )

    def _apply_listed(self, item: msgspec.Raw, *, seen: set[store_.Key],
                      unnamed: set[model.Problem]) -> None:
        # Most items take the typed pass straight from their JSON; the rest are decoded and
        # parsed field by field, which names what is wrong with them.
        obj = kubeobjects.parse_json_common(item, kind=self.resource.kind, api_version=self.resource.api_version)
        if obj is not None:
            key = self._store.put(obj)
            seen.add(key)
            self._clear_problem(key)
            return
        raw = self._typed(json.loads(bytes(item)))
        key = self._key(raw)
        if key is None:
            unnamed.add(self._unnamed_problem())
            return
        seen.add(key)
        self._apply(raw, key)

    def _remove_missing(self, seen: set[store_.Key]) -> None:
        """Deletes objects the list no longer has: deleted while the watch was down."""
        missing = [key for key in self._store.keys(self.resource.kind) if key not in seen]
        for key in missing:
            self._store.delete(key)
        for key in self._problem_keys - seen:
            self._clear_problem(key)
        if missing:
            self._log.info("relist_removed", objects=len(missing))

    # --- watch ----------------------------------------------------------------------------------

    def _watch(self) -> None:
        """Follows the watch until it ends, drops, or asks for a relist."""
        timeout_seconds = int(self._timeouts.watch * (1 + random.random()))
        response = self._request(watch=True, resource_version=self._rv, allow_watch_bookmarks=True,
                                 field_selector=self.resource.field_selector, timeout_seconds=timeout_seconds,
                                 _request_timeout=(self._timeouts.connect, self._timeouts.read))
        started_from = self._rv
        try:
            for line in _lines(response):
                self._on_event(_decode_event(line, resource=self.resource.plural))
                self._succeeded()
                if self._stop.is_set():
                    return
        except urllib3.exceptions.ReadTimeoutError:
            # Silent for a whole read timeout: the connection may be dead. Resuming is cheap.
            self._log.debug("watch_idle", resource_version=self._rv)
            return
        except _TRANSPORT_ERRORS as error:
            if self._stop.is_set():
                return
            with self._lock:
                self._dropped_at = self._dropped_at or _now()
            self._log.info("watch_dropped", error=_describe(error), resource_version=self._rv)
            self._retry_soon()
            return
        finally:
            self._finish(response, complete=False)
        self._succeeded()
        self._log.debug("watch_ended", started_from=started_from, resource_version=self._rv)

    def _on_event(self, event: Mapping[str, Any]) -> None:
        kind, obj = event["type"], event["object"]
        if kind == "ERROR":
            code, message = obj.get("code"), obj.get("message") or obj.get("reason") or "no message"
            if code == _GONE:
                raise _Gone(f"watch: {message}")
            raise _Failure(f"watch error {code}: {message}", unreachable=False)
        if kind in ("ADDED", "MODIFIED"):
            raw = self._typed(obj)
            key = self._key(raw)
            if key is None:
                self._add_unnamed()
            else:
                self._apply(raw, key)
        elif kind == "DELETED":
            key = self._key(obj)
            if key is not None:
                self._store.delete(key)
                self._clear_problem(key)
        elif kind != "BOOKMARK":
            self._log.warning("watch_event_unknown", type=kind)
        # Every event, bookmarks above all, moves the point a dropped watch resumes from.
        rv = _resource_version(obj)
        if rv is not None:
            self._rv = rv

    # --- objects --------------------------------------------------------------------------------

    def _typed(self, item: object) -> Any:
        # List items come without kind and apiVersion: they are the list's.
        if isinstance(item, dict):
            item.setdefault("kind", self.resource.kind)
            item.setdefault("apiVersion", self.resource.api_version)
        return item

    def _key(self, raw: object) -> store_.Key | None:
        """The store key of a raw object, computed as `kubeobjects` names it; None if it has no name."""
        meta = raw.get("metadata") if isinstance(raw, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not name:
            return None
        if not self.resource.namespaced:
            return (self.resource.kind, "", name)
        namespace = meta.get("namespace")
        if not isinstance(namespace, str) or not namespace:
            namespace = kubeobjects.DEFAULT_NAMESPACE
        return (self.resource.kind, namespace, name)

    def _apply(self, raw: Mapping[str, Any], key: store_.Key) -> None:
        """Puts a valid object; an invalid one leaves its last valid version in place, reported."""
        try:
            obj = kubeobjects.parse(raw)
        except errors.InvalidObject as invalid:
            ref = _ref(key)
            self._store.set_problems(ref, [model.Problem(ref=ref, reason=invalid.reason)])
            self._problem_keys.add(key)
            kept = self._store.get(key) is not None
            self._log.warning("object_invalid", object=ref, reason=invalid.reason, kept_last_valid=kept)
            return
        self._store.put(obj)
        self._clear_problem(key)

    def _clear_problem(self, key: store_.Key) -> None:
        if key in self._problem_keys:
            self._problem_keys.discard(key)
            self._store.set_problems(_ref(key), [])

    def _unnamed_problem(self) -> model.Problem:
        return model.Problem(ref=self._unnamed_origin(), reason="an object without metadata.name")

    def _unnamed_origin(self) -> str:
        return f"watch {self.resource.kind}"

    def _add_unnamed(self) -> None:
        self._set_unnamed(self._unnamed | {self._unnamed_problem()})

    def _set_unnamed(self, problems: set[model.Problem]) -> None:
        if problems != self._unnamed:
            self._unnamed = problems
            self._store.set_problems(self._unnamed_origin(), sorted(problems))

    # --- requests -------------------------------------------------------------------------------

    def _request(self, **params: Any) -> urllib3.BaseHTTPResponse:
        """Calls the resource's list method for a raw response, noting it so `abort` can cut it."""
        try:
            response = self.resource.call(_preload_content=False, **params)
        except kubernetes.client.ApiException as error:
            if error.status == _GONE:
                raise _Gone(_api_message(error)) from None
            raise _Failure(f"HTTP {error.status}: {_api_message(error)}", unreachable=False) from None
        except _TRANSPORT_ERRORS as error:
            raise _Failure(_describe(error), unreachable=True) from None
        with self._lock:
            self._response = response
            stopping = self._stop.is_set()
        if stopping:
            _shut(response)  # `close` ran while this request was on its way
        self._connected_now()
        return response

    def _finish(self, response: urllib3.BaseHTTPResponse, *, complete: bool) -> None:
        with self._lock:
            self._response = None
        if not complete:
            response.close()  # a half-read connection must not go back to the pool
        response.release_conn()

    # --- health ---------------------------------------------------------------------------------

    def _connected_now(self) -> None:
        with self._lock:
            was_lost, self._lost_at, self._dropped_at = self._lost_at, None, None
            was_connected, self._connected = self._connected, True
        if was_lost is not None:
            self._log.info("api_reconnected", down_seconds=round((_now() - was_lost).total_seconds(), 3))
        elif not was_connected:
            self._log.debug("api_connected")

    def _failed(self, failure: _Failure) -> None:
        now = _now()
        with self._lock:
            self._connected = False
            self._lost_at = self._lost_at or self._dropped_at or now
            self._last_error = str(failure)
            self._error_at = now
        delay = self._backoff.next()
        event = "api_unreachable" if failure.unreachable else "api_error"
        self._log.warning(event, error=str(failure), retry_in=round(delay, 3), failures=self._backoff.failures,
                          resource_version=self._rv)
        self._stop.wait(delay)

    def _retry_soon(self) -> None:
        """Waits before retrying after a dropped watch or a 410: the server answered, so the first
        retry since the last success goes at once; repeats back off like failures."""
        if self._retried_at_once:
            self._stop.wait(self._backoff.next())
        else:
            self._retried_at_once = True

    def _succeeded(self) -> None:
        self._backoff.reset()
        self._retried_at_once = False


# --- helpers ---------------------------------------------------------------------------------


def _lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The watch stream's lines (one JSON event each), as the chunks arrive.

    The server sends each event in its own chunk; a chunk may still hold several lines or part
    of one, so lines are reassembled across chunks.
    """
    pending = b""
    for chunk in response.stream(amt=None, decode_content=True):
        if b"\n" not in chunk:
            pending += chunk
            continue
        *complete, pending = (pending + chunk).split(b"\n")
        for line in complete:
            if line.strip():
                yield line
    if pending.strip():
        yield pending


def _decode_event(line: bytes, *, resource: str) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError as error:
        raise _Failure(f"a {resource} watch event is not JSON: {error}", unreachable=False) from None
    if not (isinstance(event, dict) and isinstance(event.get("type"), str) and isinstance(event.get("object"), dict)):
        raise _Failure(f"a {resource} watch event has no type or object", unreachable=False)
    return event


class _ListMeta(msgspec.Struct, rename="camel"):
    resource_version: str
    continue_token: str | None = msgspec.field(default=None, name="continue")


class _ListPage(msgspec.Struct):
    """One page of a list: its metadata, and its items as JSON each, converted one by one."""

    metadata: _ListMeta
    items: list[msgspec.Raw] | None = None


# Decodes a page's envelope and leaves each item's JSON undecoded, for `kubeobjects` to read
# the common shapes straight from it.
_PAGE = msgspec.json.Decoder(_ListPage)


def _is_list(body: object) -> bool:
    if not isinstance(body, dict):
        return False
    meta = body.get("metadata")
    items = body.get("items")
    return (isinstance(meta, dict) and isinstance(meta.get("resourceVersion"), str)
            and (items is None or isinstance(items, list)))


def _resource_version(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) and rv else None


def _api_message(error: kubernetes.client.ApiException) -> str:
    """The Status message the server sent with an error, else the HTTP reason."""
    try:
        status = json.loads(error.body) if error.body else None
    except ValueError:
        status = None
    if isinstance(status, dict) and isinstance(status.get("message"), str):
        return status["message"]
    return str(error.reason or "no reason given")


def _describe(error: BaseException) -> str:
    # urllib3 wraps the cause (MaxRetryError(reason=NewConnectionError(...))): name the cause.
    reason = getattr(error, "reason", None)
    if isinstance(reason, BaseException):
        error = reason
    return f"{type(error).__name__}: {error}"


def _shut(response: urllib3.BaseHTTPResponse) -> None:
    """Shuts the response's socket down: a thread blocked reading it wakes with an error at once."""
    connection = getattr(response, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def _ref(key: store_.Key) -> str:
    return str(model.ObjectRef(*key))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _iso(when: datetime.datetime) -> str:
    return when.isoformat(timespec="milliseconds")
