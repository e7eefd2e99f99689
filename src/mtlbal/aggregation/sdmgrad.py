"""SDMGrad — stochastic direction-oriented multi-objective gradient descent (Xiao, Ban & Ji,
"Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms",
NeurIPS 2023, arXiv:2305.18409).

The update direction stays within a region around a target direction ``g₀ = Jᵀ w̃`` (``w̃``: a
preference, uniform by default, so ``g₀`` is the mean gradient). Its weights solve

    min_{w ∈ Δ} ½ ‖Jᵀ(w + λ w̃)‖²

by ``S`` steps of projected SGD with momentum started from the previous step's ``w`` (the
state), with the cross product of two independent samples ``ξ``, ``ξ'`` as the stochastic
gradient ``J_ξ J_ξ'ᵀ (w + λ w̃)``:

    A = J_ξ J_ξ'ᵀ / (mean_t √max(A_tt, 0))²            (scale normalisation, §6.1)
    v ← μ v + A (w + λ w̃)   (v = A (w + λ w̃) at the first of the S steps);   w ← Π_Δ(w − β v)
    d = J_ζᵀ (w + λ w̃) / (1 + λ)                        (a third sample ζ)

``λ ≥ 0`` pulls the direction towards ``g₀`` (``λ = 0``: a stochastic MGDA; ``λ → ∞``: ``g₀``).
The returned weights are ``m (w + λ w̃)/(1 + λ)`` (``reduction="sum"``: equal weights give
``Σ_t g_t``; the official code multiplies by ``m`` "to match the sum loss" too) or
``(w + λ w̃)/(1 + λ)`` (``"mean"``). The momentum buffer starts afresh at every step (the
official code builds a new SGD optimiser per step); ``w`` (``[m]``, uniform at the start) is
the state.

**Feeding samples** (``samples``), as for :class:`MoDo`: ``samples=1`` (default) uses the
one-batch Gramian for ``A`` and the same batch for ``d`` (biased; what most re-implementations
run, and in effect the official NYUv2 code, whose three gradient buffers are one list entry
repeated); ``samples=3`` with every task's loss on three independent mini-batches,
sample-major (:func:`~mtlbal.aggregation.stack_samples`): ``A`` from samples 0 and 1 and ``d``
on sample 2 — the paper's Algorithm 1 (``ξ, ξ', ζ``) and LibMTL's order of use;
``samples=2``: ``A`` from the two samples and ``d`` on their mean (``ζ`` is then not independent
of ``ξ, ξ'``). Use the per-task gradients at the parameters (``at="params"``).

Defaults: ``λ = 0.3`` (the paper's experiments, LibMTL, TorchJD; the official class default is
0.6), ``S = 20``, ``β = 10``, momentum 0.5 (official and TorchJD; LibMTL uses ``β = 5``). The
normalisation divides by ``scale² + eps`` with ``eps = 1e-8`` (LibMTL, TorchJD; the official
code divides by ``(mean_t √(A_tt + 1e-4))²``); ``eps = 0`` makes the method exactly
positively homogeneous (an all-zero ``A`` then gives ``A = 0``, no division). No randomness
of its own; no host sync (sort-based projection, a fixed number of steps). ``β = 10`` is a large
step on the normalised ``A`` (eigenvalues up to about ``m``): ``w`` hops between faces of the
simplex and is a non-smooth function of ``A`` (round-off in ``A`` can move it by ~1e-9).

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> SDMGrad().weights(J @ J.T)  # orthogonal unit gradients: w stays uniform
    tensor([1., 1.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlbal.aggregation._samples import (
    check_layout,
    check_pref,
    check_samples,
    cross_block,
    project_simplex,
    spread_weights,
)
from mtlbal.aggregation.base import GramianAggregator, Reduction
from mtlbal.step import StepContext

__all__ = ["SDMGrad", "sdmgrad_step"]


def sdmgrad_step(
    cross: Tensor,
    w: Tensor,
    *,
    lambda_: float = 0.3,
    pref: Tensor | None = None,
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """SDMGrad's inner solve: the new ``w`` (``[m]``, on the simplex) and the direction's
    weights ``(w + λ w̃)/(1 + λ)`` (``[m]``, the mean scale).

    Args:
        cross: ``A = J_ξ J_ξ'ᵀ`` ``[m, m]`` (not symmetric in general) or the one-batch Gramian.
        w: the weights before this step (``[m]``).
        lambda_: ``λ ≥ 0``, the pull towards ``g₀ = Jᵀ w̃``.
        pref: ``w̃`` ``[m]`` (default uniform ``1/m``).
        lr, momentum, n_iter: the inner projected SGD (``β``, ``μ``, ``S``).
        eps: added to ``scale²`` in the normalisation of ``A``.
    """
    a = cross.detach().to(torch.float64)
    m = a.shape[0]
    wt = (
        torch.full((m,), 1.0 / m, dtype=a.dtype, device=a.device)
        if pref is None
        else pref.detach().to(device=a.device, dtype=a.dtype)
    )
    scale = a.diagonal().clamp_min(0).sqrt().mean()
    den = scale * scale + eps
    a = torch.where(den > 0, a / torch.where(den > 0, den, 1.0), torch.zeros_like(a))
    w = w.detach().to(device=a.device, dtype=a.dtype)
    v = torch.zeros_like(w)
    for k in range(n_iter):
        grad = a @ (w + lambda_ * wt)
        v = grad if k == 0 else momentum * v + grad
        w = project_simplex(w - lr * v)
    return w, (w + lambda_ * wt) / (1.0 + lambda_)


class SDMGrad(GramianAggregator):
    """SDMGrad: a few projected SGD steps per training step towards a direction-oriented MGDA.

    Args:
        lambda_: ``λ ≥ 0``, the pull towards the preferred direction ``g₀ = Jᵀ w̃``.
        pref: ``w̃`` (``m`` numbers; default uniform ``1/m``).
        lr: step size ``β`` of the inner SGD (> 0).
        momentum: momentum ``μ`` of the inner SGD, in ``[0, 1)``.
        n_iter: inner steps ``S`` per training step (≥ 1).
        eps: added to ``scale²`` in the normalisation of ``A`` (≥ 0).
        samples: how many independent samples the Balancer's rows hold (1, 2 or 3).
        reduction: ``"sum"`` (default) or ``"mean"``.
    """

    w: Tensor | None

    supports_missing_tasks = False
    missing_tasks_note = (
        "its weights live on the simplex of every task (and the tasks are laid out per "
        "sample): a step without a task has no defined update"
    )

    def __init__(
        self,
        *,
        lambda_: float = 0.3,
        pref: Sequence[float] | Tensor | None = None,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        eps: float = 1e-8,
        samples: int = 1,
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if not lambda_ >= 0:
            raise ValueError(f"SDMGrad: lambda_ must be non-negative, got {lambda_}")
        if not lr > 0:
            raise ValueError(f"SDMGrad: lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"SDMGrad: momentum must be in [0, 1), got {momentum}")
        if isinstance(n_iter, bool) or int(n_iter) != n_iter or n_iter < 1:
            raise ValueError(f"SDMGrad: n_iter must be a positive integer, got {n_iter!r}")
        if not eps >= 0:
            raise ValueError(f"SDMGrad: eps must be non-negative, got {eps}")
        self.lambda_ = float(lambda_)
        self.pref = check_pref(pref, "SDMGrad")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.n_iter = int(n_iter)
        self.eps = float(eps)
        self.samples = check_samples(samples, "SDMGrad")
        # the normalised A and the weights are scale-free unless eps > 0
        self.homogeneity = 1 if self.eps == 0 else None
        self.add_state("w", None)

    def hparams(self) -> dict[str, object]:
        return {
            "lambda_": self.lambda_,
            "pref": None if self.pref is None else self.pref.tolist(),
            "lr": self.lr,
            "momentum": self.momentum,
            "n_iter": self.n_iter,
            "eps": self.eps,
            "samples": self.samples,
            "reduction": self.reduction,
        }

    def solve(self, gramian: Tensor, ctx: StepContext) -> Tensor:
        m = check_layout(gramian.shape[0], self.samples, ctx, "SDMGrad")
        if self.pref is not None and self.pref.shape[0] != m:
            raise ValueError(f"SDMGrad: pref has {self.pref.shape[0]} entries for {m} tasks")
        if self.w is None:
            self.w = torch.full((m,), 1.0 / m, dtype=torch.float64, device=gramian.device)
        elif self.w.shape != (m,):
            raise ValueError(f"SDMGrad holds weights for {self.w.shape[0]} tasks, got {m}")
        self.w, d = sdmgrad_step(
            cross_block(gramian, self.samples, m),
            self.w,
            lambda_=self.lambda_,
            pref=self.pref,
            lr=self.lr,
            momentum=self.momentum,
            n_iter=self.n_iter,
            eps=self.eps,
        )
        return spread_weights(d * (m * self._scale(m)), self.samples)

    def _weights(self, gramian: Tensor) -> Tensor:
        return self.solve(gramian, StepContext())
