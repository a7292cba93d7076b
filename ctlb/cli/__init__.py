"""The `ctlb` command: one module per verb."""

__all__: list[str] = []
