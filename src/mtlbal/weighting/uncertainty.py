"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, arXiv:1705.07115).

Each task has a learnable log-variance ``s_t = log σ_t²``. The per-task term is

    ℓ_t = a_t · exp(−s_t) · L_t + b · s_t

minimised jointly over the network and ``s``. The paper's Gaussian regression form is
``(a, b) = (½, ½)``, its classification form ``(1, ½)``; the common simplified form
``exp(−s)·L + s`` is ``(1, 1)``. At the optimum of ``s`` the weight on ``L_t`` is ``b / L_t`` in
every form: ``a`` changes only the dynamics, ``b`` the overall scale.

Shapes: ``L`` ``[m]`` → objectives ``[m]``; parameters ``log_vars`` ``[m]``.

Missing tasks (a step without some tasks' losses): the objective is the sum over the present
tasks ``P`` only, ``Σ_{t∈P} a_t e^{−s_t} L_t + b s_t``, so the gradient this step adds to an
absent task's ``s_t`` is exactly zero (``.grad`` is written for the whole ``log_vars`` tensor,
with ``0.0`` in the absent entries). What the optimizer then does with an absent entry
(momentum, weight decay) is the optimizer's business.

Example:
    >>> import torch
    >>> uw = UncertaintyWeighting(
    ...     num_tasks=2, form="kendall", task_types=["regression", "classification"])
    >>> uw(torch.tensor([1.0, 2.0]))  # a·exp(−s) at s = 0
    tensor([0.5000, 1.0000])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["UncertaintyWeighting", "uncertainty_objectives"]

Form = Literal["kendall", "simple", "libmtl"]


def uncertainty_objectives(losses: Tensor, log_vars: Tensor, a: Tensor, b: float) -> Tensor:
    """``a_t·exp(−s_t)·L_t`` for each task (``[m]``); the ``b·s_t`` terms are returned apart by
    the class so that they reach only ``s``."""
    return a * torch.exp(-log_vars) * losses


class UncertaintyWeighting(LossWeighting):
    """Learnable homoscedastic-uncertainty task weights.

    Args:
        num_tasks: number of tasks ``m``.
        form: ``"kendall"`` — the paper's forms, ``(½, ½)`` for regression tasks and ``(1, ½)``
            for classification tasks (see ``task_types``); ``"simple"`` — ``exp(−s)·L + s``;
            ``"libmtl"`` — ``(½, ½)`` for all tasks.
        task_types: with ``form="kendall"``, ``"regression"`` or ``"classification"`` per task
            (default: all regression).
        init_log_var: initial ``s_t`` (0 in the paper's and nash-mtl's code; LibMTL uses −0.5).
        min_log_var: lower clamp on ``s`` used in the objective, against ``L_t → 0`` blow-ups
            (``None`` to disable).

    The log-variances are ``parameters()`` of the Balancer: give them to your optimizer
    (without weight decay), or let :func:`mtlbal.wrap` step them.
    """

    a: Tensor
    supports_missing_tasks = True

    linear_in_losses = True

    def __init__(
        self,
        num_tasks: int,
        *,
        form: Form = "kendall",
        task_types: Sequence[Literal["regression", "classification"]] | None = None,
        init_log_var: float = 0.0,
        min_log_var: float | None = -10.0,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        if form not in ("kendall", "simple", "libmtl"):
            raise ValueError(f"unknown form {form!r}")
        self.num_tasks = num_tasks
        self.form: Form = form
        if task_types is None:
            task_types = ["regression"] * num_tasks
        if len(task_types) != num_tasks:
            raise ValueError(f"task_types has {len(task_types)} entries for {num_tasks} tasks")
        for t in task_types:
            if t not in ("regression", "classification"):
                raise ValueError(f"task type must be 'regression' or 'classification', got {t!r}")
        self.task_types = list(task_types)
        if form == "kendall":
            a = [0.5 if t == "regression" else 1.0 for t in task_types]
            self.b = 0.5
        elif form == "libmtl":
            a = [0.5] * num_tasks
            self.b = 0.5
        else:
            a = [1.0] * num_tasks
            self.b = 1.0
        self.register_buffer("a", torch.tensor(a), persistent=False)
        self.init_log_var = init_log_var
        self.min_log_var = min_log_var
        self.log_vars = nn.Parameter(torch.full((num_tasks,), float(init_log_var)))

    def hparams(self) -> dict[str, object]:
        regression_only = all(t == "regression" for t in self.task_types)
        return {
            "num_tasks": self.num_tasks,
            "form": self.form,
            "task_types": None if regression_only else list(self.task_types),
            "init_log_var": self.init_log_var,
            "min_log_var": self.min_log_var,
        }

    def _s(self) -> Tensor:
        s = self.log_vars
        return s if self.min_log_var is None else s.clamp_min(self.min_log_var)

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        s = self._s().to(losses.dtype)
        a = self.a.to(device=losses.device, dtype=losses.dtype)
        if ctx.present is not None:  # the present tasks' entries (absent ones get no gradient)
            idx = torch.tensor(ctx.present, device=s.device)
            s, a = s[idx], a[idx]
        obj = uncertainty_objectives(losses, s, a, self.b)
        weights = (a * torch.exp(-s)).detach()
        return WeightedLosses(obj, weights, aux=self.b * s.sum())

    def current_weights(self, losses: Tensor) -> Tensor:
        s = self._s().detach().to(losses.dtype)
        return self.a.to(device=losses.device, dtype=losses.dtype) * torch.exp(-s)

    def reset(self) -> None:
        super().reset()
        with torch.no_grad():
            self.log_vars.fill_(self.init_log_var)
