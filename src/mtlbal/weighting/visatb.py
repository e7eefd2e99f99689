"""VisATB — adaptive task balancing from inter-task contribution and intra-task difficulty
(Dai, Wang, You, Jing, Chu, Lu, "Adaptive Task Balancing for Visual Instruction Tuning via
Inter-Task Contribution and Intra-Task Difficulty", WWW 2026, arXiv:2403.04343; earlier titled
CoTBal; official code: YanqiDai/VisATB, ``weighting_visatb.py``).

The weights come from **validation performance measured before the final training**: models
trained on sub-datasets are evaluated on every task's validation set, which gives, for each of
the ``K`` tasks, how much learning it contributes to the others (``c_out``), how much the others
contribute to it (``c_in``) and its difficulty ``d``. The paper prioritises tasks that
contribute much, receive little and are difficult; the official script combines three
temperature softmaxes (``τ = 0.5``), each scaled to sum to ``K``:

    w_out = K softmax(c_out / τ),   w_in = K softmax(−c_in / τ),   w_d = K softmax((1 − d) / τ)
    w     = ( (w_out + w_in) / 2 + w_d ) / 2                           (Σ_t w_t = K)

and the final run trains on ``Σ_t w_t L_t`` with these fixed weights. This class is that last
step: a fixed loss weighting built from the three measured vectors (``reduction="mean"``
divides by ``K``). :func:`contributions` turns a ``K × K`` contribution matrix into
``(c_out, c_in)`` by averaging off the diagonal.

What is and is not pinned here: the combination above is the official code's, reproduced
exactly (tests re-run its published vectors). How ``c_out``, ``c_in`` and ``d`` are measured
(which models, which validation metric, how a contribution is normalised) is described in the
paper, whose method section we could not read: pass them as you measure them. Note the code's
sign convention for ``d``: the weight grows with ``1 − d``, i.e. a *smaller* ``d`` gets more
weight (the released values of ``d`` lie in ``(0, 1)``). The row/column means of
:func:`contributions` are our choice. VisATB does not read validation losses during training
(it does not declare ``Need.VALIDATION``): its validation runs come first.

Missing tasks: a step may lack tasks; the present ones keep their fixed weights.

Example:
    >>> import torch
    >>> w = visatb_weights(torch.tensor([0.76, 0.35, 1.67]), torch.tensor([1.29, 0.98, 0.52]),
    ...                    torch.tensor([0.86, 0.35, 0.96]))
    >>> round(float(w.sum()), 4)  # the weights sum to K
    3.0
    >>> VisATB(torch.tensor([0.76, 0.35, 1.67]), torch.tensor([1.29, 0.98, 0.52]),
    ...        torch.tensor([0.86, 0.35, 0.96])).weights.shape
    torch.Size([3])
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["VisATB", "contributions", "visatb_weights"]


def visatb_weights(
    out_contributions: Tensor,
    in_contributions: Tensor,
    difficulty: Tensor,
    temperature: float = 0.5,
) -> Tensor:
    """``((w_out + w_in)/2 + w_d)/2`` from the three ``[K]`` vectors (sums to ``K``)."""
    k = out_contributions.shape[0]
    w_out = k * torch.softmax(out_contributions / temperature, dim=0)
    w_in = k * torch.softmax(-in_contributions / temperature, dim=0)
    w_d = k * torch.softmax((1 - difficulty) / temperature, dim=0)
    return ((w_out + w_in) / 2 + w_d) / 2


def contributions(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``(c_out, c_in)`` of a ``[K, K]`` matrix whose entry ``(i, j)`` is the contribution of
    learning task ``i`` to task ``j``: the mean of row ``i`` and of column ``j`` without the
    diagonal (``K ≥ 2``)."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ValueError(f"need a square [K, K] matrix with K ≥ 2, got {tuple(matrix.shape)}")
    k = matrix.shape[0]
    off = matrix * (1 - torch.eye(k, dtype=matrix.dtype, device=matrix.device))
    return off.sum(dim=1) / (k - 1), off.sum(dim=0) / (k - 1)


class VisATB(LossWeighting):
    """Fixed weights from measured inter-task contributions and intra-task difficulty.

    Args:
        out_contributions: ``c_out`` (``[K]``): what learning each task contributes to others.
        in_contributions: ``c_in`` (``[K]``): what each task receives from the others.
        difficulty: ``d`` (``[K]``), as the official code uses it (weight ``∝ e^{(1−d)/τ}``).
        temperature: ``τ`` (0.5).
        reduction: ``"sum"`` (weights sum to ``K``, default) or ``"mean"`` (sum to 1).
    """

    supports_missing_tasks = True
    linear_in_losses = True

    num_tasks: int
    weights: Tensor

    def __init__(
        self,
        out_contributions: Tensor | list[float],
        in_contributions: Tensor | list[float],
        difficulty: Tensor | list[float],
        *,
        temperature: float = 0.5,
        reduction: Literal["sum", "mean"] = "sum",
    ) -> None:
        super().__init__()
        vecs = [
            torch.as_tensor(v, dtype=torch.float64).reshape(-1)
            for v in (out_contributions, in_contributions, difficulty)
        ]
        if len({v.shape[0] for v in vecs}) != 1 or vecs[0].shape[0] < 1:
            raise ValueError(
                "out_contributions, in_contributions and difficulty need one value per task, "
                f"got lengths {[v.shape[0] for v in vecs]}"
            )
        if not all(bool(torch.isfinite(v).all()) for v in vecs):
            raise ValueError("VisATB: non-finite contribution or difficulty")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.num_tasks = vecs[0].shape[0]
        self.temperature = float(temperature)
        self.reduction: Literal["sum", "mean"] = reduction
        self._vectors = [[float(x) for x in v.tolist()] for v in vecs]
        w = visatb_weights(vecs[0], vecs[1], vecs[2], self.temperature)
        if reduction == "mean":
            w = w / self.num_tasks
        self.register_buffer("weights", w, persistent=False)  # float64, cast where used

    def hparams(self) -> dict[str, object]:
        return {
            "out_contributions": self._vectors[0],
            "in_contributions": self._vectors[1],
            "difficulty": self._vectors[2],
            "temperature": self.temperature,
            "reduction": self.reduction,
        }

    def current_weights(self, losses: Tensor) -> Tensor:
        w = self.weights.to(device=losses.device, dtype=losses.dtype)
        if losses.shape[0] != self.num_tasks:
            raise ValueError(f"VisATB has {self.num_tasks} tasks, got {losses.shape[0]} losses")
        return w

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        w = self.weights.to(device=losses.device, dtype=losses.dtype)
        if ctx.present is not None:
            w = w[list(ctx.present)]
        elif losses.shape[0] != self.num_tasks:
            raise ValueError(f"VisATB has {self.num_tasks} tasks, got {losses.shape[0]} losses")
        return WeightedLosses(w * losses, w)
