"""What a step gives the strategies and what it reports.

* :class:`Need` — what a strategy declares it needs (its ``needs`` attribute); the Balancer
  computes exactly the union of what its strategies declared.
* :class:`StepContext` — the one object a strategy receives with the step's facts.
* :class:`StepInfo` — what one :meth:`mtlbal.Balancer.backward` did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor

__all__ = ["Need", "StepContext", "StepInfo", "gramian_stats"]


class Need(str, Enum):
    """What a strategy needs from the step, declared in its ``needs`` (a frozenset).

    ``GRAMIAN``: per-task gradients of the shared part and their Gramian (every gradient-level
    method; transforms whose effect is per task). ``LOSSES``: the step's raw losses in the
    solver (MGDA's loss normalisation). ``LAYER_NORMS``: ``‖∇_W L_t‖`` over the strategy's
    ``grad_norm_params`` (GradNorm). ``LR_FACTOR``: ``lr_0 / lr_now`` of the optimizer (IGB
    v2). ``EPOCHS``: epoch boundaries (``epoch_end``: DWA, IGB). ``LOSSES_AFTER_STEP``: the
    losses re-evaluated on the same batch after the optimizer step (``Balancer.update``: FAMO).
    ``CLOSURE``: a function that re-runs the forward on the step's batch and returns the losses
    again (``backward(losses, closure=...)``: F-MTL's perturbed passes); a step without one is
    refused. ``SALIENCY``: the per-task gradients at the cut point taken with their graph
    (second order), for a regulariser of the task saliencies (Rep-MTL).
    ``VALIDATION``: per-task validation losses, fed with ``Balancer.observe_validation`` (or
    the wrapper's, or the Lightning / Hugging Face integrations' validation loops): CoBa.
    """

    GRAMIAN = "gramian"
    LOSSES = "losses"
    LAYER_NORMS = "layer_norms"
    LR_FACTOR = "lr_factor"
    EPOCHS = "epochs"
    LOSSES_AFTER_STEP = "losses_after_step"
    CLOSURE = "closure"
    SALIENCY = "saliency"
    VALIDATION = "validation"


@dataclass
class StepContext:
    """The facts of one step, handed to every strategy (a loss weighting's ``objectives``, a
    Gramian aggregator's ``solve``). Fields a strategy did not declare a need for may be unset.

    Attributes:
        step: index of the step being taken (0 for the first one).
        tasks: the task names of this step (the present ones), in the canonical order.
        losses: ``[m]`` detached raw losses of those tasks (under DDP: the rank mean, the loss
            of the concatenated batch).
        present: ``None`` when every task of the Balancer has a loss in this step; on a
            missing-task step (some tasks without labels), the indices of ``tasks`` in
            ``all_tasks`` (a sorted tuple of ``m' < len(all_tasks)`` ints). Everything else in
            the context (``losses``, ``layer_grad_norms``, the Gramian a solver receives) is
            ``[m']``: of the present tasks only. A strategy with per-task state reads and
            writes the entries ``present`` of it and declares ``supports_missing_tasks = True``.
        all_tasks: every task name of the Balancer, in the canonical order (equal to ``tasks``
            when ``present`` is ``None``).
        layer_grad_norms: ``[m]`` detached norms ``‖∇_W L_t‖`` (``Need.LAYER_NORMS``).
        lr_factor: ``lr_0 / lr_now`` of the optimizer (``Need.LR_FACTOR``; 1.0 when unknown).
        extras: free-form per-step values for user strategies.
    """

    step: int = 0
    tasks: tuple[str, ...] | None = None
    losses: Any = None
    layer_grad_norms: Any = None
    lr_factor: float = 1.0
    extras: dict[str, Any] = field(default_factory=dict)
    present: tuple[int, ...] | None = None
    all_tasks: tuple[str, ...] | None = None

    def num_all_tasks(self, m: int) -> int:
        """The number of tasks of the Balancer: ``len(all_tasks)``, or ``m`` (the losses' count)
        outside a Balancer."""
        return m if self.all_tasks is None else len(self.all_tasks)


@dataclass
class StepInfo:
    """What one :meth:`Balancer.backward` did. Tensors live on the losses' device.

    Attributes:
        tasks: task names (dict keys, or ``"0"``, ``"1"``, … for a sequence) of the tasks
            that had a loss in this step; every per-task field below is in this order.
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
            gradient-conflict incidence). ``grad_norms``, ``cosines`` and ``conflict`` are
            derived from ``gramian`` on first access (no work when unread).
        skipped: ``True`` when the step was skipped: a non-finite loss or gradient under the
            ``nonfinite="skip"`` policy, or a gradient overflow under a ``GradScaler``
            (``extras["overflow"]``), where ``.grad`` holds the plain non-finite gradient so
            that ``scaler.step`` skips and lowers the scale exactly as for a plain step.
        step: the Balancer's step counter after this call.
        pending: ``True`` for a micro-batch kept by an open accumulation window: nothing was
            written (no ``.grad``, no state); ``loss_weights`` and ``weights`` are zeros.
        micro_batches: how many micro-batches the step (or, when ``pending``, the open window
            so far) holds; 1 without gradient accumulation.
        missing: the tasks without a loss in this step (a missing-task step), ``()``
            otherwise. They are not in ``tasks`` and have no entry in any per-task field: no
            weight is reported for them (neither 0 nor NaN), so a logger
            (:func:`mtlbal.logging.info_to_dict`) writes nothing for them.
        engine_paths: where per-task gradients were formed at the parameters: shared
            parameter name → ``"identity"``, ``"per-task"`` or ``"batched"`` (``"batched
            (per-task loop)"`` where that backward ran as ``m`` plain passes; see
            :mod:`mtlbal.engine.report`; ``Balancer.describe()`` says why); ``None`` at a cut
            point and when no per-task gradient was formed.
        reused: ``True`` on a reuse step of amortised balancing (``Balancer(solve_every=k)``,
            :mod:`mtlbal._amortise`): no per-task gradient was formed (``gramian`` is
            ``None``) and ``grad_weights`` are those of the last solve step.
    """

    tasks: tuple[str, ...]
    losses: Tensor
    loss_weights: Tensor
    weights: Tensor
    grad_weights: Tensor | None = None
    gramian: Tensor | None = None
    skipped: bool = False
    step: int = 0
    pending: bool = False
    micro_batches: int = 1
    extras: dict[str, Any] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    engine_paths: dict[str, str] | None = None
    reused: bool = False
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
