"""Errors of the ctlb package: where the line between a user's mistake and a bug runs."""

from __future__ import annotations


class CtlbError(Exception):
    """Base of every error ctlb raises on purpose."""


class InvalidObject(CtlbError):
    """A Kubernetes object (or part of one) that cannot be served.

    It is logged with its reference and reason and skipped; everything else keeps being served
    and nothing already programmed for it is lost.
    """

    def __init__(self, ref: str, reason: str) -> None:
        super().__init__(f"{ref}: {reason}")
        self.ref = ref
        self.reason = reason

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InvalidObject) and (self.ref, self.reason) == (other.ref, other.reason)

    def __hash__(self) -> int:
        return hash((self.ref, self.reason))


class TransientError(CtlbError):
    """Something that may work when tried again later (retry with backoff)."""


class DatapathError(CtlbError):
    """The kernel refused an operation the datapath needs (load, attach, pin)."""


class MapFull(CtlbError):
    """A BPF map has no room for an entry; reported for the objects that did not fit."""

    def __init__(self, map_name: str, max_entries: int) -> None:
        super().__init__(f"map {map_name} is full ({max_entries} entries)")
        self.map_name = map_name
        self.max_entries = max_entries


class NotPrivileged(CtlbError):
    """The command needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)."""
