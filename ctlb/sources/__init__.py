"""Sources: where the Kubernetes objects ctlb serves come from.

Every source converts API objects with `ctlb.kubeobjects` and writes the results into a
`store.ObjectStore`, the one place the agent reads: `manifests` reads the YAML or JSON that
`kubectl get -o yaml` prints, from files and folders; `kubeapi` lists and watches the API server.
`kubeapi` is not imported here: the kubernetes client takes a while to import and the manifest
source needs none of it.
"""

from __future__ import annotations

from ctlb.sources import manifests, store

__all__ = ["manifests", "store"]
