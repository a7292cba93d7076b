"""Process plumbing for the lab: running setup commands, owning every process the lab starts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

from ctlb.lab import errors

_WAIT_AFTER_KILL_S = 5.0


def check_output(argv: Sequence[str], *, stdin_text: str | None = None) -> str:
    """Run a setup command and return its stdout.

    Raises:
        errors.LabError: the command is missing or exits non-zero; carries its stderr.
    """
    try:
        done = subprocess.run(
            list(argv), input=stdin_text, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise errors.LabError(f"{argv[0]}: not installed") from exc
    if done.returncode != 0:
        raise errors.LabError(
            f"{' '.join(argv)}: exit {done.returncode}: "
            f"{done.stderr.strip() or done.stdout.strip()}"
        )
    return done.stdout


def kill_pids(pids: Sequence[int]) -> None:
    """SIGKILL each pid, ignoring those already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Processes:
    """The processes one lab started: each in its own session so its whole group can be killed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: list[subprocess.Popen[Any]] = []

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv in a new session and remember it for `kill_all`."""
        # A new session makes pid == pgid, so killpg reaches the children a server forks too.
        kwargs["start_new_session"] = True
        proc = subprocess.Popen(list(argv), **kwargs)
        with self._lock:
            self._live = [p for p in self._live if p.poll() is None]
            self._live.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[Any]) -> None:
        """SIGKILL proc's process group and reap proc."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=_WAIT_AFTER_KILL_S)
        except subprocess.TimeoutExpired as exc:
            raise errors.LabError(f"pid {proc.pid} survived SIGKILL") from exc
        finally:
            _close_pipes(proc)

    def kill_all(self) -> None:
        """Kill every process still running and close the pipes of all of them."""
        with self._lock:
            procs, self._live = self._live, []
        failures: list[errors.LabError] = []
        for proc in procs:
            try:
                self.kill(proc)
            except errors.LabError as exc:
                # Keep killing the others: one stuck process must not leave the rest running.
                failures.append(exc)
        if failures:
            raise failures[0]


def _close_pipes(proc: subprocess.Popen[Any]) -> None:
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
