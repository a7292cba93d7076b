"""cgroup v2 for the lab: where the hierarchy is mounted, kubelet's pod cgroup names, teardown."""

from __future__ import annotations

import enum
import errno
import os
import time
from pathlib import Path

from ctlb.lab import _proc, errors

_MOUNTS = Path("/proc/self/mounts")
_EMPTY_TIMEOUT_S = 5.0
_POLL_S = 0.01


class QosClass(enum.StrEnum):
    """A pod's QoS class, as kubelet spells it in cgroup names."""

    GUARANTEED = "guaranteed"
    BURSTABLE = "burstable"
    BESTEFFORT = "besteffort"


class CgroupDriver(enum.StrEnum):
    """kubelet's cgroupDriver setting, which decides the shape of pod cgroup paths."""

    SYSTEMD = "systemd"
    CGROUPFS = "cgroupfs"


def mount_point(mounts: Path = _MOUNTS) -> Path:
    """Return where the cgroup v2 hierarchy is mounted (hybrid hosts use /sys/fs/cgroup/unified).

    Raises:
        errors.LabError: no cgroup2 line in the mount table.
    """
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise errors.LabError(f"no cgroup2 file system in {mounts}")


def pod_cgroup_parts(*, uid: str, qos: QosClass, driver: CgroupDriver) -> tuple[str, ...]:
    """Return the path components kubelet gives a pod's cgroup, from the kubepods level down.

    Guaranteed pods sit directly under kubepods: kubelet makes QoS-level cgroups only for
    burstable and best-effort pods.
    """
    if driver is CgroupDriver.SYSTEMD:
        # systemd slice names use '-' as the nesting separator, so the UID's dashes become '_'.
        unit_uid = uid.replace("-", "_")
        if qos is QosClass.GUARANTEED:
            return ("kubepods.slice", f"kubepods-pod{unit_uid}.slice")
        return ("kubepods.slice", f"kubepods-{qos}.slice", f"kubepods-{qos}-pod{unit_uid}.slice")
    if qos is QosClass.GUARANTEED:
        return ("kubepods", f"pod{uid}")
    return ("kubepods", str(qos), f"pod{uid}")


def container_cgroup_name(*, container_id: str, driver: CgroupDriver) -> str:
    """Return the name containerd gives a container's cgroup under its pod cgroup."""
    if driver is CgroupDriver.SYSTEMD:
        return f"cri-containerd-{container_id}.scope"
    return container_id


def relative(path: Path, *, mount: Path) -> str:
    """Return path as /proc/PID/cgroup shows it: rooted at the cgroup2 mount."""
    return "/" + str(path.relative_to(mount))


def kill_members(path: Path, *, timeout: float = _EMPTY_TIMEOUT_S) -> None:
    """SIGKILL every process in the subtree at path and wait until the subtree is empty.

    Raises:
        errors.LabError: processes are still there after timeout.
    """
    kill_file = path / "cgroup.kill"
    deadline = time.monotonic() + timeout
    # cgroup.kill (Linux 5.14+) kills the whole subtree atomically, including processes that
    # fork while we look; older kernels get a kill-and-look loop.
    if kill_file.exists():
        kill_file.write_text("1")
    while _populated(path):
        if not kill_file.exists():
            _proc.kill_pids(_subtree_pids(path))
        if time.monotonic() > deadline:
            raise errors.LabError(f"{path}: processes left after SIGKILL: {_subtree_pids(path)}")
        time.sleep(_POLL_S)


def remove_tree(path: Path) -> None:
    """Kill the processes of the subtree at path and remove its cgroups bottom-up.

    A missing path is fine: teardown may run twice, or after a half-made setup.

    Raises:
        errors.LabError: a cgroup could not be emptied or removed.
    """
    if not path.is_dir():
        return
    kill_members(path)
    for dirpath, _dirnames, _files in os.walk(path, topdown=False):
        _rmdir(Path(dirpath))


def _rmdir(path: Path) -> None:
    deadline = time.monotonic() + _EMPTY_TIMEOUT_S
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            # A killed task leaves the cgroup a moment after it is reported dead: retry EBUSY.
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise errors.LabError(f"rmdir {path}: {exc.strerror}") from exc
            time.sleep(_POLL_S)


def _populated(path: Path) -> bool:
    try:
        events = (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return False
    return "populated 1" in events


def _subtree_pids(path: Path) -> list[int]:
    pids: list[int] = []
    for dirpath, _dirnames, _files in os.walk(path):
        try:
            text = (Path(dirpath) / "cgroup.procs").read_text()
        except FileNotFoundError:
            continue
        pids.extend(int(line) for line in text.split())
    return pids
