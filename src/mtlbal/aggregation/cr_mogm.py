"""CR-MOGM — exponentially averaged composite weights (Zhou, Zhang, Jiang, Zhong, Gu & Zhu,
"On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond",
NeurIPS 2022; no arXiv version found).

The paper shows that stochastic gradient manipulation (MGDA, PCGrad, CAGrad, …: ``d = Jᵀ λ̂_k``
with ``λ̂_k`` computed from the current mini-batch only) can fail to converge, and fixes it by
averaging the composite weights over steps:

    λ_k = α λ_{k−1} + (1 − α) λ̂_k,        d_k = J_kᵀ λ_k

``CRMOGM`` wraps any aggregator that has weights (a :class:`GramianAggregator`: UPGrad, MGDA,
PCGrad, Random, …) and returns ``λ_k`` instead of ``λ̂_k``. ``α`` is TorchJD's ``alpha`` (the
weight of the *previous* average, as Adam's ``β₁``): ``alpha=0`` is the wrapped aggregator
unchanged, ``alpha=1`` freezes the weights at ``λ_0``. ``λ_0`` is ``initial_weights`` when given,
else ``λ̂_1`` (so the first step returns the wrapped aggregator's weights whatever ``α``).

State: ``ema_weights`` (``[m]``, float64, ``λ_{k−1}``; ``None`` before the first step), saved in
``state_dict`` with the wrapped aggregator's own state (under ``aggregator.``), so a resumed run
continues the average exactly. ``reset()`` clears both. Weights are averaged in the wrapped
aggregator's scale (its ``reduction``): ``CRMOGM`` has no ``reduction`` of its own.

Missing tasks (a step without some tasks' gradients, when the wrapped aggregator supports it):
the wrapped aggregator's weights of the present tasks update their entries of the average; the
absent tasks' entries are left as they are (a task not seen yet holds NaN until its first step,
which starts its average).

Schedule: the paper's Corollary 1 takes ``α_k`` growing to 1 as the learning rate decays
(TorchJD's docs suggest ``α = 1 − lr/lr_0``). ``alpha`` is a plain attribute: set it between
steps (``agg.alpha = ...``). It is configuration, not state, and is not compared when a
``state_dict`` is loaded (a scheduled value may differ from the constructor's); set it again
after resuming.

Properties: those of the wrapped aggregator's weights, averaged: identical gradients give the
wrapped aggregator's result (its weights are the same every step); permutation equivariant if
it is; positively homogeneous of its degree (when ``initial_weights`` is given, only for
degree 1, whose weights are scale-free). ``host_sync`` and ``needs`` are the wrapped one's.

Example:
    >>> import torch
    >>> from mtlbal.aggregation import Constant
    >>> agg = CRMOGM(Constant([1.0, 0.0]), alpha=0.5, initial_weights=[0.0, 1.0])
    >>> G = torch.eye(2)
    >>> agg.weights(G), agg.weights(G)
    (tensor([0.5000, 0.5000], dtype=torch.float64), tensor([0.7500, 0.2500], dtype=torch.float64))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator
from mtlbal.step import StepContext

__all__ = ["CRMOGM", "crmogm_update"]


def crmogm_update(previous: Tensor, current: Tensor, alpha: float) -> Tensor:
    """``α · previous + (1 − α) · current``: the averaged weights (``[m]``)."""
    return alpha * previous + (1.0 - alpha) * current


class CRMOGM(GramianAggregator):
    """An exponential moving average of another aggregator's weights.

    Args:
        aggregator: the wrapped aggregator (a :class:`GramianAggregator`: weights from ``G``).
        alpha: weight of the previous average, in ``[0, 1]`` (0.9, TorchJD's default).
        initial_weights: ``λ_0`` (``m`` floats, in the wrapped aggregator's scale); ``None``:
            the first step's weights.
    """

    config_not_compared = ("seed", "alpha")
    ema_weights: Tensor | None

    def __init__(
        self,
        aggregator: GramianAggregator,
        *,
        alpha: float = 0.9,
        initial_weights: Sequence[float] | Tensor | None = None,
    ) -> None:
        if not isinstance(aggregator, GramianAggregator):
            raise TypeError(
                "CRMOGM averages weights: it wraps a GramianAggregator (UPGrad, MGDA, PCGrad, "
                f"…), got {type(aggregator).__name__}, which gives no per-task weights"
            )
        super().__init__(aggregator.reduction)
        self.aggregator = aggregator
        self.alpha = alpha
        if initial_weights is None:
            self.initial_weights: list[float] | None = None
        else:
            if isinstance(initial_weights, Tensor):
                initial_weights = initial_weights.detach().cpu().reshape(-1).tolist()
            values = [float(v) for v in initial_weights]
            if not values or not all(math.isfinite(v) for v in values):
                raise ValueError(f"CRMOGM: initial_weights must be finite floats, got {values}")
            self.initial_weights = values
        self.needs = aggregator.needs
        self.host_sync = aggregator.host_sync
        self.supports_missing_tasks = aggregator.handles_missing_tasks
        self.missing_tasks_note = f"the wrapped {type(aggregator).__name__} does not support them"
        d = aggregator.homogeneity
        self.homogeneity = d if (self.initial_weights is None or d == 1) else None
        self.add_state("ema_weights", None)

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"CRMOGM: alpha must be in [0, 1], got {value}")
        self._alpha = value

    def hparams(self) -> dict[str, Any]:
        return {
            "aggregator": self.aggregator,
            "alpha": self.alpha,
            "initial_weights": self.initial_weights,
        }

    def __repr__(self) -> str:
        # one line, like every strategy (the wrapped one is shown as an argument, not as a
        # child module), so that eval(repr) rebuilds it
        return f"{type(self).__name__}({self.extra_repr()})"

    def solve(self, gramian: Tensor, ctx: StepContext) -> Tensor:
        current = self.aggregator.solve(gramian, ctx).to(torch.float64)
        m = current.shape[0]
        full = ctx.num_all_tasks(m)
        held = self.ema_weights
        if held is None:
            if self.initial_weights is None:  # NaN: not seen yet, λ_0 = the first λ̂
                held = torch.full((full,), float("nan"), dtype=torch.float64)
            elif len(self.initial_weights) != full:
                raise ValueError(
                    f"CRMOGM: {len(self.initial_weights)} initial_weights for {full} tasks"
                )
            else:
                held = torch.tensor(self.initial_weights, dtype=torch.float64)
        elif held.shape != (full,):
            raise ValueError(
                f"CRMOGM holds averaged weights for {held.shape[0]} tasks, got {full}; "
                "call reset() before changing the task set"
            )
        held = held.to(current.device)
        idx = None if ctx.present is None else torch.tensor(ctx.present, device=held.device)
        previous = held if idx is None else held[idx]
        previous = torch.where(previous.isnan(), current, previous)
        new = crmogm_update(previous, current, self.alpha)
        # replaced, never updated in place (the step's snapshot holds the previous tensor); on a
        # missing-task step only the present tasks' entries move
        self.ema_weights = new if idx is None else held.index_put((idx,), new)
        return new

    def reset(self) -> None:
        super().reset()
        self.aggregator.reset()
