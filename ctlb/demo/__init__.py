"""The built-in demo: a small local "cluster" served by the real agent, no Kubernetes needed."""

__all__: list[str] = []
