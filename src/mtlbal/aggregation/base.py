"""Gradient-level strategies: ``J [m, n] → g [n]``; Gramian-based ones map ``G [m, m] → w [m]``."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlbal._stateful import Stateful

__all__ = ["Aggregator", "GramianAggregator", "Reduction"]

Reduction = Literal["sum", "mean"]


class Aggregator(Stateful):
    """Base class: combine per-task gradients into one update direction.

    Scale convention (one flag for every method, ``reduction``): with ``"sum"`` (the default) a
    method is scaled so that, where it reduces to equal weighting, it returns ``Σ_t g_t``, the
    gradient of ``Σ_t L_t``; with ``"mean"`` it returns ``(1/m) Σ_t g_t`` there. Methods whose
    paper yields a convex combination (MGDA) are multiplied by ``m`` under ``"sum"``.

    Attributes:
        requires: ``"gramian"`` if the method needs only ``G = J Jᵀ`` (then the engine may never
            build ``J``), ``"jacobian"`` otherwise.
        host_sync: whether the solver copies to the host (documented per method).
    """

    requires: Literal["gramian", "jacobian"] = "jacobian"
    host_sync: bool = False

    def __init__(self, reduction: Reduction = "sum") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction: Reduction = reduction

    def forward(self, jacobian: Tensor) -> Tensor:
        """Aggregate a Jacobian ``[m, n]`` into a direction ``[n]`` (standalone use)."""
        if jacobian.dim() != 2:
            raise ValueError(f"expected a Jacobian of shape [m, n], got {tuple(jacobian.shape)}")
        return self.aggregate_jacobian(jacobian)

    def aggregate_jacobian(self, jacobian: Tensor) -> Tensor:
        raise NotImplementedError

    def set_losses(self, losses: Tensor) -> None:  # noqa: B027
        """Told the current raw losses ``[m]`` before aggregating (for loss-aware methods)."""

    def _scale(self, m: int) -> float:
        return 1.0 if self.reduction == "sum" else 1.0 / m


class GramianAggregator(Aggregator):
    """An aggregator of the form ``g = Jᵀ w(G)``: only the Gramian is needed."""

    requires: Literal["gramian", "jacobian"] = "gramian"

    def weights(self, gramian: Tensor) -> Tensor:
        """Weights ``[m]`` from the Gramian ``[m, m]``, in the configured ``reduction`` scale."""
        raise NotImplementedError

    def aggregate_jacobian(self, jacobian: Tensor) -> Tensor:
        g64 = jacobian.to(torch.float64)
        w = self.weights(g64 @ g64.T)
        return (w.to(jacobian.dtype) @ jacobian)
