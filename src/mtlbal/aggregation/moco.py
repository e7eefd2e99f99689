"""MoCo — multi-objective gradient correction (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen,
"Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach",
ICLR 2023, arXiv:2210.12624).

Stochastic MGDA is biased: the min-norm weights of noisy gradients are not those of the true
gradients. MoCo tracks each task's gradient with a moving average ``y_i`` and runs one
projected-gradient step of the MGDA dual on the tracked gradients per training step. At step
``k = 1, 2, …`` (``Y = [y_1 … y_m]ᵀ``, ``[m, n]``):

    ĝ_i = L_i · g_i / (‖g_i‖ + ε)                      (normalize="loss"; "none": ĝ_i = g_i)
    y_i ← y_i − β_k (y_i − ĝ_i),                        β_k = β / k^{σ_β}
    λ  ← P(λ − γ_k (Y Yᵀ + ρ I) λ),                     γ_k = γ / k^{σ_γ}
    d  = Yᵀ λ

with ``y = 0`` and ``λ = 1/m`` at the start. ``P`` is the paper's Euclidean projection onto the
simplex (``simplex="projection"``) or a softmax (``"softmax"``, default), which is what the
authors' released code and LibMTL use in practice.

State (in ``state_dict``): the tracking buffer ``y`` (``[m, n]``: memory as large as the
Jacobian), ``λ`` (``[m]``) and the step counter ``k``. It needs the Jacobian, not only the
Gramian, and ``n`` must stay the same from step to step. Use it at the shared parameters
(``at="params"``): at a cut point the entries of ``y`` would be (sample, feature) positions
that hold different samples at every step (LibMTL refuses MoCo with ``rep_grad``), and under
DDP a cut point's Jacobian is not gathered.

Defaults are LibMTL's (``β = 0.5, σ_β = 0.5, γ = 0.1, σ_γ = 0.5, ρ = 0``, loss normalisation,
``ε = 1e-8``). The authors' scripts use ``β = 0.99`` / ``0.05``, ``γ = 0.1``, ``σ = 0``, the
"raw_loss" normalisation, and decay the step sizes by the *epoch* index ``1 + epoch`` where
LibMTL (and this class) use the step count ``k``.

Scale: ``λ`` is on the simplex, so ``d`` is on the mean scale; ``reduction="sum"`` (default)
multiplies it by ``m``, as the authors' code does ("to match the sum loss"); ``"mean"`` is
LibMTL's scale. MoCo has no degree of homogeneity: the ``λ`` step ``γ Y Yᵀ λ`` is quadratic in
the gradients' scale, so scaling the losses changes the weights (``homogeneity = None``).
Identical tasks give a positive multiple of their gradient, not the sum (``y`` starts at 0
and, with the loss normalisation, ``ĝ = L·g/‖g‖``).

Host sync: none (the simplex projection is branch-free on the device).

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> MoCo(normalize="none")(J)  # step 1: y = βĝ = J/2, λ stays 1/2 by symmetry; d = 2·Yᵀλ
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlbal.aggregation.base import Aggregator, Reduction
from mtlbal.step import Need, StepContext

__all__ = ["MoCo", "moco_step", "project_simplex"]

Normalize = Literal["loss", "none"]
Simplex = Literal["softmax", "projection"]


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v`` (``[m]``) onto the probability simplex (sort-based, no
    host sync)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1
    ind = torch.arange(1, v.shape[0] + 1, device=v.device, dtype=v.dtype)
    cond = (u - css / ind) > 0  # true on a prefix; its length is the support size
    r = cond.sum().clamp_min(1)
    theta = css.gather(0, (r - 1).reshape(1)) / r.to(v.dtype)
    return (v - theta).clamp_min(0)


def moco_step(
    jacobian: Tensor,
    y: Tensor,
    lam: Tensor,
    k: Tensor,
    losses: Tensor | None = None,
    *,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
    eps: float = 1e-8,
    simplex: Simplex = "softmax",
) -> tuple[Tensor, Tensor, Tensor]:
    """One MoCo step: ``(d [n] (mean scale), y [m, n], λ [m] float64)``.

    Args:
        jacobian: ``J`` ``[m, n]``.
        y: tracking buffer ``[m, n]`` before the step.
        lam: ``λ`` ``[m]`` before the step.
        k: the step index ``k ≥ 1`` (a tensor, so that no host read is needed).
        losses: ``[m]`` for the loss normalisation ``ĝ_i = L_i g_i/(‖g_i‖ + ε)``; ``None``
            uses the raw gradients.
    """
    g = jacobian.detach()
    if losses is not None:
        norms = g.norm(dim=1, keepdim=True)
        g = g / (norms + eps) * losses.detach().to(g)[:, None]
    kf = k.to(device=g.device, dtype=torch.float64)
    beta_k = (beta / kf**beta_sigma).to(g.dtype)
    y_new = y.to(g) - beta_k * (y.to(g) - g)
    gram = (y_new @ y_new.T).to(torch.float64)
    lam64 = lam.to(device=g.device, dtype=torch.float64)
    m = lam64.shape[0]
    gamma_k = gamma / kf**gamma_sigma
    v = lam64 - gamma_k * ((gram + rho * torch.eye(m, dtype=gram.dtype, device=g.device)) @ lam64)
    lam_new = torch.softmax(v, 0) if simplex == "softmax" else project_simplex(v)
    return lam_new.to(y_new.dtype) @ y_new, y_new, lam_new


class MoCo(Aggregator):
    """Multi-objective gradient correction: MGDA on tracked (moving-average) gradients.

    Args:
        beta: step size of the tracking buffer ``y`` (0.5).
        beta_sigma: its decay exponent, ``β_k = β/k^σ`` (0.5).
        gamma: step size of ``λ`` (0.1).
        gamma_sigma: its decay exponent (0.5).
        rho: ℓ2 regularisation of the ``λ`` subproblem (0).
        normalize: ``"loss"`` (default: ``ĝ_i = L_i g_i/‖g_i‖``, needs the losses) or ``"none"``.
        simplex: ``"softmax"`` (default, the released code) or ``"projection"`` (the paper).
        eps: added to ``‖g_i‖`` in the loss normalisation (1e-8).
        reduction: ``"sum"`` (default, ``m·Yᵀλ``) or ``"mean"`` (``Yᵀλ``).
    """

    needs = frozenset({Need.GRAMIAN, Need.LOSSES})
    homogeneity = None  # no degree at any scale: γ Y Yᵀ λ is quadratic in the gradients' scale
    y: Tensor | None
    lam: Tensor | None
    steps: Tensor

    supports_missing_tasks = False
    missing_tasks_note = (
        "its λ lives on the simplex of every task and its tracking buffer y is updated for every "
        "task each step (not implemented for a step without some tasks)"
    )

    def __init__(
        self,
        *,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        normalize: Normalize = "loss",
        simplex: Simplex = "softmax",
        eps: float = 1e-8,
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if beta_sigma < 0 or gamma_sigma < 0 or rho < 0 or eps < 0:
            raise ValueError("beta_sigma, gamma_sigma, rho and eps must be ≥ 0")
        if normalize not in ("loss", "none"):
            raise ValueError(f"normalize must be 'loss' or 'none', got {normalize!r}")
        if simplex not in ("softmax", "projection"):
            raise ValueError(f"simplex must be 'softmax' or 'projection', got {simplex!r}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.gamma = float(gamma)
        self.gamma_sigma = float(gamma_sigma)
        self.rho = float(rho)
        self.normalize: Normalize = normalize
        self.simplex: Simplex = simplex
        self.eps = float(eps)
        self.add_state("y", None)
        self.add_state("lam", None)
        self.add_state("steps", torch.zeros((), dtype=torch.int64))

    def hparams(self) -> dict[str, object]:
        return {
            "beta": self.beta,
            "beta_sigma": self.beta_sigma,
            "gamma": self.gamma,
            "gamma_sigma": self.gamma_sigma,
            "rho": self.rho,
            "normalize": self.normalize,
            "simplex": self.simplex,
            "eps": self.eps,
            "reduction": self.reduction,
        }

    def aggregate_jacobian(self, jacobian: Tensor, ctx: StepContext | None = None) -> Tensor:
        m, n = jacobian.shape
        losses = None
        if self.normalize == "loss":
            losses = None if ctx is None else ctx.losses
            if losses is None:
                raise ValueError(
                    "MoCo(normalize='loss') needs the losses: call it as moco(J, losses=L)"
                )
        y = self.y
        if y is None:
            y = torch.zeros_like(jacobian)
        elif tuple(y.shape) != (m, n):
            raise ValueError(
                f"MoCo holds a tracking buffer for {y.shape[0]} tasks × {y.shape[1]} entries, "
                f"got a Jacobian of {m} × {n} (the shared part, or the cut point's batch size, "
                "must not change between steps)"
            )
        lam = self.lam
        if lam is None:
            lam = torch.full((m,), 1.0 / m, dtype=torch.float64, device=jacobian.device)
        k = self.steps.to(jacobian.device) + 1
        d, self.y, self.lam = moco_step(
            jacobian,
            y,
            lam,
            k,
            losses,
            beta=self.beta,
            beta_sigma=self.beta_sigma,
            gamma=self.gamma,
            gamma_sigma=self.gamma_sigma,
            rho=self.rho,
            eps=self.eps,
            simplex=self.simplex,
        )
        self.steps = self.steps + 1
        return (d * (m * self._scale(m))).to(jacobian.dtype)
