"""Sources: where the Kubernetes objects ctlb serves come from.

Each source turns API objects into a `ctlb.model.Snapshot` through `ctlb.kubeobjects`, so every
source reads the same object shapes: `manifests` reads the YAML or JSON that `kubectl get -o yaml`
prints, from files and folders.
"""

from __future__ import annotations

from ctlb.sources import manifests

__all__ = ["manifests"]
