"""Ready-made Balancer configurations."""

__all__: list[str] = []
