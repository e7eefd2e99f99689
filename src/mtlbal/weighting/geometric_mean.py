"""GLS — the geometric loss strategy (Chennupati et al., "MultiNet++: Multi-Stream Feature
Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019,
arXiv:1904.08492).

The total loss is the geometric mean of the task losses,

    GM(L) = (Π_t L_t)^{1/m} = exp((1/m) Σ_t log L_t),

whose gradient is ``Σ_t GM/(m·L_t) · ∇L_t``: a loss weighting with

    w_t = GM / (m·L_t) = exp(mean_s log L_s − log L_t) / m        (``reduction="mean"``)

The per-task objectives are ``ℓ_t = w_t·L_t`` with ``w`` detached, so ``∇ℓ_t = w_t ∇L_t`` (exact)
and ``Σ_t ℓ_t = GM`` in value too. The weights are computed in log space: no product of the
losses is formed, so tiny or huge losses neither underflow nor overflow it (LibMTL and TorchJD
form ``prod`` or ``exp(mean log)`` directly).

Scale: ``reduction="mean"`` is the paper's ``GM`` (and LibMTL's ``GLS``, TorchJD's
``GeometricMean``); ``reduction="sum"`` (default, the library's convention) is ``m·GM``, so that
equal losses give ``w = 1`` and the gradient of ``Σ_t L_t``.

Domain: ``log L`` needs ``L_t > 0``. A loss that is not, or one whose weight overflows the dtype
(losses spanning more than the dtype's exponent range), is refused naming the task (folded into
the Balancer's one host sync: no host read here). Multiplying one loss ``L_t`` by ``c > 0``
multiplies the whole update by ``c^{1/m}``: its direction does not depend on the losses' scales.

Missing tasks (a step without some tasks' losses): the geometric mean of the present tasks'
losses, i.e. GLS over those ``m'`` tasks.

Shapes: ``L`` ``[m]`` → weights ``[m]``. Stateless.

Example:
    >>> import torch
    >>> GeometricMean(reduction="mean")(torch.tensor([1.0, 4.0]))  # GM = 2: w = 2/(2·L)
    tensor([1.0000, 0.2500])
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["GeometricMean", "geometric_mean_weights"]


def geometric_mean_weights(losses: Tensor) -> Tensor:
    """``∂GM/∂L_t = GM(L) / (m·L_t)`` (``[m]``), computed as ``exp(mean log L − log L_t) / m``.

    ``losses`` must be positive (``log``); nothing is checked here."""
    logs = torch.log(losses.detach())
    return torch.exp(logs.mean() - logs) / losses.shape[0]


class GeometricMean(LossWeighting):
    """The geometric mean of the losses (GLS): ``w_t = GM(L) / (m·L_t)``, times ``m`` under
    ``reduction="sum"``.

    Args:
        num_tasks: optional; checked against the number of losses when given.
        reduction: ``"sum"`` (default: ``m·GM``, equal losses give ``w = 1``) or ``"mean"``
            (the paper's ``GM``; TorchJD's ``GeometricMean``, LibMTL's ``GLS``).
    """

    def __init__(
        self, num_tasks: int | None = None, *, reduction: Literal["sum", "mean"] = "sum"
    ) -> None:
        super().__init__()
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.num_tasks = num_tasks
        self.reduction: Literal["sum", "mean"] = reduction

    def hparams(self) -> dict[str, object]:
        return {"num_tasks": self.num_tasks, "reduction": self.reduction}

    def _weights(self, losses: Tensor, present: tuple[int, ...] | None = None) -> Tensor:
        m = losses.shape[0]
        if self.num_tasks is not None and m != self.num_tasks and present is None:
            raise ValueError(f"GeometricMean was built for {self.num_tasks} tasks, got {m} losses")
        w = geometric_mean_weights(losses)
        return w * m if self.reduction == "sum" else w

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        w = self._weights(losses, ctx.present)
        raw = losses.detach()
        ok = (raw > 0) & torch.isfinite(w)
        what = (
            "GeometricMean (GLS) takes log L and needs every loss > 0 (and a weight "
            "GM/(m·L) the dtype can hold)"
        )
        return WeightedLosses(w * losses, w, domain=(ok, what))

    def current_weights(self, losses: Tensor) -> Tensor:
        return self._weights(losses.detach())
