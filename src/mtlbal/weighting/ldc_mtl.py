"""LDC-MTL — loss discrepancy control (Xiao, Dong, Zou & Ji, "LDC-MTL: Balancing Multi-Task
Learning through Scalable Loss Discrepancy Control", 2025, arXiv:2502.08585).

A bilevel problem: a *router* gives task weights ``σ(W)`` (``[m]``, a softmax); the network
``x`` minimises the weighted sum of pre-normalised losses ``ℓ̃``, the router the discrepancy
between consecutive weighted losses:

    g(W, x) = Σ_t σ_t ℓ̃_t(x),                    (lower level)
    f(W, x) = Σ_{t=1}^{m−1} |σ_t ℓ̃_t − σ_{t+1} ℓ̃_{t+1}|.   (upper level)

The paper's first-order algorithm solves the penalised single-level problem and drops the
(empirically ~100× smaller) ``∇_W g*(W)`` term, so both ``x`` and ``W`` descend

    T = g + λ f                                     (λ = ``lambda_``, 0.05)

at every step — exactly what the official trainers back-propagate. The network's gradient is
``Σ_t w_t ∇L_t`` with

    ∂T/∂ℓ̃_t = σ_t (1 + λ (s_t − s_{t−1})),   s_t = sign(σ_t ℓ̃_t − σ_{t+1} ℓ̃_{t+1}), s_0 = s_m = 0,

``w_t = ∂T/∂ℓ̃_t · ∂ℓ̃_t/∂L_t`` (``sign(0) = 0``: autograd's subgradient of ``|·|``). The router's
gradient ``∂T/∂W`` (losses held fixed) reaches only the strategy's parameters, through the
step's auxiliary term (value 0). Pre-normalisation (``normalization``), from the losses of the
first step ``L⁰``:

* ``"initial_ratio"`` (default; the NYUv2 trainer): ``ℓ̃_t = L_t / τ_t``, ``τ = L⁰ / min(L⁰)``;
* ``"log_initial"`` (the QM9 trainer): ``ℓ̃_t = log(L_t / L⁰_t)``;
* ``"none"`` (the CelebA and Cityscapes trainers): ``ℓ̃_t = L_t``.

A loss-level strategy sees the loss vector, not the network's features, so the router here is a
learnable logit vector ``θ`` (``σ = softmax(θ)``, ``θ₀ = 0``): the official router with its input
weights at zero. The official NYUv2/Cityscapes routers read pooled decoder features
(``softmax(Linear(·))``, then clamped to ``[0.2, 0.8]``); the CelebA/QM9 ones are
``sigmoid(θ)`` / ``sigmoid(relu(θ))`` (not summing to 1). Those are model choices outside a
loss weighting; the equations above are the paper's. ``θ`` is a parameter of the Balancer: give
it to your optimizer (the official trainers use the network's Adam and learning rate) or let
:func:`mtlbal.wrap` step it.

Note ``f`` pairs tasks in their given order (task ``t`` with ``t + 1``), so the method is not
permutation invariant: the task order is part of the configuration, as in the paper.

Scale: with ``reduction="sum"`` (default) the network's objectives are ``m ×`` the paper's
``T`` (equal normalised losses at ``θ = 0`` give ``w = 1``, the sum); ``"mean"`` gives ``T``
itself. The router's gradient is the paper's in both cases.

State (``state_dict``): ``θ`` (a parameter) and ``L⁰`` (``initial_losses``, set at the first
step). Domain: ``"initial_ratio"`` needs ``L⁰ > 0``, ``"log_initial"`` needs ``L⁰ > 0`` and
``L > 0``; a step outside is refused naming the task (the Balancer's one host sync).

Example:
    >>> import torch
    >>> ldc = LDCMTL(2, normalization="none")
    >>> ldc(torch.tensor([1.0, 3.0]))  # σ = ½: 2 · ½ · (1 ∓ λ), the larger loss pushed down
    tensor([0.9500, 1.0500])
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["LDCMTL", "ldc_mtl_grad", "ldc_mtl_loss"]

Normalization = Literal["initial_ratio", "log_initial", "none"]


def ldc_mtl_loss(normalized: Tensor, router_weights: Tensor, lambda_: float = 0.05) -> Tensor:
    """``T = Σ_t σ_t ℓ̃_t + λ Σ_t |σ_t ℓ̃_t − σ_{t+1} ℓ̃_{t+1}|`` (a scalar), differentiable in
    both the normalised losses ``ℓ̃`` and the router weights ``σ`` (``[m]`` each)."""
    u = router_weights * normalized
    return u.sum() + lambda_ * (u[:-1] - u[1:]).abs().sum()


def ldc_mtl_grad(normalized: Tensor, router_weights: Tensor, lambda_: float = 0.05) -> Tensor:
    """``∂T/∂ℓ̃`` (``[m]``): ``σ_t (1 + λ (s_t − s_{t−1}))`` with the signs ``s`` of the
    consecutive differences (closed form, no autograd)."""
    u = router_weights * normalized
    s = torch.sign(u[:-1] - u[1:])
    zero = s.new_zeros(1)
    return router_weights * (1 + lambda_ * (torch.cat([s, zero]) - torch.cat([zero, s])))


class LDCMTL(LossWeighting):
    """Loss discrepancy control with a learnable softmax router (first-order bilevel).

    Args:
        num_tasks: ``m``.
        lambda_: ``λ ≥ 0``, the weight of the discrepancy penalty (0.05: the NYUv2 and QM9
            trainers; 0.1 Cityscapes, 0.01 CelebA).
        normalization: ``"initial_ratio"``, ``"log_initial"`` or ``"none"`` (see above).
        reduction: ``"sum"`` (``m ×`` the paper's objective for the network) or ``"mean"``.
    """

    initial_losses: Tensor | None
    num_tasks: int

    supports_missing_tasks = False
    missing_tasks_note = (
        "its router is a softmax over every task and its discrepancy penalty pairs task t with "
        "task t+1: without a task the objective is not defined"
    )

    def __init__(
        self,
        num_tasks: int,
        *,
        lambda_: float = 0.05,
        normalization: Normalization = "initial_ratio",
        reduction: Literal["sum", "mean"] = "sum",
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        if not lambda_ >= 0:
            raise ValueError(f"lambda_ must be ≥ 0, got {lambda_}")
        if normalization not in ("initial_ratio", "log_initial", "none"):
            raise ValueError(
                "normalization must be 'initial_ratio', 'log_initial' or 'none', got "
                f"{normalization!r}"
            )
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.num_tasks = num_tasks
        self.lambda_ = float(lambda_)
        self.normalization: Normalization = normalization
        self.reduction: Literal["sum", "mean"] = reduction
        self.router_logits = nn.Parameter(torch.zeros(num_tasks))
        self.add_state("initial_losses", None)

    def hparams(self) -> dict[str, object]:
        return {
            "num_tasks": self.num_tasks,
            "lambda_": self.lambda_,
            "normalization": self.normalization,
            "reduction": self.reduction,
        }

    def reset(self) -> None:
        super().reset()
        with torch.no_grad():
            self.router_logits.zero_()

    def router_weights(self) -> Tensor:
        """``σ = softmax(θ)`` (``[m]``, detached)."""
        return torch.softmax(self.router_logits.detach(), dim=0)

    def _normalize(self, losses: Tensor, initial: Tensor) -> tuple[Tensor, Tensor]:
        """``(ℓ̃, ∂ℓ̃/∂L)`` for losses ``[m]`` (differentiable in ``losses``)."""
        if self.normalization == "initial_ratio":
            # ℓ̃ = L / τ with τ = L⁰ / min L⁰, computed as (L / L⁰)·min L⁰: at the first step
            # (L = L⁰) every ℓ̃_t is then exactly min L⁰, so the penalty's |σ_t ℓ̃_t − σ_{t+1}
            # ℓ̃_{t+1}| sits exactly at its kink (subgradient 0) instead of on a side picked by
            # the rounding of L / τ
            low = initial.min()
            return (losses / initial) * low, low / initial
        if self.normalization == "log_initial":
            return torch.log(losses / initial), 1.0 / losses.detach()
        return losses, torch.ones_like(losses).detach()

    def _prepare(self, losses: Tensor) -> Tensor:
        if losses.dim() != 1 or losses.shape[0] != self.num_tasks:
            raise ValueError(f"LDCMTL has {self.num_tasks} tasks, got {tuple(losses.shape)}")
        if self.initial_losses is None:
            return losses.detach().clone()
        return self.initial_losses.to(device=losses.device, dtype=losses.dtype)

    def _scale(self) -> float:
        return float(self.num_tasks) if self.reduction == "sum" else 1.0

    def current_weights(self, losses: Tensor) -> Tensor:
        raw = losses.detach()
        initial = self._prepare(raw)
        normed, dnorm = self._normalize(raw, initial)
        sigma = self.router_weights().to(device=raw.device, dtype=raw.dtype)
        return ldc_mtl_grad(normed, sigma, self.lambda_) * dnorm * self._scale()

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        raw = losses.detach()
        initial = self._prepare(raw)
        if self.initial_losses is None:
            self.initial_losses = initial
        normed, dnorm = self._normalize(raw, initial)
        sigma = torch.softmax(self.router_logits, dim=0).to(device=raw.device, dtype=raw.dtype)
        k = self._scale()
        w = ldc_mtl_grad(normed, sigma.detach(), self.lambda_) * dnorm * k
        value = ldc_mtl_loss(normed, sigma.detach(), self.lambda_) * k
        m = losses.shape[0]
        shift = (value - (w * raw).sum()) / m
        # the router's gradient ∂T/∂θ at fixed losses; value 0, it reaches θ only
        router = ldc_mtl_loss(normed, sigma, self.lambda_)
        aux = router - router.detach()
        if self.normalization == "none":
            return WeightedLosses(w * losses + shift, w, aux=aux)
        ok = initial > 0
        what = f"LDC-MTL's '{self.normalization}' normalization divides by the first losses L⁰"
        if self.normalization == "log_initial":
            ok = ok & (raw > 0)
            what += " and takes log L: it needs L⁰ > 0 and L > 0"
        else:
            what += ": it needs L⁰ > 0"
        return WeightedLosses(w * losses + shift, w, aux=aux, domain=(ok, what))
