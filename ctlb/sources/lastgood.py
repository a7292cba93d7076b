"""Keeps serving the last valid version of an object whose new version is invalid.

A user's bad edit must not withdraw what is programmed: while an object (or the file it came
from) is broken, the source hands on the version that last converted cleanly, and the problem is
still reported. Shared by every source, since the rule is the same whatever the objects come from.
"""

from __future__ import annotations

from dataclasses import replace

import structlog

from ctlb import model

log = structlog.get_logger()

_KINDS = ("services", "endpoint_slices", "nodes", "namespaces", "pods")


def _ref(obj: model.KubeObject) -> str:
    return str(obj.ref)


class LastGood:
    def __init__(self) -> None:
        self._last = model.Snapshot()

    def merge(self, snapshot: model.Snapshot) -> model.Snapshot:
        """`snapshot` plus the last good version of every object it lost to a problem.

        An object is carried over when a problem names it, or when a whole file failed to
        decode (its objects cannot be told apart from deleted ones until the file is fixed).
        """
        if not snapshot.problems:
            # Nothing to carry over: the common case costs nothing, however many objects.
            self._last = snapshot
            return snapshot
        previous = {_ref(o): o for kind in _KINDS for o in getattr(self._last, kind)}
        present = {_ref(o) for kind in _KINDS for o in getattr(snapshot, kind)}
        broken = {p.ref for p in snapshot.problems}
        file_broken = any(p.ref.startswith("file ") for p in snapshot.problems)
        kept = [o for ref, o in previous.items()
                if ref not in present and (ref in broken or file_broken)]
        for obj in kept:
            log.warning("object_kept_last_valid_version", object=_ref(obj))
        merged = replace(snapshot, **{
            kind: (*getattr(snapshot, kind), *(o for o in kept if _kind_of(o) == kind)) for kind in _KINDS
        })
        self._last = merged
        return merged


def _kind_of(obj: model.KubeObject) -> str:
    return {model.Service: "services", model.EndpointSlice: "endpoint_slices", model.Node: "nodes",
            model.Namespace: "namespaces", model.Pod: "pods"}[type(obj)]
