"""Rep-MTL: a representation-level task-saliency regulariser at the cut point.

Wang, Li, Xu, "Rep-MTL: Unleashing the Power of Representation-level Task Saliency for
Multi-Task Learning", ICCV 2025, arXiv:2507.21049. The authors' repository (Jacky1128/Rep-MTL,
read at 6cf0cd7ef03c) holds a README only: no code was released, so everything here follows the
paper's equations.

The **task saliency** is the gradient of each task's objective with respect to the shared
representation ``z`` (the cut point's output, ``[B, C, *spatial]``; a ``[B, C]`` vector has one
spatial position): ``S_t = ∂ℓ_t/∂z``, taken with its graph so that the regulariser can be
differentiated through it (second order). Two terms, added to the objective:

**TSR** (task-specific saliency regulation, an entropy penalty)::

    Ŝ_t[b, s]  = (1/C) Σ_c S_t[b, c, s]                       (channel mean, signed)
    P_t[b, s]  = |Ŝ_t[b, s]| / Σ_k |Ŝ_k[b, s]|                 (a distribution over tasks)
    L_tsr      = mean_{b, s} ( − Σ_t P_t[b, s] log P_t[b, s] )

**CSA** (cross-task saliency alignment, sample-wise and contrastive)::

    M_t[b]  = S_t[b] S_t[b]ᵀ                (C×C; S_t[b] reshaped C × N, N spatial positions)
    A_b     = [mean_s S_1[b, :, s], …, mean_s S_T[b, :, s]]    (C × T)
    Â_b     = A_b A_bᵀ                                         (C × C, the sample's anchor)
    p_bt    = cos(Â_b, M_t[b]) / τ          n_bk = cos(Â_b, Â_k) / τ      (flattened)
    L_csa   = mean_b mean_t [ − p_bt + log Σ_{k ≠ b} exp(n_bk) ]

**Total**: ``Σ_t ℓ_t + λ_tsr L_tsr + λ_csa L_csa``. At the cut point the task-level combination
(any aggregator, or the plain sum) gives the trunk's gradient at ``z``; the regulariser's
gradient ``∂R/∂z`` is added to it, and ``∂R/∂θ_heads`` reaches the heads with the objectives'.
It composes with any loss weighting (``S_t`` is the saliency of the weighting's objective
``ℓ_t = c_t L_t``, with the multipliers ``c_t`` held fixed) and any aggregator.

**Documented choices where the paper is silent:**

* ``τ`` is not given: default ``τ = 0.5``;
* the ``T`` positives of an anchor are averaged (``mean_t``), and the denominator excludes the
  positive pair, as printed;
* ``λ_tsr = λ_csa = 0.9`` (the value the paper's sensitivity studies hold fixed; its grid is
  ``{0.7, …, 1.5}``);
* a position where no task is salient (``Σ_k |Ŝ_k| = 0``) has ``P = 0`` and adds no entropy
  (``0 log 0 = 0``); a zero affinity has cosine 0 (the norms are floored at the dtype's
  smallest normal number, exact otherwise);
* the channel dimension is dim 1 of ``z``; any trailing dimensions are the spatial positions.

Under DDP the TSR term equals one process on the concatenated batch (a mean over samples); the
CSA negatives are the rank's own samples (as in any contrastive loss without a gather), so CSA
equals the mean over the ranks' shards. CSA needs ``B ≥ 2`` samples per step.

Cost: the heads' backward with ``create_graph`` (one pass per task), the regulariser and its
backward through that graph (double backward through the heads, twice: once for ``∂R/∂z``, once
with the heads' objective). No host sync.

Shapes: ``saliency`` is ``[T, B, C, *spatial]``; every kernel returns a scalar.

Example:
    >>> import torch
    >>> S = torch.zeros(2, 3, 4); S[0, :, 0] = 1.0; S[1, :, 1] = 1.0   # disjoint channels
    >>> round(float(rep_mtl_tsr(S)), 4)   # equal channel-mean magnitudes: P = (½, ½), log 2
    0.6931
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mtlbal.step import Need
from mtlbal.transforms.base import GradientTransform

__all__ = ["RepMTL", "rep_mtl_csa", "rep_mtl_regularizer", "rep_mtl_tsr"]


def _flat(saliency: Tensor) -> Tensor:
    """``[T, B, C, *spatial]`` → ``[T, B, C, N]``."""
    if saliency.dim() < 3:
        raise ValueError(
            "Rep-MTL needs the saliency as [T, B, C, *spatial] (a representation [B, C, …]), got "
            f"shape {tuple(saliency.shape)}"
        )
    t, b, c = saliency.shape[:3]
    return saliency.reshape(t, b, c, -1)


def rep_mtl_tsr(saliency: Tensor) -> Tensor:
    """TSR: the mean over samples and positions of the entropy of ``P_t ∝ |mean_c S_t|``."""
    s = _flat(saliency).mean(dim=2).abs()  # [T, B, N]
    tiny = torch.finfo(s.dtype).tiny
    den = s.sum(dim=0, keepdim=True)
    p = s / den.clamp_min(tiny)  # a position where no task is salient: P = 0, no entropy
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(tiny)), torch.zeros_like(p))
    return -plogp.sum(dim=0).mean()


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def rep_mtl_csa(saliency: Tensor, *, tau: float = 0.5) -> Tensor:
    """CSA: each sample's anchor ``Â_b`` against its tasks' affinities ``M_t[b]`` (positives)
    and the other samples' anchors (negatives); see the module docstring."""
    s = _flat(saliency)  # [T, B, C, N]
    t, b, c, _ = s.shape
    if b < 2:
        raise ValueError(f"Rep-MTL's CSA needs at least 2 samples per step (negatives), got {b}")
    m = torch.einsum("tbcn,tbdn->tbcd", s, s).reshape(t, b, c * c)  # M_t[b]
    a = s.mean(dim=3)  # [T, B, C]: column t of A_b
    anchor = torch.einsum("tbc,tbd->bcd", a, a).reshape(b, c * c)  # Â_b = A_b A_bᵀ
    za, zt = _unit(anchor), _unit(m)
    pos = (zt * za.unsqueeze(0)).sum(-1) / tau  # [T, B]
    neg = za @ za.T / tau  # [B, B]
    eye = torch.eye(b, dtype=torch.bool, device=neg.device)
    log_den = torch.logsumexp(neg.masked_fill(eye, -math.inf), dim=1)  # Σ_{k≠b}
    return (log_den.unsqueeze(0) - pos).mean()


