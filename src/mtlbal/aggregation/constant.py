"""Constant — fixed, user-given weights: ``d = Σ_t w_t g_t = Jᵀ w``.

A linear scalarisation applied at the shared part (the heads keep their raw gradients, as with
every aggregator; a loss-level ``Σ_t w_t L_t`` would scale the heads too). TorchJD's
``Constant(weights)`` is the same with ``reduction="sum"`` (the default here: the weights are
used as given); ``reduction="mean"`` divides them by ``m``.

The weights are bound to task *positions* (the Balancer's canonical task order: the order of
the first step's losses), so the method is not permutation equivariant unless the weights are
equal. The number of weights must equal the number of tasks (a ``ValueError`` says so). A step
with some tasks missing uses the present tasks' weights (``reduction="mean"`` divides by their
number).

Properties: positively homogeneous of degree 1, no state, no host sync.

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> Constant([2.0, 0.5])(J)
    tensor([1.5000, 0.5000])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction
from mtlbal.step import StepContext

__all__ = ["Constant", "constant_weights"]


def constant_weights(gramian: Tensor, weights: Tensor) -> Tensor:
    """``weights`` (``[m]``) as float64 on the Gramian's device, after checking their number."""
    m = gramian.shape[0]
    if weights.shape != (m,):
        raise ValueError(f"Constant: {weights.shape[0]} weights for {m} tasks")
    return weights.to(device=gramian.device, dtype=torch.float64)


class Constant(GramianAggregator):
    """Fixed weights ``w`` (one per task, in the canonical task order).

    Args:
        weights: the weights, a sequence of ``m`` finite floats (or a 1-D tensor).
        reduction: ``"sum"`` (default: the weights as given) or ``"mean"`` (divided by ``m``).
    """

    homogeneity = 1
    # a missing-task step uses the present tasks' weights (``reduction="mean"``: over ``m'``)
    supports_missing_tasks = True
    _w: Tensor

    def __init__(self, weights: Sequence[float] | Tensor, *, reduction: Reduction = "sum") -> None:
        super().__init__(reduction)
        if isinstance(weights, Tensor):
            if weights.dim() != 1:
                raise ValueError(f"Constant: weights must be 1-D, got shape {tuple(weights.shape)}")
            values = [float(v) for v in weights.detach().cpu().tolist()]
        elif isinstance(weights, Sequence) and not isinstance(weights, str):
            values = [float(v) for v in weights]
        else:
            raise TypeError(
                f"Constant: weights must be a sequence of floats, got {type(weights).__name__}"
            )
        if not values:
            raise ValueError("Constant: weights is empty")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"Constant: weights must be finite, got {values}")
        self.weights_list = values
        # a non-persistent buffer: follows .to(device), is configuration (not state)
        self.register_buffer("_w", torch.tensor(values, dtype=torch.float64), persistent=False)

    def hparams(self) -> dict[str, object]:
        return {"weights": list(self.weights_list), "reduction": self.reduction}

    def _weights(self, gramian: Tensor) -> Tensor:
        return self.solve(gramian, StepContext())

    def solve(self, gramian: Tensor, ctx: StepContext) -> Tensor:
        m = gramian.shape[0]
        w = self._w
        if ctx.present is not None:  # a missing-task step: the present tasks' weights
            full = ctx.num_all_tasks(m)
            if w.shape[0] != full:
                raise ValueError(f"Constant: {w.shape[0]} weights for {full} tasks")
            w = w[torch.tensor(ctx.present, device=w.device)]
        return constant_weights(gramian, w) * self._scale(m)

    @property
    def is_stateful(self) -> bool:
        return True  # the weights are bound to the task order: a new task set is refused
