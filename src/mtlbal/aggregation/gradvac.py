"""GradVac — Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021, arXiv:2010.05874).

PCGrad with adaptive targets: instead of only removing negative similarity, each task's
gradient is pushed up to an EMA target similarity ``φ̂_ij`` (state, per ordered pair,
initially 0). For each task ``i``, over the other tasks ``j`` in a fresh random order, with the
current (already modified) ``g_i`` and the *original* ``g_j``:

    φ = ⟨g_i, g_j⟩ / (‖g_i‖‖g_j‖ + ε)
    if φ < φ̂_ij:  g_i ← g_i + g_j · ‖g_i‖ (φ̂_ij √(1−φ²) − φ √(1−φ̂_ij²)) / (‖g_j‖ √(1−φ̂_ij²) + ε)
    φ̂_ij ← (1 − β) φ̂_ij + β φ          (always)

and the update is ``Σ_i g_i`` (the paper's sum; ``reduction="mean"`` divides by ``m``).
PCGrad is the case ``φ̂ ≡ 0``. LibMTL uses ``ε = 1e-8``, which makes the update depend on the
gradients' scale (it is far off when ``‖g‖ ~ 1e-4``); here ``ε = 0`` by default and only exact
zeros are guarded: ``φ = 0`` when ``‖g_i‖‖g_j‖ = 0``, and no step when ``‖g_j‖√(1−φ̂²) = 0``.
Then the update is exactly positively homogeneous, ``d(sJ) = s·d(J)``.

As for PCGrad, every ``g_i = Σ_k C_ik g_k`` (``C = I`` at the start), so all norms and inner
products come from the Gramian: ``‖g_i‖² = C_i G C_iᵀ``, ``⟨g_i, g_j⟩ = (C G)_ij``. The rows are
processed together (one position of their visiting orders at a time; each row touches only
its own targets), branch-free with ``torch.where`` — no host sync.

Groups: the similarity is taken over the whole shared gradient (LibMTL's default
``group_type=0``); the per-layer / per-tensor variants of the paper are not provided.
``β``: 0.5 is LibMTL's default; the paper's value is not known to us.

Missing tasks (a step without some tasks' gradients, ``P`` the present ones): the step is
GradVac on ``P`` with the targets ``φ̂_ij`` of the pairs ``i, j ∈ P`` (visiting orders drawn over
``P``); only those targets are updated, the others (every pair with an absent task) are left
as they are. Targets never visited stay at their initial 0.

Randomness: a ``torch.Generator`` seeded by ``seed`` (in ``state_dict`` with ``φ̂``, so a
resumed run continues exactly).

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> GradVac(seed=0)(J)  # first step, φ̂ = 0: PCGrad
    tensor([0.5000, 1.5000])
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction
from mtlbal.step import StepContext

__all__ = ["GradVac", "gradvac_weights"]


def gradvac_weights(
    gramian: Tensor,
    targets: Tensor,
    orders: Tensor,
    beta: float = 0.5,
    eps: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """GradVac weights (``[m]``, sum scale) and the updated targets ``φ̂`` (``[m, m]``).

    Args:
        gramian: ``G`` ``[m, m]``.
        targets: ``φ̂`` ``[m, m]`` before this step.
        orders: ``[m, m−1]`` integer tensor; row ``i`` lists the other tasks in the order
            task ``i`` visits them.
        beta: EMA rate of the targets.
        eps: added to both denominators (default 0: exact zeros are guarded instead).
    """
    g = gramian.detach().to(torch.float64)
    m = g.shape[0]
    coef = torch.eye(m, dtype=g.dtype, device=g.device)
    phi_t = targets.detach().to(device=g.device, dtype=g.dtype).clone()
    rows = torch.arange(m, device=g.device)
    norms = g.diagonal().clamp_min(0).sqrt()
    # kept up to date instead of recomputed (O(m²) per visit instead of O(m³)):
    # cg[i, l] = ⟨g_i^GV, g_l⟩ = (C G)[i, l] and sq[i] = ‖g_i^GV‖²
    cg = g.clone()
    sq = g.diagonal().clone()
    for k in range(m - 1):
        j = orders[:, k].to(g.device)
        dot = cg[rows, j]
        norm_i = sq.clamp_min(0).sqrt()
        norm_j = norms[j]
        den_phi = norm_i * norm_j + eps
        phi = torch.where(den_phi > 0, dot / torch.where(den_phi > 0, den_phi, 1.0), 0.0)
        target = phi_t[rows, j]
        s_phi = (1 - phi * phi).clamp_min(0).sqrt()
        s_tgt = (1 - target * target).clamp_min(0).sqrt()
        den_w = norm_j * s_tgt + eps
        w = norm_i * (target * s_phi - phi * s_tgt) / torch.where(den_w > 0, den_w, 1.0)
        w = torch.where((phi < target) & (den_w > 0), w, torch.zeros_like(w))
        coef = coef.index_put((rows, j), coef[rows, j] + w)
        # g_i += w_i g_j: ⟨g_i, g_l⟩ gains w_i G[j, l]; ‖g_i‖² gains 2 w_i ⟨g_i, g_j⟩ + w_i² ‖g_j‖²
        sq = sq + 2 * w * dot + w * w * g[j, j]
        cg = cg + w[:, None] * g[j]
        phi_t = phi_t.index_put((rows, j), (1 - beta) * target + beta * phi)
    return coef.sum(0), phi_t


class GradVac(GramianAggregator):
    """Gradient vaccine: PCGrad towards EMA similarity targets.

    Args:
        beta: EMA rate of the targets (0.5, LibMTL).
        eps: added to the denominators (0 by default; LibMTL's 1e-8 breaks scale invariance).
        seed: seed of the visiting orders (``None``: nondeterministic).
        reduction: ``"sum"`` (default, the paper's) or ``"mean"``.
    """

    targets: Tensor | None
    supports_missing_tasks = True

    def __init__(
        self,
        *,
        beta: float = 0.5,
        eps: float = 0.0,
        seed: int | None = 0,
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        self.eps = float(eps)
        # φ and the coefficients are scale-free ratios: degree 1 unless eps > 0
        self.homogeneity = 1 if self.eps == 0 else None
        self.seed = seed
        self._gen = self.add_generator(seed)
        self.add_state("targets", None)

    def hparams(self) -> dict[str, object]:
        return {"beta": self.beta, "eps": self.eps, "seed": self.seed, "reduction": self.reduction}

    def _orders(self, m: int) -> Tensor:
        rows = []
        for i in range(m):
            others = torch.cat([torch.arange(i), torch.arange(i + 1, m)])
            rows.append(others[torch.randperm(m - 1, generator=self._gen)])
        return torch.stack(rows) if m > 1 else torch.zeros(1, 0, dtype=torch.int64)

    def _weights(self, gramian: Tensor) -> Tensor:
        return self.solve(gramian, StepContext())

    def solve(self, gramian: Tensor, ctx: StepContext) -> Tensor:
        m = gramian.shape[0]
        full = ctx.num_all_tasks(m)
        if self.targets is None:
            self.targets = torch.zeros(full, full, dtype=torch.float64, device=gramian.device)
        elif self.targets.shape != (full, full):
            raise ValueError(f"GradVac holds targets for {self.targets.shape[0]} tasks, got {full}")
        if ctx.present is None:
            w, self.targets = gradvac_weights(
                gramian, self.targets, self._orders(m), self.beta, self.eps
            )
            return w * self._scale(m)
        # the present tasks' pairs only; the other targets are left as they are
        idx = torch.tensor(ctx.present, device=self.targets.device)
        rows, cols = idx[:, None].expand(m, m), idx[None, :].expand(m, m)
        w, sub = gradvac_weights(
            gramian, self.targets[rows, cols], self._orders(m), self.beta, self.eps
        )
        self.targets = self.targets.index_put((rows, cols), sub.to(self.targets))
        return w * self._scale(m)