def rep_mtl_regularizer(
    saliency: Tensor,
    *,
    lambda_tsr: float = 0.9,
    lambda_csa: float = 0.9,
    tau: float = 0.5,
) -> Tensor:
    """``λ_tsr L_tsr + λ_csa L_csa`` (a term with ``λ = 0`` is not computed)."""
    out = saliency.new_zeros(())
    if lambda_tsr:
        out = out + lambda_tsr * rep_mtl_tsr(saliency)
    if lambda_csa:
        out = out + lambda_csa * rep_mtl_csa(saliency, tau=tau)
    return out


class RepMTL(GradientTransform):
    """Rep-MTL's saliency regulariser at the Balancer's cut point (see the module docstring).

    Pass it as a transform together with a cut point: ``Balancer(trunk, at=trunk,
    transforms=RepMTL(), aggregator=...)`` (any weighting, any aggregator or none). It declares
    ``Need.SALIENCY``: the per-task gradients at the cut are taken with their graph.
    ``info.extras["rep_mtl"]`` reports the regulariser's value.

    Args:
        lambda_tsr: weight of the entropy penalty (TSR).
        lambda_csa: weight of the cross-task alignment (CSA); 0 disables it.
        tau: CSA's temperature (not given by the paper).
    """

    def __init__(
        self,
        *,
        lambda_tsr: float = 0.9,
        lambda_csa: float = 0.9,
        tau: float = 0.5,
    ) -> None:
        super().__init__()
        for name, v in (("lambda_tsr", lambda_tsr), ("lambda_csa", lambda_csa)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"RepMTL: {name} must be a finite number ≥ 0, got {v}")
        if not tau > 0:
            raise ValueError(f"RepMTL: tau must be > 0, got {tau}")
        self.lambda_tsr = float(lambda_tsr)
        self.lambda_csa = float(lambda_csa)
        self.tau = float(tau)

    @property
    def needs(self) -> frozenset[Need]:  # type: ignore[override]
        """``Need.SALIENCY``: per-task gradients at the cut point, with their graph."""
        return frozenset({Need.SALIENCY})

    def hparams(self) -> dict[str, Any]:
        return {
            "lambda_tsr": self.lambda_tsr,
            "lambda_csa": self.lambda_csa,
            "tau": self.tau,
        }

    def regularizer(self, saliency: Tensor) -> Tensor:
        """``λ_tsr L_tsr + λ_csa L_csa`` of ``[T, B, C, *spatial]`` saliencies (with graph)."""
        return rep_mtl_regularizer(
            saliency,
            lambda_tsr=self.lambda_tsr,
            lambda_csa=self.lambda_csa,
            tau=self.tau,
        )
