"""Errors of the test lab: a command or kernel step of building or tearing down the lab failed."""

from __future__ import annotations

from ctlb import errors


class LabError(errors.CtlbError):
    """A lab step failed (a command, a cgroup write, a server that never became ready).

    The message names the step and carries what the failing tool said, so a test failure reads
    without re-running anything.
    """
