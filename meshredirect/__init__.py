"""Sidecar-mesh helper: the per-namespace switch, redirect control and the xDS server (not yet built)."""

__all__: list[str] = []
