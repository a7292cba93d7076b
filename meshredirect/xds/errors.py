"""Errors of the xDS server: what an operator can fix (an address), not bugs."""

from __future__ import annotations

from ctlb import errors


class XdsError(errors.CtlbError):
    """The xDS server cannot serve as asked: a malformed listen address, or one it cannot bind."""
