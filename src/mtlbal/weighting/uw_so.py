"""UW-SO — soft optimal uncertainty weighting (Kirchdorfer, Elich, Kutsche, Stuckenschmidt,
Schott & Köhler, "Analytical Uncertainty-Based Loss Weighting in Multi-Task Learning",
GCPR 2024, arXiv:2408.07985).

Uncertainty weighting learns ``σ_t`` in ``L_t/σ_t + log σ_t``; its minimiser is ``σ_t = L_t``
(for an L1 loss), i.e. the weight ``1/L_t`` at every step ("UW-O", which has the gradient of
``Σ_t log L_t``: :class:`mtlbal.weighting.ScaleInvariant`). UW-SO tempers these analytical weights
with a softmax of temperature ``T``:

    w_t = softmax_t( 1 / ((L_t + ε)·T) ),        ℓ_t = w_t · L_t,

with the losses detached in ``w`` (the authors' code). ``T → ∞`` gives equal weights; ``T → 0``
puts all the weight on the smallest loss. ``T`` is the method's one hyper-parameter; the paper
tunes it per dataset (it is the analogue of the tuned weights of a scalarization).

Scale: the paper's weights sum to 1 (``reduction="mean"``); ``reduction="sum"`` (default, the
library's convention) multiplies them by ``m``, so that equal losses give ``w = 1`` and the
gradient of ``Σ_t L_t``.

``ε = 1e-8`` (``eps``) as the authors' code (``1 / (losses + 1e-8)``). Domain: ``L_t + ε > 0``;
otherwise the step is refused naming the task (folded into the Balancer's one host sync).

Numerics: the logits ``1/((L_t + ε)T)`` are large for small losses (``1e8/T`` at ``L → 0``), and
the direct formula (the authors') loses ``|logit|·2⁻⁵²`` to rounding in each, hence up to
``~1e-7`` relative in the weights of float64 losses near ``1e-8``; here the shifted logits are
formed as ``(L_min − L_t)/((L_t + ε)(L_min + ε)T)``, accurate to a few ulps, and no inverse
overflows even with ``eps=0`` (see :func:`uw_so_weights`).

Missing tasks: the softmax over the present tasks (UW-SO over those ``m'`` tasks).

Shapes: ``L`` ``[m]`` → weights ``[m]``. Stateless; no host sync.

Example:
    >>> import torch
    >>> UWSO(temperature=1.0, reduction="mean")(torch.tensor([1.0, 0.5]))  # softmax([1, 2])
    tensor([0.2689, 0.7311])
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["UWSO", "uw_so_weights"]


def uw_so_weights(losses: Tensor, temperature: float = 1.0, eps: float = 1e-8) -> Tensor:
    """``softmax(1 / ((L + ε)·T))`` (``[m]``, summing to 1) of the detached ``losses``.

    The logits are shifted by the largest one before the softmax (which does not change it),
    and the shifted logits are formed without the inverses themselves:

        1/((L_t + ε)T) − 1/((L_min + ε)T) = (L_min − L_t) / ((L_t + ε)(L_min + ε)T),

    so that ``ε`` cancels exactly and nothing overflows: the weights are accurate to a few ulps
    even for tiny losses, where the direct formula loses ``|1/(L·T)|·2⁻⁵²`` in every logit."""
    raw = losses.detach()
    lo = raw.min()
    shifted = (lo - raw) / ((raw + eps) * (lo + eps) * temperature)
    shifted = torch.where(raw == lo, torch.zeros_like(shifted), shifted)
    return torch.softmax(shifted, dim=0)


class UWSO(LossWeighting):
    """Soft optimal uncertainty weighting: ``w = softmax(1 / (L·T))`` (times ``m`` under
    ``reduction="sum"``).

    Args:
        num_tasks: optional; checked against the number of losses when given.
        temperature: ``T > 0`` (default 1, the authors' code's default; tune it).
        eps: ``ε ≥ 0`` added to the losses before inverting them (default ``1e-8``).
        reduction: ``"sum"`` (default: ``m·softmax``) or ``"mean"`` (the paper's ``softmax``).
    """

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        temperature: float = 1.0,
        eps: float = 1e-8,
        reduction: Literal["sum", "mean"] = "sum",
    ) -> None:
        super().__init__()
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        if not (temperature > 0 and temperature != float("inf")):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        if not eps >= 0:
            raise ValueError(f"eps must be ≥ 0, got {eps}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.num_tasks = num_tasks
        self.temperature = float(temperature)
        self.eps = float(eps)
        self.reduction: Literal["sum", "mean"] = reduction

    def hparams(self) -> dict[str, object]:
        return {
            "num_tasks": self.num_tasks,
            "temperature": self.temperature,
            "eps": self.eps,
            "reduction": self.reduction,
        }

    def _weights(self, losses: Tensor, present: tuple[int, ...] | None = None) -> Tensor:
        m = losses.shape[0]
        if self.num_tasks is not None and m != self.num_tasks and present is None:
            raise ValueError(f"UWSO was built for {self.num_tasks} tasks, got {m} losses")
        w = uw_so_weights(losses, self.temperature, self.eps)
        return w * m if self.reduction == "sum" else w

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        w = self._weights(losses, ctx.present)
        ok = losses.detach() + self.eps > 0
        what = (
            f"UWSO weights by softmax(1/((L + eps)·T)) (eps={self.eps}, T={self.temperature}) "
            "and needs L + eps > 0; pass eps=... or use a positive loss"
        )
        return WeightedLosses(w * losses, w, domain=(ok, what))

    def current_weights(self, losses: Tensor) -> Tensor:
        return self._weights(losses.detach())
