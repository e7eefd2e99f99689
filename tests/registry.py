"""The battery's view of the strategy registry.

The registry itself is :mod:`benchmarks.registry` (one declaration per strategy, shared with the
benchmark; its docstring explains the fields and why it lives there). This module keeps the
battery's import (``from registry import REGISTRY, Entry``) and leaves out the benchmark-only
configurations. To add a strategy, add an ``Entry`` to ``benchmarks/registry.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.registry import CLOSURE_ENTRIES, Bench, Entry, mtlbal
from benchmarks.registry import REGISTRY as _ALL

REGISTRY: list[Entry] = [e for e in _ALL if e.battery]


def feed_validation(entry: Entry, balancer: Any, losses: Callable[[], Any], k: int) -> None:
    """After step ``k``: feed validation losses (``losses()``, without gradient) to an entry
    that reads them (``extras["validate_every"]``: every that many steps)."""
    every = entry.extras.get("validate_every", 0)
    if every and (k + 1) % every == 0:
        import torch

        with torch.no_grad():
            balancer.observe_validation(losses())


__all__ = ["CLOSURE_ENTRIES", "REGISTRY", "Bench", "Entry", "feed_validation", "mtlbal"]
