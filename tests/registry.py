"""The battery's view of the strategy registry.

The registry itself is :mod:`benchmarks.registry` (one declaration per strategy, shared with the
benchmark; its docstring explains the fields and why it lives there). This module keeps the
battery's import (``from registry import REGISTRY, Entry``) and leaves out the benchmark-only
configurations. To add a strategy, add an ``Entry`` to ``benchmarks/registry.py``.
"""

from __future__ import annotations

from benchmarks.registry import CLOSURE_ENTRIES, Bench, Entry, mtlbal
from benchmarks.registry import REGISTRY as _ALL

REGISTRY: list[Entry] = [e for e in _ALL if e.battery]

__all__ = ["CLOSURE_ENTRIES", "REGISTRY", "Bench", "Entry", "mtlbal"]
