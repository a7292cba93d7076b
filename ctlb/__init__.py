"""ctlb: eBPF connect-time load balancing for Kubernetes Services.

Data flows one way: a source (`sources`) yields `model` objects, `semantics` turns them into the
`desired` state, and `datapath` programs it into pinned BPF maps read by the socket programs.
"""

__all__: list[str] = []
