"""A local fake Kubernetes node for kernel tests and the demo: node and pods as netns + cgroups.

`Lab` builds the node (netns with bridge, cgroup root) and pods (netns, veth, kubelet-named
cgroups) and removes them again; `sweep` removes what crashed runs left. Backend servers to run
in pods live in `ctlb.lab.servers` (not imported here, so `python -m ctlb.lab.servers` stays clean).
"""

from __future__ import annotations

from ctlb.lab.cgroups import CgroupDriver, QosClass
from ctlb.lab.errors import LabError
from ctlb.lab.netlab import (
    FAMILY,
    NODE_IPV4,
    NODE_IPV6,
    POD_NET4,
    POD_NET6,
    Lab,
    Node,
    Place,
    Pod,
    leftovers,
    new_prefix,
    sweep,
)

__all__ = [
    "FAMILY",
    "NODE_IPV4",
    "NODE_IPV6",
    "POD_NET4",
    "POD_NET6",
    "CgroupDriver",
    "Lab",
    "LabError",
    "Node",
    "Place",
    "Pod",
    "QosClass",
    "leftovers",
    "new_prefix",
    "sweep",
]
