"""The objects the agent serves, and what changed since it last looked: where every source writes.

Sources (manifest files, the API watch) `put` and `delete` model objects and report problems by
origin; the agent `take`s the changes and hands semantics only what moved, so one changed
EndpointSlice costs one Service however many the cluster holds. Writers may run in other threads:
every method takes the lock, and `wait` wakes the agent when something changed.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ctlb import model

# (kind, namespace, name): "Service", "EndpointSlice", "Node", "Namespace" or "Pod"; "" for the
# namespace of cluster-scoped objects.
Key = tuple[str, str, str]


def key_of(obj: model.KubeObject) -> Key:
    ref = obj.ref
    return (ref.kind, ref.namespace, ref.name)


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed since the last `take`: each changed key with the object it held before the
    first of those changes (None if it did not exist), so a consumer can tell what it moved from
    (an EndpointSlice relabelled from one Service to another dirties both)."""

    before: dict[Key, model.KubeObject | None]
    problems_changed: bool

    @property
    def keys(self) -> Iterable[Key]:
        return self.before.keys()


class ObjectStore:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Event()
        self._objects: dict[str, dict[Key, model.KubeObject]] = defaultdict(dict)
        # EndpointSlices by the Service they belong to: semantics asks for one Service's slices.
        self._slices: dict[tuple[str, str], dict[str, model.EndpointSlice]] = defaultdict(dict)
        self._problems: dict[str, tuple[model.Problem, ...]] = {}
        self._before: dict[Key, model.KubeObject | None] = {}
        self._problems_changed = False
        # When the oldest change not yet taken came (time.monotonic()), None when all are taken.
        self._pending_since: float | None = None

    # --- writers ------------------------------------------------------------------------------

    def put(self, obj: model.KubeObject) -> Key:
        """Adds or replaces an object; a value equal to the one held changes nothing.

        Returns:
            The object's key, which a source that lists needs too (made once: 20k objects).
        """
        key = key_of(obj)
        with self._lock:
            old = self._objects[key[0]].get(key)
            if old is not None and old == obj:
                return key
            self._note(key, old)
            self._objects[key[0]][key] = obj
            if old is not None and isinstance(old, model.EndpointSlice):
                self._unindex(old)
            if isinstance(obj, model.EndpointSlice):
                self._slices[(obj.namespace, obj.service_name)][obj.name] = obj
        return key

    def delete(self, key: Key) -> None:
        with self._lock:
            old = self._objects[key[0]].pop(key, None)
            if old is None:
                return
            self._note(key, old)
            if isinstance(old, model.EndpointSlice):
                self._unindex(old)

    def set_problems(self, origin: str, problems: Sequence[model.Problem]) -> None:
        """Replaces what `origin` (a file, an object reference, a watch) reports as not served."""
        with self._lock:
            new = tuple(problems)
            if self._problems.get(origin, ()) == new:
                return
            if new:
                self._problems[origin] = new
            else:
                self._problems.pop(origin, None)
            self._problems_changed = True
            if self._pending_since is None:
                self._pending_since = time.monotonic()
            self._changed.set()

    def notify(self) -> None:
        """Wakes `wait` without a change: a source's news that is no object (a list completed)."""
        self._changed.set()

    # --- readers ------------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[ObjectStore]:
        """Holds writers off while a consumer reads a consistent state."""
        with self._lock:
            yield self

    def take(self) -> Changes | None:
        """The changes since the last take, or None if there were none."""
        with self._lock:
            self._changed.clear()
            if not self._before and not self._problems_changed:
                return None
            changes = Changes(before=self._before, problems_changed=self._problems_changed)
            self._before = {}
            self._problems_changed = False
            self._pending_since = None
            return changes

    def pending_since(self) -> float | None:
        """When the oldest change not taken yet came (`time.monotonic()`), None if there is none.

        Read without the lock, so a health check never waits on a long sync holding it.
        """
        return self._pending_since

    def wait(self, timeout: float) -> bool:
        """Blocks until something changed since the last take, or `timeout` seconds passed."""
        return self._changed.wait(timeout)

    def get(self, key: Key) -> model.KubeObject | None:
        with self._lock:
            return self._objects[key[0]].get(key)

    def keys(self, kind: str) -> list[Key]:
        with self._lock:
            return list(self._objects[kind])

    def objects(self, kind: str) -> list[model.KubeObject]:
        with self._lock:
            return list(self._objects[kind].values())

    def count(self, kind: str) -> int:
        with self._lock:
            return len(self._objects[kind])

    def slices_of(self, namespace: str, service: str) -> list[model.EndpointSlice]:
        """The EndpointSlices labelled as the Service's, in name order."""
        with self._lock:
            by_name = self._slices.get((namespace, service))
            return [by_name[name] for name in sorted(by_name)] if by_name else []

    def has_slices(self, namespace: str, service: str) -> bool:
        """Whether any EndpointSlice is labelled as the Service's."""
        with self._lock:
            return (namespace, service) in self._slices

    def problems(self) -> list[model.Problem]:
        with self._lock:
            return sorted({p for group in self._problems.values() for p in group})

    def snapshot(self) -> model.Snapshot:
        """Everything held, each kind in reference order: for tests and one-off readers."""
        with self._lock:
            def ordered(kind: str) -> tuple:  # type: ignore[type-arg]
                return tuple(obj for _, obj in sorted(self._objects[kind].items()))
            return model.Snapshot(
                services=ordered("Service"), endpoint_slices=ordered("EndpointSlice"),
                nodes=ordered("Node"), namespaces=ordered("Namespace"), pods=ordered("Pod"),
                problems=tuple(self.problems()),
            )

    # --- internals ----------------------------------------------------------------------------

    def _note(self, key: Key, old: model.KubeObject | None) -> None:
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        self._before.setdefault(key, old)
        if not self._changed.is_set():  # setting takes the event's own lock: 20k times at a start-up
            self._changed.set()

    def _unindex(self, old: model.EndpointSlice) -> None:
        group = (old.namespace, old.service_name)
        self._slices[group].pop(old.name, None)
        if not self._slices[group]:
            del self._slices[group]
