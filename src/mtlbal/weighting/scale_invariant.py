"""SI — the scale-invariant log-loss baseline (Navon et al., "Multi-Task Learning as a Bargaining
Game", ICML 2022, arXiv:2202.01017, its "SI" baseline), and the loss part of DB-MTL (Lin et al.,
"Dual-Balancing for Multi-Task Learning", arXiv:2308.12029).

Each task's loss is replaced by its logarithm,

    ℓ_t = c_t · log(L_t + ε),        ∂ℓ_t/∂L_t = c_t / (L_t + ε),

with constant task weights ``c`` (default 1). Without an aggregator the update is
``∇ Σ_t c_t log(L_t + ε) = Σ_t c_t ∇L_t / (L_t + ε)``: multiplying a loss by a constant no longer
changes its share of the update (hence "scale-invariant"). It is also the uncertainty weighting at
its analytical optimum ("UW-O" of Kirchdorfer et al. 2024: ``Σ_t L_t / L_t`` with the
denominator detached has exactly this gradient).

**DB-MTL** = this weighting + :class:`mtlbal.aggregation.DBMTL` (its gradient-magnitude
balancing, applied to the per-task gradients of ``log(L_t + ε)``): DB-MTL's "loss-scale
balancing" is exactly ``ScaleInvariant(eps=1e-8)``, the default here, as in the authors' code
(LibMTL ``DB_MTL``: ``log(losses + 1e-8)``).

``ε`` convention (``eps``): ``1e-8`` by default (LibMTL's DB-MTL, FAMO's recipes); nash-mtl's SI
baseline takes ``log L`` exactly (``eps=0``). With ``ε > 0`` a loss of exactly 0 is allowed (its
weight is ``1/ε``, large: a pitfall of every log-loss recipe).

Domain: ``log`` needs ``L_t + ε > 0``; a loss that is not, or whose weight ``c_t/(L_t + ε)``
overflows the dtype, is refused naming the task (folded into the Balancer's one host sync).

Missing tasks: the present tasks' terms (their ``c_t``); the others contribute nothing.

Shapes: ``L`` ``[m]`` → objectives and weights ``[m]``. Stateless; no host sync.

Example:
    >>> import torch
    >>> ScaleInvariant(eps=0.0)(torch.tensor([0.5, 4.0]))  # 1 / L
    tensor([2.0000, 0.2500])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["ScaleInvariant", "scale_invariant_objectives"]


def scale_invariant_objectives(
    losses: Tensor, eps: float = 1e-8, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(c·log(L + ε), c / (L + ε))``: the objectives (``[m]``, differentiable in ``losses``)
    and their derivatives ``∂ℓ_t/∂L_t`` (detached). ``weights`` is ``c`` (``None``: ones)."""
    shifted = losses + eps if eps else losses
    obj = torch.log(shifted)
    w = 1.0 / shifted.detach()
    if weights is not None:
        c = weights.to(device=losses.device, dtype=losses.dtype)
        obj, w = c * obj, c * w
    return obj, w


class ScaleInvariant(LossWeighting):
    """``ℓ_t = c_t·log(L_t + ε)``: the scale-invariant (log-loss) baseline and DB-MTL's loss part.

    Args:
        num_tasks: optional; checked against the number of losses when given.
        eps: ``ε`` added inside the log (default ``1e-8``, as DB-MTL; ``0`` for nash-mtl's
            ``log L``).
        weights: constant task weights ``c`` (default: ones), as nash-mtl's
            ``ScaleInvariantLinearScalarization(task_weights=...)``.
    """

    c: Tensor | None

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        eps: float = 1e-8,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        if not eps >= 0:
            raise ValueError(f"eps must be ≥ 0, got {eps}")
        if weights is not None:
            weights = [float(x) for x in weights]
            if num_tasks is not None and len(weights) != num_tasks:
                raise ValueError(f"weights has {len(weights)} entries for {num_tasks} tasks")
            if not all(x >= 0 and x != float("inf") for x in weights):
                raise ValueError(f"weights must be finite and ≥ 0, got {weights}")
        self.num_tasks = num_tasks
        self.eps = float(eps)
        self.weights = None if weights is None else list(weights)
        c = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        self.register_buffer("c", c, persistent=False)

    def hparams(self) -> dict[str, object]:
        return {"num_tasks": self.num_tasks, "eps": self.eps, "weights": self.weights}

    def _check_m(self, m: int) -> None:
        if self.num_tasks is not None and m != self.num_tasks:
            raise ValueError(f"ScaleInvariant was built for {self.num_tasks} tasks, got {m} losses")
        if self.c is not None and m != self.c.shape[0]:
            raise ValueError(f"ScaleInvariant has {self.c.shape[0]} weights, got {m} losses")

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        c = self.c
        if ctx.present is None:
            self._check_m(losses.shape[0])
        elif c is not None:  # a missing-task step: the present tasks' weights
            c = c[torch.tensor(ctx.present, device=c.device)]
        obj, w = scale_invariant_objectives(losses, self.eps, c)
        ok = (losses.detach() + self.eps > 0) & torch.isfinite(w)
        what = (
            f"ScaleInvariant takes log(L + eps) (eps={self.eps}) and needs L + eps > 0 (with a "
            "weight 1/(L + eps) the dtype can hold); pass eps=... or use a positive loss"
        )
        return WeightedLosses(obj, w, domain=(ok, what))

    def current_weights(self, losses: Tensor) -> Tensor:
        self._check_m(losses.shape[0])
        return scale_invariant_objectives(losses.detach(), self.eps, self.c)[1]
