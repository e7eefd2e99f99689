"""Running aggregates of the step info: the gradient-conflict incidence of sparse training.

Zhang et al. (arXiv:2411.18615) measure gradient conflict as the share of task pairs whose
gradients have a negative cosine, ``N_gc / C(m, 2)`` with ``N_gc = #{i<j : cos(g_i, g_j) < 0}``,
averaged over all iterations (``p%``), and also over the iterations of the last 50% of the
epochs. Every Balancer step that formed per-task gradients reports this share as
``StepInfo.conflict`` (gradient methods always do; pass ``diagnostics=True`` to a Balancer
without one). At ``"params"`` the gradients are those of the shared parameters (after the
transforms, e.g. :class:`~mtlbal.transforms.SparseMask`); at a cut point they are those of the
representation.

:class:`ConflictIncidence` collects it without a host sync per step (the values stay tensors
until :meth:`ConflictIncidence.summary`).

Example:
    >>> import torch, mtlbal
    >>> trunk = torch.nn.Linear(3, 4); heads = [torch.nn.Linear(4, 1) for _ in range(2)]
    >>> b = mtlbal.Balancer(trunk, diagnostics=True)
    >>> tracker = ConflictIncidence(); handle = b.register_hook(tracker)
    >>> for _ in range(4):
    ...     z = trunk(torch.randn(8, 3))
    ...     _ = b.backward([heads[0](z).mean(), -heads[1](z).mean()])
    >>> sorted(tracker.summary())
    ['last_half', 'mean', 'steps']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["ConflictIncidence"]


class ConflictIncidence:
    """Mean gradient-conflict incidence over steps, and over the last half of the run.

    Register it with ``balancer.register_hook(tracker)`` (or call ``tracker.update(info)``).
    Steps without a conflict value (skipped steps, or no per-task gradients) are not counted.
    Call :meth:`epoch_end` at epoch boundaries to get the paper's "last 50% of epochs";
    without epoch marks the last half is taken over steps.
    """

    def __init__(self) -> None:
        self.values: list[Tensor] = []
        self.epoch_starts: list[int] = []

    def __call__(self, balancer: Any, info: Any) -> None:
        self.update(info)

    def update(self, info: Any) -> None:
        c = getattr(info, "conflict", None)
        if c is not None and not getattr(info, "skipped", False):
            self.values.append(c.detach().reshape(()))

    def epoch_end(self) -> None:
        """Mark the end of an epoch (the next steps belong to a new one)."""
        self.epoch_starts.append(len(self.values))

    def reset(self) -> None:
        self.values = []
        self.epoch_starts = []

    def _last_half_start(self) -> int:
        n = len(self.values)
        bounds = [0] + [s for s in self.epoch_starts if 0 < s < n]
        if self.epoch_starts and len(bounds) >= 2:
            epochs = len(bounds)  # epochs with at least one step (the last one may be open)
            return bounds[epochs - (epochs + 1) // 2]
        return n // 2

    def summary(self) -> dict[str, float]:
        """``{"mean", "last_half", "steps"}``, incidences as fractions in [0, 1] (host sync)."""
        if not self.values:
            return {"mean": float("nan"), "last_half": float("nan"), "steps": 0.0}
        v = torch.stack([x.to(torch.float64).cpu() for x in self.values])
        start = self._last_half_start()
        return {
            "mean": float(v.mean()),
            "last_half": float(v[start:].mean()),
            "steps": float(v.numel()),
        }
