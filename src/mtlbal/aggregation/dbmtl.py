"""DB-MTL, gradient part — dual balancing (Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang & Kwok,
"Dual-Balancing for Multi-Task Learning", Neural Networks, arXiv:2308.12029).

DB-MTL balances twice: the *loss scale*, by training on ``log L_t`` (the log transform
weighting, see :mod:`mtlbal.weighting`), and the *gradient magnitude*, by rescaling every task's
(moving-average) gradient to the largest norm. This class is the second half; the full method is
``Balancer(weighting=<the log transform weighting>, aggregator=DBMTL())``. On its own it
balances the gradients of whatever objectives it is given.

At step ``k = 1, 2, …``, with ``ĝ`` (``[m, n]``, state, 0 at the start) the EMA of the task
gradients (the paper's maximum-norm normalisation with EMA gradient estimates, as its authors
implemented it in LibMTL's ``DB_MTL``):

    ĝ_t ← β_k ĝ_t + (1 − β_k) g_t,          β_k = β / k^σ
    α_t = max_s ‖ĝ_s‖ / (‖ĝ_t‖ + ε)
    d   = Σ_t α_t ĝ_t

Defaults (LibMTL): ``β = 0.9``, ``σ = 0`` (constant ``β``), ``ε = 1e-8``. There is no bias
correction: the first update is ``(1 − β) = 10 %`` of the gradients' scale, and identical tasks
give ``m(1 − β_1)·g`` at the first step, not the sum.

State (in ``state_dict``): the EMA buffer ``ĝ`` (memory as large as the Jacobian) and the step
counter. ``n`` must not change between steps. Use it at the shared parameters
(``at="params"``): at a cut point the entries of ``ĝ`` would be (sample, feature) positions
that hold different samples at every step (LibMTL refuses DB-MTL with ``rep_grad``), and under
DDP a cut point's Jacobian is not gathered.

Scale: the paper's sum over tasks (``reduction="sum"``, default); ``"mean"`` divides by ``m``.
Homogeneity: degree 1 with ``eps = 0`` (a zero buffer row is guarded: it contributes 0); with
the default ``ε = 1e-8`` no degree holds (``ε`` matters once ``‖ĝ_t‖`` is small).

Host sync: none.

Example:
    >>> import torch
    >>> J = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    >>> DBMTL(beta=0.0, eps=0.0)(J)  # β = 0: no memory; both rows scaled to norm 3
    tensor([3., 3.])
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbal.aggregation.base import Aggregator, Reduction
from mtlbal.step import StepContext

__all__ = ["DBMTL", "dbmtl_step"]


def dbmtl_step(
    jacobian: Tensor,
    buffer: Tensor,
    k: Tensor,
    *,
    beta: float = 0.9,
    beta_sigma: float = 0.0,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor, Tensor]:
    """One DB-MTL gradient step: ``(d [n] (sum scale), ĝ [m, n], α [m])``.

    ``k`` is the step index ``k ≥ 1`` as a tensor (no host read).
    """
    g = jacobian.detach()
    beta_k = (beta / k.to(device=g.device, dtype=torch.float64) ** beta_sigma).to(g.dtype)
    buf = g + beta_k * (buffer.to(g) - g)
    norms = buf.norm(dim=1)
    den = norms + eps
    alpha = torch.where(den > 0, norms.max() / torch.where(den > 0, den, 1.0), 0.0)
    return alpha @ buf, buf, alpha


class DBMTL(Aggregator):
    """Dual-balancing, gradient part: EMA task gradients rescaled to the largest norm.

    Args:
        beta: EMA coefficient ``β`` (0.9).
        beta_sigma: decay exponent, ``β_k = β/k^σ`` (0: constant).
        eps: added to each norm in the denominator (1e-8, LibMTL's).
        reduction: ``"sum"`` (default, the paper's) or ``"mean"``.
    """

    buffer: Tensor | None
    steps: Tensor

    supports_missing_tasks = False
    missing_tasks_note = (
        "its gradient EMA and the max-norm scale are taken over every task each step (not "
        "implemented for a step without some tasks)"
    )

    def __init__(
        self,
        *,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
        eps: float = 1e-8,
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if beta_sigma < 0 or eps < 0:
            raise ValueError(f"beta_sigma and eps must be ≥ 0, got {beta_sigma}, {eps}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.eps = float(eps)
        self.homogeneity = 1 if self.eps == 0 else None
        self.add_state("buffer", None)
        self.add_state("steps", torch.zeros((), dtype=torch.int64))

    def hparams(self) -> dict[str, object]:
        return {
            "beta": self.beta,
            "beta_sigma": self.beta_sigma,
            "eps": self.eps,
            "reduction": self.reduction,
        }

    def aggregate_jacobian(self, jacobian: Tensor, ctx: StepContext | None = None) -> Tensor:
        m, n = jacobian.shape
        buf = self.buffer
        if buf is None:
            buf = torch.zeros_like(jacobian)
        elif tuple(buf.shape) != (m, n):
            raise ValueError(
                f"DBMTL holds gradient averages for {buf.shape[0]} tasks × {buf.shape[1]} "
                f"entries, got a Jacobian of {m} × {n} (the shared part, or the cut point's "
                "batch size, must not change between steps)"
            )
        k = self.steps.to(jacobian.device) + 1
        d, self.buffer, _ = dbmtl_step(
            jacobian, buf, k, beta=self.beta, beta_sigma=self.beta_sigma, eps=self.eps
        )
        self.steps = self.steps + 1
        return (d * self._scale(m)).to(jacobian.dtype)
