"""IMTL-L — the loss-balancing half of Impartial Multi-Task Learning (Liu, Li, Kuang, Xue, Chen,
Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021; OpenReview IMPnRXEWpvr).

Each task has a learnable log-scale ``s_t``; the per-task term

    ℓ_t = e^{s_t} · L_t − s_t

is minimised jointly over the network and ``s``. For fixed ``L_t > 0`` the minimiser is
``s_t = −log L_t``: at equilibrium every scaled loss ``e^{s_t}·L_t`` equals 1, i.e. the weight of
``L_t`` is ``1/L_t`` (the scale-invariant baseline's). IMTL-L is uncertainty weighting's simple form
``e^{−s}·L + s`` with ``s → −s`` (TorchJD notes it is ``2·UW`` at the negated parameter).
The gradient-balancing half is :class:`mtlbal.aggregation.IMTLG`; LibMTL's ``IMTL`` is the hybrid
(``IMTLL`` + ``IMTLG``): ``Balancer(..., weighting=IMTLL(m), aggregator=IMTLG())``.

The objectives are ``e^{s_t}·L_t``; the ``−s_t`` terms are returned apart (``aux``) so that they
reach only ``s``. The log-scales are ``parameters()`` of the Balancer: give them to your optimizer
(without weight decay), or let :func:`mtlbal.wrap` step them. Initial ``s = 0`` (the paper,
LibMTL, TorchJD): at the start the objective is ``Σ_t L_t``.

Pitfalls: for ``L_t = 0`` the term is ``−s_t``, which decreases without bound: ``s_t`` grows at
the learning rate every step; for ``L_t < 0`` there is no minimum at all (``e^{s}·L → −∞``). A
negative loss is refused naming the task (the paper balances positive losses); ``max_log_scale``
(default 10, the mirror of :class:`UncertaintyWeighting`'s ``min_log_var``) clamps ``s`` in the
objective against ``L → 0`` blow-ups (``None`` to disable; beyond the clamp ``s`` gets no
gradient).

Missing tasks: the sum over the present tasks; the absent tasks' ``s_t`` get no gradient.

Shapes: ``L`` ``[m]`` → objectives ``[m]``; parameters ``log_scales`` ``[m]``. No host sync.

Example:
    >>> import torch
    >>> imtl = IMTLL(2)
    >>> with torch.no_grad():
    ...     _ = imtl.log_scales.copy_(torch.tensor([0.0, -1.0]))
    >>> imtl(torch.tensor([1.0, 2.0]))  # e^{s}
    tensor([1.0000, 0.3679])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["IMTLL", "imtl_l_objectives"]


def imtl_l_objectives(losses: Tensor, log_scales: Tensor) -> Tensor:
    """``e^{s_t}·L_t`` for each task (``[m]``); the ``−s_t`` terms are added apart by the class
    so that they reach only ``s``."""
    return torch.exp(log_scales) * losses


class IMTLL(LossWeighting):
    """Learnable loss scales: ``ℓ_t = e^{s_t}·L_t − s_t``.

    Args:
        num_tasks: number of tasks ``m``.
        init_log_scale: initial ``s_t`` (0, as the paper, LibMTL and TorchJD).
        max_log_scale: upper clamp on ``s`` used in the objective (``None`` to disable).
    """

    supports_missing_tasks = True

    def __init__(
        self,
        num_tasks: int,
        *,
        init_log_scale: float = 0.0,
        max_log_scale: float | None = 10.0,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        if max_log_scale is not None and init_log_scale > max_log_scale:
            raise ValueError(
                f"init_log_scale ({init_log_scale}) is above max_log_scale ({max_log_scale})"
            )
        self.num_tasks = num_tasks
        self.init_log_scale = float(init_log_scale)
        self.max_log_scale = None if max_log_scale is None else float(max_log_scale)
        self.log_scales = nn.Parameter(torch.full((num_tasks,), self.init_log_scale))

    def hparams(self) -> dict[str, object]:
        return {
            "num_tasks": self.num_tasks,
            "init_log_scale": self.init_log_scale,
            "max_log_scale": self.max_log_scale,
        }

    def _s(self, losses: Tensor, present: tuple[int, ...] | None = None) -> Tensor:
        m = losses.shape[0]
        if present is not None:  # the present tasks' entries (absent ones get no gradient)
            s: Tensor = self.log_scales[torch.tensor(present, device=self.log_scales.device)]
            if self.max_log_scale is not None:
                s = s.clamp_max(self.max_log_scale)
            return s.to(losses.dtype)
        if m != self.num_tasks:
            raise ValueError(f"IMTLL was built for {self.num_tasks} tasks, got {m} losses")
        s = self.log_scales
        if self.max_log_scale is not None:
            s = s.clamp_max(self.max_log_scale)
        return s.to(losses.dtype)

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        s = self._s(losses, ctx.present)
        obj = imtl_l_objectives(losses, s)
        weights = torch.exp(s).detach()
        ok = losses.detach() >= 0
        what = (
            "IMTLL minimises e^s·L − s over s, which has no minimum for L < 0; it needs "
            "non-negative losses"
        )
        return WeightedLosses(obj, weights, aux=-s.sum(), domain=(ok, what))

    def current_weights(self, losses: Tensor) -> Tensor:
        return torch.exp(self._s(losses).detach())

    def reset(self) -> None:
        super().reset()
        with torch.no_grad():
            self.log_scales.fill_(self.init_log_scale)
