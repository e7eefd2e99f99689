"""Every strategy the battery runs over. Add one entry per strategy (or configuration).

Each entry builds the Balancer keyword arguments for ``m`` tasks. ``at`` lists where the
strategy is exercised: ``"params"`` and/or ``"cut"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mtlbal
from mtlbal import aggregation as A
from mtlbal import transforms as T
from mtlbal import weighting as W


@dataclass(frozen=True)
class Entry:
    name: str
    make: Callable[[int], dict[str, Any]]
    at: tuple[str, ...] = ("params", "cut")
    # epoch boundaries to mark during the battery's runs (every k steps; 0 = never)
    epoch_every: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


REGISTRY: list[Entry] = [
    Entry("Equal", lambda m: {}),
    Entry("UncertaintyWeighting", lambda m: {"weighting": W.UncertaintyWeighting(m)}),
    Entry(
        "UncertaintyWeighting-simple",
        lambda m: {"weighting": W.UncertaintyWeighting(m, form="simple")},
    ),
    Entry("GradNorm", lambda m: {"weighting": W.GradNorm(m, alpha=1.5)}),
    Entry("MGDA", lambda m: {"aggregator": A.MGDA()}),
    Entry("MGDA-l2", lambda m: {"aggregator": A.MGDA(normalization="l2")}),
    Entry("PCGrad", lambda m: {"aggregator": A.PCGrad(seed=3)}),
    Entry(
        "UW+PCGrad",
        lambda m: {"weighting": W.UncertaintyWeighting(m), "aggregator": A.PCGrad(seed=1)},
    ),
    # sparse training: half of each trunk neuron's inputs frozen (selected when the Balancer is
    # built, on the trunk's initial weights). The shared gradient is the masked one, so
    # "equal weights == sum(losses).backward()" holds only on the live entries; frozen entries
    # stay bitwise unchanged after wrap()'s step.
    Entry("SparseMask", lambda m: {"transforms": T.SparseMask(ratio=0.5)}, extras={"masked": True}),
    Entry(
        "SparseMask+MGDA",
        lambda m: {"aggregator": A.MGDA(), "transforms": T.SparseMask(ratio=0.5)},
        extras={"masked": True},
    ),
    # FULLER-style calibration needs a model with modality branches: its task level alone is
    # "PCGrad" at the cut above; both levels are tested in tests/unit/test_fuller.py.
]

__all__ = ["REGISTRY", "Entry", "mtlbal"]
