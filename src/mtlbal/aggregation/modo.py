"""MoDo — multi-objective gradient with double sampling (Chen, Fernando, Ying & Chen,
"Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
Conflict-Avoidance", NeurIPS 2023 / JMLR 2024, arXiv:2305.20057).

A stochastic MGDA: instead of solving the min-norm problem ``min_{λ∈Δ} ½‖Jᵀλ‖²`` at every step,
MoDo takes one projected gradient step on it per training step, with the product of the
Jacobians of two *independent* samples ``z₁``, ``z₂`` (an unbiased estimate of ``G λ``):

    λ ← Π_Δ( λ − γ (J_{z₁} J_{z₂}ᵀ λ + ρ λ) )          (Π_Δ: projection onto the simplex)
    x ← x − α J_{z₃}ᵀ λ                                 (the parameter update, a third sample)

``λ`` (``[m]``, on the simplex, uniform at the start) is the state. ``γ`` is the weights' step
size, ``ρ ≥ 0`` an ℓ2 regulariser (the paper's ``ρ``). The update returned is ``Jᵀ w`` with
``w = m·λ`` (``reduction="sum"``: equal weights give ``Σ_t g_t``, as MGDA here) or ``λ``
(``"mean"``, the paper's convex combination).

**Feeding samples** (``samples``): the Balancer hands over the Gramian of its rows. With
``samples=1`` (default) they are the ``m`` tasks of one batch and ``J_{z₁} J_{z₂}ᵀ`` is replaced
by the one-batch Gramian ``J Jᵀ``: simple and cheap, but biased (``E[J Jᵀ] = G + Cov``), which
the paper's analysis does not cover; it is the common "MoDo without double sampling". With
``samples=2`` or ``3`` give the Balancer every task's loss on 2 or 3 independent mini-batches,
sample-major (:func:`~mtlbal.aggregation.stack_samples` names them ``task@s``; the names are
checked). The cross block ``J₀ J₁ᵀ`` of the Balancer's Gramian drives ``λ`` exactly as in the
paper; the parameter update uses the *updated* ``λ`` on sample 2 (``samples=3``: the paper's
Algorithm 1 and LibMTL's three-batch loop) or on the mean of samples 0 and 1 (``samples=2``:
TorchJD's two-batch example; the official code sums the two, a factor 2 on the step size).
Use per-task gradients at the parameters (the default ``at="params"``): at a cut point the
representation rows of different mini-batches of one forward are disjoint and their cross
block is zero. The heads receive the gradient of ``Σ_s Σ_t L_t^s`` (the sum over samples).

Defaults: ``γ = 0.1, ρ = 0.1`` (the official code's and TorchJD's; LibMTL's ``γ`` is 1e-3).
Not scale-invariant: ``γ`` is an absolute step on ``λ``, so scaling every gradient by ``c``
acts like ``γ c²`` (``homogeneity = None``). No randomness of its own (the samples are the
user's mini-batches); no host sync (the projection is sort-based, branch-free).

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> modo = MoDo(gamma=0.1, rho=0.0)
    >>> modo.weights(J @ J.T)  # λ = Π(½ − 0.1·(½, 2)) = (0.575, 0.425), times m = 2
    tensor([1.1500, 0.8500], dtype=torch.float64)
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbal.aggregation._samples import (
    check_layout,
    check_samples,
    cross_block,
    project_simplex,
    spread_weights,
)
from mtlbal.aggregation.base import GramianAggregator, Reduction
from mtlbal.step import StepContext

__all__ = ["MoDo", "modo_step"]


def modo_step(cross: Tensor, lam: Tensor, gamma: float = 0.1, rho: float = 0.1) -> Tensor:
    """One MoDo step of the task weights: ``Π_Δ(λ − γ (A λ + ρ λ))`` (``[m]``, on the simplex).

    Args:
        cross: ``A = J₁ J₂ᵀ`` ``[m, m]`` from two independent samples (any square matrix: it is
            not symmetric in general), or the one-batch Gramian ``J Jᵀ``.
        lam: ``λ`` ``[m]`` before the step.
        gamma: step size ``γ > 0``.
        rho: ℓ2 regulariser ``ρ ≥ 0``.
    """
    a = cross.detach().to(torch.float64)
    lam = lam.detach().to(device=a.device, dtype=torch.float64)
    return project_simplex(lam - gamma * (a @ lam + rho * lam))


class MoDo(GramianAggregator):
    """MoDo: one projected-gradient step per training step on MGDA's weights ``λ``.

    Args:
        gamma: step size ``γ`` of ``λ`` (> 0).
        rho: ℓ2 regulariser ``ρ`` of the ``λ`` step (≥ 0).
        samples: how many independent samples the Balancer's rows hold (1, 2 or 3; see the
            module docstring: 1 is the biased one-batch variant, 3 the paper's algorithm).
        reduction: ``"sum"`` (``w = m·λ``, default) or ``"mean"`` (``w = λ``).
    """

    lam: Tensor | None
    homogeneity = None

    supports_missing_tasks = False
    missing_tasks_note = (
        "its weights λ live on the simplex of every task (and the tasks are laid out per "
        "sample): a step without a task has no defined λ update"
    )

    def __init__(
        self,
        *,
        gamma: float = 0.1,
        rho: float = 0.1,
        samples: int = 1,
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if not gamma > 0:
            raise ValueError(f"MoDo: gamma must be positive, got {gamma}")
        if not rho >= 0:
            raise ValueError(f"MoDo: rho must be non-negative, got {rho}")
        self.gamma = float(gamma)
        self.rho = float(rho)
        self.samples = check_samples(samples, "MoDo")
        self.add_state("lam", None)

    def hparams(self) -> dict[str, object]:
        return {
            "gamma": self.gamma,
            "rho": self.rho,
            "samples": self.samples,
            "reduction": self.reduction,
        }

    def solve(self, gramian: Tensor, ctx: StepContext) -> Tensor:
        m = check_layout(gramian.shape[0], self.samples, ctx, "MoDo")
        if self.lam is None:
            self.lam = torch.full((m,), 1.0 / m, dtype=torch.float64, device=gramian.device)
        elif self.lam.shape != (m,):
            raise ValueError(f"MoDo holds weights for {self.lam.shape[0]} tasks, got {m}")
        a = cross_block(gramian, self.samples, m)
        self.lam = modo_step(a, self.lam, self.gamma, self.rho)
        return spread_weights(self.lam * (m * self._scale(m)), self.samples)

    def _weights(self, gramian: Tensor) -> Tensor:
        return self.solve(gramian, StepContext())
