"""Where cgroup v2 lives on this machine, and cgroup identities."""

from __future__ import annotations

import os
import pathlib

from ctlb import errors


def cgroup2_mount(mounts: pathlib.Path = pathlib.Path("/proc/self/mounts")) -> pathlib.Path:
    """The cgroup2 mount point: `/sys/fs/cgroup` on modern nodes, `/sys/fs/cgroup/unified` on
    hybrid ones; read from the mount table, never assumed."""
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return pathlib.Path(fields[1])
    raise errors.DatapathError("no cgroup2 file system is mounted (cgroup v2 is required)")


def cgroup_id(path: pathlib.Path) -> int:
    """On cgroup v2 a cgroup's id is its directory's inode number, the id BPF helpers return."""
    return os.stat(path).st_ino
