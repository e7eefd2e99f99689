"""PCGrad — projecting conflicting gradients (Yu et al., NeurIPS 2020, arXiv:2001.06782).

For each task ``i``, start from ``g_i^PC = g_i`` and visit every task ``j`` in a fresh random
order; when ``⟨g_i^PC, g_j⟩ < 0`` remove the conflicting component,

    g_i^PC ← g_i^PC − ⟨g_i^PC, g_j⟩ / ‖g_j‖² · g_j

always projecting on the *original* ``g_j``. The update is ``Σ_i g_i^PC``.

Because every projection subtracts a multiple of some ``g_j``, ``g_i^PC = Σ_k C_ik g_k`` for a
coefficient matrix ``C`` (``[m, m]``, ``C = I`` at the start) and ``⟨g_i^PC, g_j⟩ = (C G)_ij``.
So PCGrad needs only the Gramian: the update is ``Jᵀ w`` with ``w = Σ_i C_i`` — exact, O(m³)
instead of O(m² n), and branch-free (``min(⟨·,·⟩, 0)`` replaces the ``if``), so no host sync.

Randomness: a ``torch.Generator`` seeded by ``seed``; its state is part of ``state_dict``, so a
resumed run draws the same orders.

Zero gradients: a task with ``‖g_j‖² = 0`` is skipped as a projection target (nothing to
project on). There is no absolute epsilon by default, so the update is exactly positively
homogeneous, ``d(sJ) = s·d(J)``; LibMTL adds 1e-8 to ``‖g_j‖²``, which is off by ~25% when
``‖g‖ ~ 1e-4`` (``eps=1e-8`` reproduces it).

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> PCGrad(seed=0)(J)
    tensor([0.5000, 1.5000])
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction

__all__ = ["PCGrad", "pcgrad_weights"]


def pcgrad_weights(gramian: Tensor, orders: Tensor, eps: float = 0.0) -> Tensor:
    """PCGrad weights ``w`` (``[m]``, sum scale) such that the update is ``Jᵀ w``.

    Args:
        gramian: ``G`` ``[m, m]``.
        orders: ``[m, m]`` integer tensor; row ``i`` is the order in which task ``i`` visits
            the tasks (a permutation of ``0..m-1``).
        eps: added to ``‖g_j‖²`` (default 0: none; a zero ``g_j`` is skipped).
    """
    g = gramian.to(torch.float64)
    m = g.shape[0]
    coef = torch.eye(m, dtype=g.dtype, device=g.device)
    diag = g.diagonal() + eps
    nonzero = diag > 0
    safe = torch.where(nonzero, diag, torch.ones_like(diag))
    rows = torch.arange(m, device=g.device)
    for k in range(m):
        j = orders[:, k]  # the task each row visits at position k, [m]
        dots = (coef * g[:, j].T).sum(1)  # ⟨g_i^PC, g_{j_i}⟩ = (C G)[i, j_i]
        step = torch.where(nonzero[j], torch.clamp(dots, max=0.0) / safe[j], 0.0)
        coef = coef.index_put((rows, j), coef[rows, j] - step)
    return coef.sum(0)


class PCGrad(GramianAggregator):
    """Gradient surgery by projection.

    Args:
        seed: seed of the generator that draws the visiting orders (``None``: nondeterministic).
        eps: added to ``‖g_j‖²`` (default 0; LibMTL's 1e-8 breaks scale invariance).
        reduction: ``"sum"`` (default, the paper's ``Σ_i g_i^PC``) or ``"mean"``.
    """

    # stateless in m: a missing-task step is the method on the present tasks' Gramian
    supports_missing_tasks = True

    def __init__(self, *, seed: int | None = 0, eps: float = 0.0, reduction: Reduction = "sum"):
        super().__init__(reduction)
        self.seed = seed
        self.eps = float(eps)
        self._gen = self.add_generator(seed)
        # every projection coefficient is a ratio of inner products: degree 1 unless an
        # absolute eps is added to ‖g_j‖²
        self.homogeneity = 1 if self.eps == 0 else None

    def hparams(self) -> dict[str, object]:
        return {"seed": self.seed, "eps": self.eps, "reduction": self.reduction}

    def _orders(self, m: int) -> Tensor:
        return torch.stack([torch.randperm(m, generator=self._gen) for _ in range(m)])

    def _weights(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        orders = self._orders(m).to(gramian.device)
        return pcgrad_weights(gramian, orders, self.eps) * self._scale(m)

    @property
    def is_stateful(self) -> bool:
        return False
