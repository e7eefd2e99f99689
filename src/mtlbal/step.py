"""What one step did: :class:`StepInfo`, returned by :meth:`mtlbal.Balancer.backward`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["StepInfo", "gramian_stats"]


@dataclass
class StepInfo:
    """What one :meth:`Balancer.backward` did. Tensors live on the losses' device.

    Attributes:
        tasks: task names (dict keys, or ``"0"``, ``"1"``, … for a sequence).
        losses: ``[m]`` detached raw losses.
        loss_weights: ``[m]`` the loss-level multipliers ``∂ℓ_t/∂L_t``.
        grad_weights: ``[m]`` the gradient-level weights on ``∇ℓ_t`` (Gramian methods), if any.
        weights: ``[m]`` the overall weight of ``∇L_t`` in the shared update where the method
            is a weighting (``loss_weights·grad_weights``), else ``loss_weights``.
        gramian: ``[m, m]`` Gramian of the per-task gradients of ``ℓ_t`` at the shared part,
            when they were formed (a gradient method, ``diagnostics=True``).
        grad_norms: ``[m]`` norms of those gradients (``None`` without a Gramian).
        cosines: ``[m, m]`` their pairwise cosines.
        conflict: share of task pairs with a negative cosine (the sparse-training paper's
            gradient-conflict incidence).
        The last three are derived from ``gramian`` on first access (no work when unread).
        skipped: ``True`` when the step was skipped: a non-finite loss or gradient under the
            ``nonfinite="skip"`` policy, or a gradient overflow under a ``GradScaler``
            (``extras["overflow"]``), where ``.grad`` holds the plain non-finite gradient so
            that ``scaler.step`` skips and lowers the scale exactly as for a plain step.
        step: the Balancer's step counter after this call.
    """

    tasks: tuple[str, ...]
    losses: Tensor
    loss_weights: Tensor
    weights: Tensor
    grad_weights: Tensor | None = None
    gramian: Tensor | None = None
    skipped: bool = False
    step: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    _stats: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    def _derived(self) -> tuple[Tensor, Tensor, Tensor] | None:
        if self._stats is None and self.gramian is not None:
            self._stats = gramian_stats(self.gramian)
        return self._stats

    @property
    def grad_norms(self) -> Tensor | None:
        stats = self._derived()
        return None if stats is None else stats[0]

    @property
    def cosines(self) -> Tensor | None:
        stats = self._derived()
        return None if stats is None else stats[1]

    @property
    def conflict(self) -> Tensor | None:
        stats = self._derived()
        return None if stats is None else stats[2]


def gramian_stats(gramian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Norms ``[m]``, cosines ``[m, m]`` and the share of pairs with negative cosine."""
    g = gramian.detach()
    norms = g.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, g / denom.clamp_min(torch.finfo(g.dtype).tiny), 0.0)
    m = g.shape[0]
    if m < 2:
        conflict = torch.zeros((), dtype=g.dtype, device=g.device)
    else:
        iu = torch.triu_indices(m, m, offset=1, device=g.device)
        conflict = (cos[iu[0], iu[1]] < 0).to(g.dtype).mean()
    return norms, cos, conflict
