"""Gradient accumulation: one balanced step over several micro-batches.

A window of ``K`` micro-batches (mean losses ``L^(k)`` on equal-sized parts of one large batch)
stands for the large batch, whose losses are ``L̄ = (1/K) Σ_k L^(k)`` and whose per-task
gradients are ``∇L̄_t = (1/K) Σ_k ∇L_t^(k)``. The balanced update of the large batch is a function
of those two (and of the strategies' state), so the window keeps their running sums and solves
once, when it closes. Three modes, fixed by the configuration:

``"linear"``
    No per-task gradient is needed and the weighting is *linear in the losses*
    (``ℓ_t = c_t·L_t + aux`` with ``c`` and ``aux`` independent of the current losses' values:
    :attr:`~mtlbal.weighting.base.LossWeighting.linear_in_losses`). Then
    ``∇(Σℓ + aux)`` of the large batch is ``(1/K) Σ_k ∇(Σ_t c_t L_t^(k) + aux)``: one backward
    per micro-batch, as plain accumulation costs. The strategies are called on every micro-batch
    with the state they have at the window's start (restored after each non-final call), so a
    random weighting draws once per optimizer step.
``"jacobian"``
    Everything else at the parameters (a gradient method, or a weighting that is not linear in
    the losses: FAMO's ``log``, IGB, GradNorm's gradient norms). The window sums the per-task
    gradients ``∇L_t^(k)`` of every parameter the losses reach (``[m, *p.shape]`` each) and the
    losses. At the close the weighting runs once on ``L̄`` (a leaf), its loss-space Jacobian
    ``D = ∂ℓ/∂L̄`` (``[m, m]``) maps the gradients to those of the objectives
    (``∇ℓ_t = Σ_s D_ts ∇L̄_s``), and the step proceeds as on one batch. Exact for every
    weighting and aggregator; it costs a batched backward per micro-batch and ``m`` times the
    memory of the gradients reached.
``"cut"``
    A gradient method at a cut point. Per micro-batch: the per-task gradients at the
    representation (the heads' pass), their Gramian — per-sample blocks of different
    micro-batches are disjoint, so the large batch's Gramian is ``Σ_k G^(k) / K²`` — and the
    per-task gradients of the trunk's parameters (one batched backward of the representation
    with the ``m`` per-task cotangents). At the close: weights from ``D Ḡ Dᵀ`` (MGDA-UB,
    Aligned-MTL-UB … on the large batch), written as ``Σ_t (wᵀD)_t ∇_trunk L̄_t``. Exact for
    Gramian-based aggregators; a Jacobian aggregator (PCGrad, GradVac) would need the whole
    window's representation gradients and graph, and is refused.

Nothing of a window is visible before it closes: ``.grad``, the strategies' state and the step
counter change only at the close, which is one transaction like a one-batch step.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from mtlbal import _distributed as dist_util

__all__ = ["AccumulationMode", "Window", "batched_vjp", "flat_all_mean", "per_task_vjp"]

AccumulationMode = Literal["linear", "jacobian", "cut"]


@dataclass
class Window:
    """The running sums of one accumulation window (local to this process)."""

    mode: AccumulationMode
    names: tuple[str, ...]
    all_names: tuple[str, ...] = ()  # every task (a missing-task window lacks some)
    count: int = 0
    loss_sum: Tensor | None = None  # [m], float64, the raw local losses
    # linear: parameter → Σ_k ∇(Σℓ^(k) + aux); jacobian: parameter → Σ_k [m, *p.shape]
    params: dict[int, Tensor] = field(default_factory=dict)
    sums: dict[int, Tensor] = field(default_factory=dict)
    # cut: Σ_k G^(k) of the raw losses' per-task gradients at the representation ([m, m])
    gram_sum: Tensor | None = None
    # the heads' leaves at the cut (everything else reached is the trunk's)
    heads: set[int] = field(default_factory=set)
    # GradNorm at a cut without detach: Σ_k ‖∂L_t^(k)/∂z^(k)‖² ([m])
    norms2_sum: Tensor | None = None
    # the sums that are the window's own tensors (in-place additions are safe)
    _owned: set[int] = field(default_factory=set)
    # weak references to the micro-batches' loss tensors (their graphs are freed)
    spent: list[weakref.ref[Tensor]] = field(default_factory=list)

    def add(
        self,
        losses: Tensor,
        grads: Sequence[tuple[Tensor, Tensor]],
        *,
        gram: Tensor | None = None,
        norms2: Tensor | None = None,
        heads: Sequence[Tensor] = (),
    ) -> None:
        """Add one micro-batch (everything computed: this cannot fail half-way)."""
        x = losses.detach().to(torch.float64)
        self.loss_sum = x if self.loss_sum is None else self.loss_sum + x
        for p, g in grads:
            k = id(p)
            g = g.detach()
            if k in self._owned:
                self.sums[k].add_(g)  # a buffer of the window's own: added in place
            elif k in self.sums:
                self.sums[k] = self.sums[k] + g  # the first micro-batch's may be a view
                self._owned.add(k)
            else:
                self.params[k] = p
                self.sums[k] = g
        if gram is not None:
            g64 = gram.detach().to(torch.float64)
            self.gram_sum = g64 if self.gram_sum is None else self.gram_sum + g64
        if norms2 is not None:
            n64 = norms2.detach().to(torch.float64)
            self.norms2_sum = n64 if self.norms2_sum is None else self.norms2_sum + n64
        self.heads.update(id(h) for h in heads)
        self.count += 1

    def means(self, world: int) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """``L̄`` and the mean gradients over the window (and over the ranks under DDP)."""
        assert self.loss_sum is not None
        k = float(self.count)
        pairs = [(self.params[i], s) for i, s in self.sums.items()]
        tensors = [self.loss_sum] + [s for _, s in pairs]
        if world > 1:
            tensors = flat_all_mean(tensors)
        losses = tensors[0] / k
        return losses, [(p, s / k) for (p, _), s in zip(pairs, tensors[1:])]

    def gram_mean(self, world: int) -> Tensor:
        """``Σ_k G^(k) / K²``; under DDP the per-sample blocks of the ranks are disjoint too:
        ``Σ_r Σ_k G_r^(k) / (K·world)²``."""
        assert self.gram_sum is not None
        g = self.gram_sum.clone()
        if world > 1:
            torch.distributed.all_reduce(g)
        return g / float(self.count * world) ** 2

    def norms(self, world: int) -> Tensor:
        """``‖∂L̄_t/∂z‖`` over the window's (and ranks') disjoint per-sample blocks."""
        assert self.norms2_sum is not None
        n2 = self.norms2_sum.clone()
        if world > 1:
            torch.distributed.all_reduce(n2)
        return (n2 / float(self.count * world) ** 2).sqrt()


def flat_all_mean(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The rank means of several tensors in one all_reduce (grouped by dtype and device)."""
    out: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for idx in groups.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        mean = dist_util.all_mean(flat)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = mean[offset : offset + n].view_as(tensors[i])
            offset += n
    return [t for t in out if t is not None]


