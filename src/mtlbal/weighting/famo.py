"""FAMO — Fast Adaptive Multitask Optimization (Liu, Feng, Stone & Liu, NeurIPS 2023,
arXiv:2306.03792).

Task logits ``ξ`` (``[m]``, initially 0) give ``z = softmax(ξ)``. With ``D_t = L_t − L*_t + 1e-8``
(``L*`` the known minimum losses, default 0) and the detached ``c = (Σ_t z_t / D_t)^{-1}``,
the network minimises

    Σ_t c · z_t · log D_t,        whose gradient is  Σ_t (c z_t / D_t) ∇L_t  (weights sum to 1).

After the network's optimizer step the losses are **re-evaluated on the same batch** (one
extra forward without gradient) and ``ξ`` takes one step of its own Adam (``lr = 0.025``,
coupled L2 ``weight_decay = γ``; betas (0.9, 0.999), eps 1e-8, as ``torch.optim.Adam``) on

    ∇_ξ = J_softmax(ξ)ᵀ δ = z ⊙ (δ − zᵀδ),       δ_t = log D_t(before) − log D_t(after),

lowering the weight of the tasks that improved most. The training loop::

    info = balancer.backward(losses)          # or opt.backward(losses) with mtlbal.wrap
    optimizer.step()                          # (opt.step())
    with torch.no_grad():
        new_losses = compute_losses(model, batch)     # same batch, updated parameters
    balancer.update(new_losses)               # FAMO's logit step

``ξ`` is state, not a parameter: your optimizer (and :func:`mtlbal.wrap`) never see it. Its
Adam moments, step count, and the losses of the last backward are state too, so
``state_dict`` resumes a run exactly. All state follows the module's dtype (``.double()``,
``.to(dtype)``); a floating ``min_losses`` tensor is stored at its own precision or the default
dtype, whichever is wider, so ``FAMO(m, min_losses=x64).double()`` keeps ``L*`` exact.

Policy for ``L_t ≤ L*_t``: FAMO takes ``log(L_t − L*_t + 1e-8)``; at or below the minimum that
is ``log`` of (almost) nothing or of a negative number, which puts all the weight on that task
or gives NaN, and drives the logits the wrong way. So a loss with ``L_t ≤ L*_t`` (in
:meth:`objectives` or :meth:`update`) is a ``ValueError`` naming the task: set ``min_losses``
below what the loss can reach. The check is one host sync per call.

Missing tasks: a step without some tasks' losses is refused (``ValueError``, before anything
changes): ``z`` is a softmax over every task's logit and the logit step is one Adam step, with
one step count, on every task's loss decrease; neither is defined for a subset.

Scale: the paper's weights ``c z_t / D_t`` sum to 1 (``reduction="mean"``). ``reduction="sum"``
(default) multiplies the objectives by ``m``: at the start (``z`` uniform) and with equal
losses every weight is 1, as with ``Σ_t L_t``. The logit update does not depend on it.

Defaults: ``γ = 1e-3`` (paper/LibMTL for NYUv2, CelebA, QM9; 1e-2 for Cityscapes and the
standalone ``famo.py``). The reference trainers also clip the shared gradient norm to 1.0.

Example:
    >>> import torch
    >>> famo = FAMO(2)
    >>> out = famo.objectives(torch.tensor([1.0, 4.0]), LossContext())
    >>> out.weights  # c z_t / D_t · m with z uniform: ∝ 1/L_t
    tensor([1.6000, 0.4000])
    >>> famo.update(torch.tensor([0.5, 3.9]))  # task 0 improved most
    >>> bool(famo.task_weights()[0] < famo.task_weights()[1])
    True
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlbal.step import Need
from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["FAMO", "famo_logit_grad", "famo_objectives"]


def famo_objectives(
    losses: Tensor, logits: Tensor, min_losses: Tensor | float = 0.0, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """``(c z_t log D_t, c z_t / D_t)`` for each task (``[m]`` each, mean scale)."""
    z = torch.softmax(logits, dim=0)
    d = losses - min_losses + eps
    c = (z / d).sum().detach().reciprocal()
    return c * z * d.log(), (c * z / d).detach()


def famo_logit_grad(
    logits: Tensor,
    before: Tensor,
    after: Tensor,
    min_losses: Tensor | float = 0.0,
    eps: float = 1e-8,
) -> Tensor:
    """``J_softmax(ξ)ᵀ δ`` with ``δ = log D(before) − log D(after)`` (``[m]``)."""
    delta = (before - min_losses + eps).log() - (after - min_losses + eps).log()
    z = torch.softmax(logits, dim=0)
    return z * (delta - (z * delta).sum())


class FAMO(LossWeighting):
    """Fast adaptive multitask optimisation (loss-level, O(1) per step).

    Args:
        num_tasks: ``m``.
        lr: Adam learning rate of the logits (0.025).
        weight_decay: ``γ``, coupled L2 on the logits (1e-3).
        min_losses: ``L*`` (``[m]`` or a float; 0).
        betas, adam_eps: Adam's (0.9, 0.999) and 1e-8.
        reduction: ``"sum"`` (``m×`` the paper's objective, default) or ``"mean"``.
    """

    needs = frozenset({Need.LOSSES_AFTER_STEP})
    supports_missing_tasks = False
    missing_tasks_note = (
        "FAMO's weights are a softmax over every task's logit and its logit step is one Adam "
        "step (one shared step count) on the loss decrease of every task; neither is defined "
        "for a subset of the tasks. Give every task a loss in every step"
    )

    logits: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    adam_step: Tensor
    prev_losses: Tensor | None
    min_losses: Tensor
    num_tasks: int

    def __init__(
        self,
        num_tasks: int,
        *,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        min_losses: Tensor | float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        reduction: Literal["sum", "mean"] = "sum",
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay ≥ 0, got {lr}, {weight_decay}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.num_tasks = num_tasks
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = float(adam_eps)
        self.reduction: Literal["sum", "mean"] = reduction
        given = torch.as_tensor(min_losses)
        dtype = torch.get_default_dtype()
        if given.is_floating_point():
            dtype = torch.promote_types(given.dtype, dtype)
        mins = given.detach().to(dtype=dtype, device="cpu").expand(num_tasks).clone()
        self.register_buffer("min_losses", mins, persistent=False)
        self.add_state("logits", torch.zeros(num_tasks))
        self.add_state("exp_avg", torch.zeros(num_tasks))
        self.add_state("exp_avg_sq", torch.zeros(num_tasks))
        self.add_state("adam_step", torch.zeros((), dtype=torch.float64))
        self.add_state("prev_losses", None)

    def hparams(self) -> dict[str, object]:
        mins = [float(v) for v in self.min_losses.tolist()]
        return {
            "num_tasks": self.num_tasks,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "min_losses": mins[0] if len(set(mins)) == 1 else mins,
            "betas": self.betas,
            "adam_eps": self.adam_eps,
            "reduction": self.reduction,
        }

    def _mult(self) -> float:
        return float(self.num_tasks) if self.reduction == "sum" else 1.0

    def task_weights(self) -> Tensor:
        """``z = softmax(ξ)`` (``[m]``)."""
        return torch.softmax(self.logits, dim=0)

    def _check(self, losses: Tensor, mins: Tensor, tasks: tuple[str, ...] | None) -> None:
        above = losses.detach() > mins
        if bool(above.all()):
            return
        i = int((~above).nonzero()[0, 0])
        name = repr(tasks[i]) if tasks is not None and i < len(tasks) else str(i)
        raise ValueError(
            f"FAMO takes log(L − L*) and needs every loss above its min_losses L*: task {name} "
            f"has L = {float(losses[i])!r} ≤ L* = {float(mins[i])!r}; set min_losses lower"
        )

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        logits = self.logits.to(device=losses.device, dtype=losses.dtype)
        mins = self.min_losses.to(device=losses.device, dtype=losses.dtype)
        obj, w = famo_objectives(losses, logits, mins)
        self.prev_losses = losses.detach().clone()
        k = self._mult()
        # checked by the Balancer in its one host sync (no read here)
        ok = losses.detach() > mins
        what = (
            "FAMO takes log(L − L*) and needs every loss above its min_losses L* = "
            f"{self.hparams()['min_losses']!r}; set min_losses lower"
        )
        return WeightedLosses(obj * k, w * k, domain=(ok, what))

    def current_weights(self, losses: Tensor) -> Tensor:
        logits = self.logits.to(device=losses.device, dtype=losses.dtype)
        mins = self.min_losses.to(device=losses.device, dtype=losses.dtype)
        return famo_objectives(losses.detach(), logits, mins)[1] * self._mult()

    def update(self, losses: Tensor) -> None:
        """One Adam step on the logits from the losses re-evaluated after the network's step
        (same batch as the last :meth:`objectives`)."""
        if self.prev_losses is None:
            raise ValueError(
                "FAMO.update() needs the losses of a previous backward: call "
                "balancer.backward(losses) and optimizer.step() first"
            )
        after = losses.detach().to(device=self.logits.device, dtype=self.logits.dtype).reshape(-1)
        if after.shape != self.logits.shape:
            raise ValueError(f"FAMO has {self.num_tasks} tasks, got {after.shape[0]} losses")
        before = self.prev_losses.to(device=self.logits.device, dtype=self.logits.dtype)
        mins = self.min_losses.to(device=self.logits.device, dtype=self.logits.dtype)
        self._check(after, mins, None)
        grad = famo_logit_grad(self.logits, before, after, mins)
        self._adam(grad)

    def _adam(self, grad: Tensor) -> None:
        b1, b2 = self.betas
        step = self.adam_step + 1
        if self.weight_decay != 0:
            grad = grad + self.weight_decay * self.logits
        exp_avg = self.exp_avg.lerp(grad, 1 - b1)
        exp_avg_sq = self.exp_avg_sq * b2 + (1 - b2) * grad * grad
        bc1 = 1 - b1**step
        bc2_sqrt = (1 - b2**step).sqrt()
        denom = exp_avg_sq.sqrt() / bc2_sqrt + self.adam_eps
        self.logits = self.logits - (self.lr / bc1) * exp_avg / denom
        self.exp_avg, self.exp_avg_sq, self.adam_step = exp_avg, exp_avg_sq, step
