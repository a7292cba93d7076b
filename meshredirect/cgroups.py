"""Where this node's pods live in cgroup v2: kubelet names each pod's cgroup after its UID.

kubelet's two cgroup drivers name a pod's cgroup differently:

- cgroupfs: `kubepods/pod<uid>` (guaranteed) or `kubepods/<qos>/pod<uid>`;
- systemd:  `kubepods.slice/kubepods-pod<uid_>.slice` or
  `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`, the UID's dashes
  written as underscores (a dash nests slices in systemd).

`kubelet --cgroup-root` can put all of it lower (kind uses `kubelet.slice/kubelet-kubepods.slice`),
so the search starts at the cgroup the programs are attached to and walks down only through
folders whose names say they hold pods: a node's thousands of service cgroups are never listed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# Deep enough for `--cgroup-root` nesting plus kubepods, QoS and pod levels.
_MAX_DEPTH = 6
_POD = re.compile(r"(?:^|-)pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?$")


@dataclass(frozen=True, slots=True)
class PodCgroup:
    uid: str
    path: Path
    cgroup_id: int  # the inode number: what bpf_get_current_ancestor_cgroup_id returns
    level: int  # depth below the cgroup2 root (the root is level 0)


def pod_uid(name: str) -> str | None:
    """The pod UID a cgroup folder name carries, in the API's form, or None."""
    found = _POD.search(name)
    return found.group(1).replace("_", "-") if found else None


def find_pod_cgroups(start: Path, *, mount: Path) -> dict[str, PodCgroup]:
    """Every pod cgroup at or below `start`, by pod UID; `mount` is the cgroup2 root."""
    found: dict[str, PodCgroup] = {}
    base_level = len(start.relative_to(mount).parts)
    _walk(start, depth=0, base_level=base_level, found=found)
    return found


def _walk(folder: Path, *, depth: int, base_level: int, found: dict[str, PodCgroup]) -> None:
    if depth >= _MAX_DEPTH:
        return
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return  # removed while we looked: a pod going away
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        uid = pod_uid(entry.name)
        if uid is not None:
            found[uid] = PodCgroup(uid=uid, path=Path(entry.path), cgroup_id=entry.inode(),
                                   level=base_level + depth + 1)
        elif "kubepods" in entry.name or "kubelet" in entry.name:
            _walk(Path(entry.path), depth=depth + 1, base_level=base_level, found=found)