def batched_vjp(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    cotangents: Sequence[Tensor],
    m: int,
    retain_graph: bool = True,
) -> list[Tensor]:
    """``[m, *x.shape]``: for each task ``t``, the VJP of ``outputs`` with ``cotangents[k][t]``
    w.r.t. each ``x`` of ``inputs``, in one batched backward. Inputs not reached get zeros."""
    grads = torch.autograd.grad(
        list(outputs),
        list(inputs),
        grad_outputs=list(cotangents),
        is_grads_batched=True,
        retain_graph=retain_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    return [
        g if g.dim() == x.dim() + 1 and g.shape[0] == m else g.expand(m, *x.shape)
        for g, x in zip(grads, inputs)
    ]


def per_task_vjp(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: Sequence[Tensor], m: int
) -> list[Tensor]:
    """What :func:`batched_vjp` returns, one backward per task (graphs that cannot be
    batched, e.g. a ``torch.compile``'d trunk)."""
    rows = [
        torch.autograd.grad(
            list(outputs),
            list(inputs),
            grad_outputs=[c[t] for c in cotangents],
            retain_graph=t < m - 1,
            allow_unused=True,
            materialize_grads=True,
        )
        for t in range(m)
    ]
    return [torch.stack([r[i] for r in rows]) for i in range(len(inputs))]
