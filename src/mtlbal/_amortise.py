"""Amortised balancing: solve every ``k`` steps, reuse the weights in between.

A Gramian aggregator's update is ``Jᵀ w`` (``J`` ``[m, n]`` the per-task gradients of the
objectives ``ℓ`` at the shared part, ``w`` ``[m]`` its weights). Forming ``J`` (or ``G = J Jᵀ``)
is the cost of a gradient method; the solve itself is an ``m × m`` problem. With
``Balancer(solve_every=k)`` a step is either

* a **solve step** (the first step, then every ``k``-th committed step after the last solve,
  and any step whose task set differs from the one the stored weights were solved for): exactly
  the step of ``solve_every=1`` — per-task gradients, Gramian, solve — and its weights ``w`` are
  stored (with the task names they belong to); or
* a **reuse step**: no per-task gradient, no Gramian, no solve. The shared part receives
  ``Σ_t w_t ∇ℓ_t`` with the stored ``w`` from ONE ordinary backward of ``Σ_t w_t ℓ_t``, and
  every other parameter the losses reach (the heads, a strategy's own parameters) receives
  ``Σ_t ∇ℓ_t`` as on a solve step: the part ``Σ_t (1 − w_t) ∇ℓ_t`` the weighted backward leaves
  out is added from one extra pass restricted to those parameters (through the heads only; at a
  cut point the heads run twice, as on a solve step). So a step costs ``≈ 1 + (c − 1)/k`` plain
  steps on average, ``c`` the cost of a solve step — the reuse of Nash-MTL's
  ``update_weights_every`` and of PSMGD (Periodic Stochastic MGD, Xiao et al., 2024,
  arXiv:2402.07929).

The loss weighting still runs on every step (it is loss-level: its cost is that of the losses),
so ``ℓ`` is the current step's; only the gradient-level weights are reused. The aggregator's
state (Nash-MTL's warm start, GradVac's targets, a random generator) advances on solve steps
only: a reuse step does not call it.

Valid for gradient methods whose update is a weighted combination of the task gradients with
the weights reported: every :class:`~mtlbal.aggregation.GramianAggregator` (UPGrad, MGDA,
Nash-MTL, CAGrad, IMTL-G, Aligned-MTL, FairGrad, PCGrad and GradVac, whose projections are
combinations of the original gradients, …). A Jacobian aggregator (GradDrop, ConFIG, MoCo,
DB-MTL, ExcessMTL, TrimmedMean, M-ConFIG) gives a direction that is not ``Jᵀ w`` and is refused,
as are gradient transforms (they change the per-task gradients before the weights apply),
gradient accumulation and modality branches.

Reuse steps check the losses (and a weighting's domain) for non-finite values, as a loss-level
step does; the gradients are not checked (no Gramian is formed). Under DDP the ranks share the
step counter, the task set and the solved weights, so every rank solves on the same steps; a
reuse step's weighted backward runs through DDP's reducer like a plain step (the heads'
correction is averaged over the ranks). Resuming: the stored weights, their task names and the
step of the last solve are in the Balancer's ``state_dict`` (key ``"amortise"``).

Example:
    >>> import torch, mtlbal
    >>> trunk = torch.nn.Linear(3, 4)
    >>> heads = torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in range(2)])
    >>> b = mtlbal.Balancer(trunk, aggregator=mtlbal.aggregation.UPGrad(), solve_every=10)
    >>> reused = []
    >>> for _ in range(3):
    ...     z = trunk(torch.randn(8, 3))
    ...     info = b.backward([heads[0](z).pow(2).mean(), heads[1](z).abs().mean()])
    ...     reused.append(info.reused)
    >>> reused
    [False, True, True]
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mtlbal import _distributed as dist_util
from mtlbal._graph import reachable
from mtlbal.aggregation.base import Aggregator, GramianAggregator
from mtlbal.step import StepInfo

if TYPE_CHECKING:
    from mtlbal.balancer import _Step

__all__ = ["Amortiser", "check_solve_every"]


def check_solve_every(
    solve_every: Any,
    *,
    aggregator: Aggregator | None,
    transforms: list[Any],
    accumulate: int,
    branches: object | None,
) -> None:
    """Refuse ``solve_every`` where reusing weights is not defined (see the module docstring)."""
    if isinstance(solve_every, bool) or not isinstance(solve_every, int) or solve_every < 1:
        raise ValueError(f"solve_every must be a positive int, got {solve_every!r}")
    if solve_every == 1:
        return
    if aggregator is None:
        raise ValueError(
            "solve_every > 1 reuses a gradient method's weights between solves: it needs a "
            "Gramian aggregator (aggregator=...), and without one there is nothing to amortise"
        )
    if not isinstance(aggregator, GramianAggregator):
        raise ValueError(
            f"solve_every > 1 needs an update that is a weighted combination of the task "
            f"gradients (a GramianAggregator, weights reported): {type(aggregator).__name__} "
            "gives a direction from the whole Jacobian, so there are no weights to reuse"
        )
    if transforms:
        raise ValueError(
            "solve_every > 1 with gradient transforms: a transform changes the per-task "
            "gradients before the weights apply, so reusing the weights on one plain backward "
            "would not apply it (not supported)"
        )
    if accumulate > 1:
        raise ValueError(
            "solve_every > 1 with gradient accumulation is not supported: use one or the other"
        )
    if branches is not None:
        raise ValueError("solve_every > 1 with modality branches (FULLER) is not supported")


class Amortiser:
    """The schedule and the stored weights of ``Balancer(solve_every=k)``."""

    def __init__(self, every: int) -> None:
        self.every = int(every)
        self.weights: Tensor | None = None  # [m] float64, of the last solve
        self.tasks: tuple[str, ...] | None = None  # the task names of those weights
        self.solved_at = 0  # the Balancer's step counter at the last solve

    def due(self, step_count: int, names: tuple[str, ...]) -> bool:
        """Whether the step ``step_count`` (of tasks ``names``) solves."""
        return (
            self.weights is None or self.tasks != names or step_count - self.solved_at >= self.every
        )

    def record(self, step_count: int, names: tuple[str, ...], weights: Tensor) -> None:
        """After a committed solve step (called at the commit)."""
        self.weights = weights.detach().to(torch.float64).clone()
        self.tasks = names
        self.solved_at = step_count

    # ---- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "solve_every": self.every,
            "weights": None if self.weights is None else self.weights.clone(),
            "tasks": None if self.tasks is None else list(self.tasks),
            "solved_at": self.solved_at,
        }

    def check_state(self, state: Any) -> list[str]:
        """The problems of ``state`` (empty: it can be loaded)."""
        if not isinstance(state, Mapping):
            return [f"Balancer: 'amortise' must be a mapping, got {type(state).__name__}"]
        errors = []
        keys = {"solve_every", "weights", "tasks", "solved_at"}
        if set(state) != keys:
            errors.append(
                f"Balancer: 'amortise' must have the keys {sorted(keys)}, got {sorted(state)}"
            )
            return errors
        w, tasks, at = state["weights"], state["tasks"], state["solved_at"]
        if isinstance(at, bool) or not isinstance(at, Integral) or int(at) < 0:
            errors.append(f"Balancer: 'amortise.solved_at' must be an integer ≥ 0, got {at!r}")
        if (w is None) != (tasks is None):
            errors.append("Balancer: 'amortise' has weights without task names, or the reverse")
        elif w is not None:
            if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
                errors.append(f"Balancer: 'amortise.tasks' must be a list of str, got {tasks!r}")
            elif (
                not isinstance(w, Tensor)
                or not w.is_floating_point()
                or tuple(w.shape) != (len(tasks),)
            ):
                errors.append(
                    f"Balancer: 'amortise.weights' must be a floating tensor of shape "
                    f"[{len(tasks)}] (one weight per task of {list(tasks)}), got {w!r}"
                )
        return errors

    def load(self, state: Mapping[str, Any]) -> None:
        """Assign a checked state (the schedule ``solve_every`` is this Balancer's own)."""
        w = state["weights"]
        self.weights = None if w is None else w.detach().to(torch.float64).clone()
        self.tasks = None if state["tasks"] is None else tuple(state["tasks"])
        self.solved_at = int(state["solved_at"])


def reuse_step(
    step: _Step,
    info: StepInfo,
    weights: Tensor,
    objectives: Tensor,
    aux: Tensor | None,
    shared_ids: set[int],
) -> None:
    """Stage a reuse step's writes: ``Σ_t w_t ∇ℓ_t`` for the shared part, ``Σ_t ∇ℓ_t`` (and
    the auxiliary term's gradient) for everything else the losses reach."""
    w = weights.to(device=objectives.device, dtype=objectives.dtype)
    weighted = (w * objectives).sum()
    rest = ((1 - w) * objectives).sum()
    if step.captured:  # a cut point: the shared part is behind the detached leaves
        outs = [z for z, _ in step.captured]
        leaves = [leaf for _, leaf in step.captured]
        # Σ w_t ∂ℓ_t/∂z through the heads (no parameter's .grad is touched), then ONE backward
        # that runs the heads with Σ ℓ_t (+ aux) and the trunk with that cotangent
        gz = torch.autograd.grad(
            weighted, leaves, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        total = objectives.sum() if aux is None else objectives.sum() + aux
        step.writes.backward([total, *outs], [None, *gz])
    else:
        roots = [objectives] if aux is None else [objectives, aux]
        leaves_all, _ = reachable(roots, set())
        others = [q for q in leaves_all if id(q) not in shared_ids]
        if others:
            # the heads (and strategy parameters) get Σ_t ∇ℓ_t as on a solve step: add the
            # Σ (1 − w_t) ∇ℓ_t that the weighted backward leaves out (a pass through them only)
            got = torch.autograd.grad(
                rest, others, retain_graph=True, allow_unused=True, materialize_grads=True
            )
            for q, g in zip(others, got):
                if step.world > 1:
                    # DDP averages the weighted backward's share of a model parameter: this
                    # share too (a strategy's parameter sees the global losses: equal on every
                    # rank, its mean is itself)
                    g = dist_util.all_mean(g)
                step.writes.add(q, g)
        total = weighted if aux is None else weighted + aux
        step.writes.backward([total], [None])
    info.grad_weights = weights.detach().to(info.loss_weights.dtype)
    info.weights = info.grad_weights * info.loss_weights
    info.reused = True
