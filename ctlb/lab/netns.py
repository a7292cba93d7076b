"""Named network namespaces for the lab, driven by iproute2 (`ip netns`, `ip -n NS -batch`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ctlb.lab import _proc

# iproute2's NETNS_RUN_DIR: `ip netns add NAME` bind-mounts the namespace at RUN_DIR/NAME.
RUN_DIR = Path("/run/netns")


def path(name: str) -> Path:
    """Return the file that pins the named namespace (what setns/nsenter open)."""
    return RUN_DIR / name


def names() -> list[str]:
    """Return the names of all named network namespaces."""
    try:
        return sorted(entry.name for entry in RUN_DIR.iterdir())
    except FileNotFoundError:
        return []


def add(name: str) -> None:
    """Create a named network namespace.

    Raises:
        errors.LabError: `ip netns add` failed (for instance, the name exists).
    """
    _proc.check_output(["ip", "netns", "add", name])


def ip_batch(name: str, commands: Sequence[str]) -> None:
    """Run `ip` commands inside the namespace, in one process.

    Raises:
        errors.LabError: a command failed; later ones were not run.
    """
    _proc.check_output(["ip", "-n", name, "-batch", "-"], stdin_text="\n".join(commands) + "\n")


def sysctl(name: str, settings: dict[str, str]) -> None:
    """Set per-namespace sysctls (net.*) inside the namespace only, never on the host.

    Raises:
        errors.LabError: sysctl failed.
    """
    pairs = [f"{key}={value}" for key, value in settings.items()]
    _proc.check_output(["ip", "netns", "exec", name, "sysctl", "-q", "-w", *pairs])


def pids(name: str) -> list[int]:
    """Return the pids of processes whose network namespace is the named one."""
    if not path(name).exists():
        return []
    out = _proc.check_output(["ip", "netns", "pids", name])
    return [int(token) for token in out.split()]


def delete(name: str) -> None:
    """Kill the processes left in the namespace, then delete it (its veth ends go with it).

    A namespace whose processes lived on would keep its interfaces, routes and addresses alive
    after `ip netns del`, so they are killed first. A missing namespace is fine.

    Raises:
        errors.LabError: `ip netns del` failed.
    """
    if not path(name).exists():
        return
    _proc.kill_pids(pids(name))
    _proc.check_output(["ip", "netns", "del", name])
