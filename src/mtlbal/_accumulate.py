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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from mtlbal import _distributed as dist_util
from mtlbal._graph import reachable
from mtlbal.engine.base import GradWrites, PerTaskGrads, gramian_dtype, gramian_of
from mtlbal.engine.dense import DensePerTaskGrads, batched_grads, task_grad_norms
from mtlbal.step import Need, StepInfo

if TYPE_CHECKING:
    from mtlbal.balancer import Balancer, _Step

__all__ = [
    "AccumulationMode",
    "Window",
    "WindowCutGrads",
    "batched_vjp",
    "close",
    "flat_all_mean",
    "micro_batch",
    "per_task_vjp",
]

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


class WindowCutGrads(PerTaskGrads):
    """An accumulation window's per-task gradients at a cut point: the Gramian of the
    objectives at the representation (``D Ḡ Dᵀ``) and the mean per-task gradients of the
    trunk's parameters ``∇_trunk L̄_s``; weights ``w`` are written as ``Σ_s (wᵀD)_s ∇L̄_s``."""

    def __init__(
        self,
        trunk: list[tuple[Tensor, Tensor]],
        d: Tensor,
        gram: Tensor,
        combined: Callable[[Tensor, Tensor], Tensor],
    ) -> None:
        self.trunk = trunk
        self.d = d
        self._gram = gram
        self.combined = combined
        self.m = int(d.shape[0])

    def gramian(self) -> Tensor:
        return self._gram

    def jacobian(self) -> Tensor:
        raise NotImplementedError("an accumulation window at a cut point keeps no Jacobian")

    def write_weights(self, w: Tensor, writes: GradWrites) -> None:
        v = w.to(self.d.dtype) @ self.d
        for p, g in self.trunk:
            writes.add(p, self.combined(p, torch.tensordot(v.to(g.dtype), g, dims=1)))

    def write_direction(self, g: Tensor, writes: GradWrites) -> None:
        raise NotImplementedError("an accumulation window at a cut point keeps no Jacobian")


def micro_batch(
    bal: Balancer, step: _Step, window: Window, scaler: Any | None
) -> tuple[dict[str, Any], Any]:
    """One micro-batch's contribution to the window (nothing stored here)."""
    scale = None
    if scaler is not None:
        scale = scaler.scale(torch.ones((), device=step.raw.device, dtype=torch.float32))
    if window.mode == "linear":
        stacked, ctx = bal._context(step)
        weighted = bal.weighting.objectives(stacked, ctx)
        if weighted.param_grads or weighted.domain is not None:
            raise RuntimeError(
                f"{type(bal.weighting).__name__} declares linear_in_losses but returned "
                "parameter gradients or a loss domain: it is not linear in the losses"
            )
        total = weighted.objectives.sum()
        if weighted.aux is not None:
            total = total + weighted.aux
        if scale is not None:
            total = total * scale.to(total.dtype)
        leaves, _ = reachable([total], set())
        grads = torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)
        return {"grads": list(zip(leaves, grads))}, weighted
    values = step.values
    stacked = step.stacked
    if scale is not None:
        values = [v * scale.to(v.dtype) for v in values]
        stacked = torch.stack(values)
    if window.mode == "jacobian":
        norms2 = None
        if Need.LAYER_NORMS in bal.weighting.needs and bal._cut is not None:
            zs = [z for z, _ in step.captured]
            norms2 = task_grad_norms(step.values, zs).pow(2)
        leaves, _ = reachable([stacked], set())
        per_task = batched_grads(
            stacked, leaves, chunk_size=bal.chunk_size, mode=bal._batched_backward
        )
        return {"grads": list(zip(leaves, per_task)), "norms2": norms2}, None
    # "cut": per-task gradients at the representation (each loss visits its own head),
    # their Gramian, and the per-task gradients of the trunk
    outs = [z for z, _ in step.captured]
    cut_leaves = [leaf for _, leaf in step.captured]
    cut_ids = {id(x) for x in cut_leaves}
    reached, _ = reachable([stacked], set())
    heads = [q for q in reached if id(q) not in cut_ids]
    rows = [
        torch.autograd.grad(
            v,
            cut_leaves + heads,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        for v in values
    ]
    per_input = [torch.stack([r[i] for r in rows]) for i in range(len(cut_leaves) + len(heads))]
    z_grads = per_input[: len(cut_leaves)]
    m = len(values)
    gram = gramian_of(z_grads, m)
    trunk, _ = reachable(outs, set())
    trunk_grads: list[Tensor] = []
    if trunk:
        trunk_grads = bal._batched_backward.run(
            lambda retain: batched_vjp(outs, trunk, z_grads, m, retain),
            lambda: per_task_vjp(outs, trunk, z_grads, m),
            False,
        )
    pairs = list(zip(heads, per_input[len(cut_leaves) :])) + list(zip(trunk, trunk_grads))
    return {"grads": pairs, "gram": gram, "heads": heads}, None


def close(
    bal: Balancer, step: _Step, window: Window, weighted: Any, scaler: Any | None
) -> StepInfo:
    """Solve once over the window and stage the writes (stages 2–4 on the large batch)."""
    world = step.world
    checking = bal.nonfinite != "off" or scaler is not None
    mean64, pairs = window.means(world)
    raw = mean64.to(step.raw.dtype)
    step.raw = raw
    scale = None
    if scaler is not None:
        scale = scaler.scale(torch.ones((), device=raw.device, dtype=torch.float32))
        step.scale = scale
    _, ctx = bal._context(step)
    if window.mode == "linear":
        # under DDP every micro-batch's losses were checked when the ranks agreed on them
        if checking and world == 1 and not bool(torch.isfinite(raw).all()):  # the one sync
            bal._refuse(step, None)
        for p, g in pairs:
            step.writes.add(p, bal._combined(p, g))
        info = StepInfo(step.names, raw, weighted.weights.detach(), weighted.weights.detach())
        info.micro_batches = window.count
        return info
    inv = None if scale is None else 1.0 / scale
    if Need.LAYER_NORMS in bal.weighting.needs:
        if window.mode == "cut":
            diag = window.gram_mean(world).diagonal()
            norms = diag.sqrt() if inv is None else diag.sqrt() * inv.to(diag.dtype)
        elif bal._cut is not None:
            norms = window.norms(world)
        else:
            wanted = {id(q) for q in bal.weighting.grad_norm_params()}
            sq = [g.reshape(g.shape[0], -1).pow(2).sum(1) for p, g in pairs if id(p) in wanted]
            norms = torch.stack(sq).sum(0).sqrt() if sq else torch.zeros_like(raw)
            if inv is not None:
                norms = norms * inv.to(norms.dtype)
        ctx.layer_grad_norms = norms.to(raw.dtype).detach()
    leaf = raw.detach().clone().requires_grad_(True)
    weighted = bal.weighting.objectives(leaf, ctx)
    objectives = weighted.objectives
    m = len(step.names)
    d = torch.stack(
        [
            torch.autograd.grad(
                objectives[t],
                leaf,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )[0]
            for t in range(m)
        ]
    ).detach()  # D[t, s] = ∂ℓ_t/∂L̄_s
    total = objectives.sum() if weighted.aux is None else objectives.sum() + weighted.aux
    own = [q for q in bal.parameters() if q.requires_grad]
    if own:
        own_grads = torch.autograd.grad(total, own, allow_unused=True)
        for q_p, g_p in zip(own, own_grads):
            if g_p is not None:
                step.writes.add(q_p, g_p if scale is None else g_p * scale.to(g_p.dtype))
    for q_own, g_own in weighted.param_grads:
        step.writes.add(q_own, g_own)
    info = StepInfo(step.names, raw, weighted.weights.detach(), weighted.weights.detach())
    info.micro_batches = window.count
    domain = weighted.domain if checking else None
    ones = torch.ones(m, dtype=d.dtype, device=d.device)
    grads: PerTaskGrads | None = None
    if window.mode == "cut":
        trunk = [(p, g) for p, g in pairs if id(p) not in window.heads]
        for q, g in pairs:
            if id(q) in window.heads:
                step.writes.add(q, torch.tensordot((ones @ d).to(g.dtype), g, dims=1))
        d64 = d.to(torch.float64)  # the Gramian sums are kept in float64
        gram_l = d64 @ window.gram_mean(world) @ d64.T
        grads = WindowCutGrads(trunk, d64, gram_l, bal._combined)
    else:
        per_task = [(p, torch.tensordot(d.to(g.dtype), g, dims=1)) for p, g in pairs]
        if bal._needs_grads:
            # the Jacobian's columns in the shared parameters' order, as the engines give
            # them (a per-coordinate random method, GradDrop, depends on the layout)
            rank = {id(p): i for i, p in enumerate(bal.shared_params)}
            shared = sorted(
                ((p, g) for p, g in per_task if id(p) in bal._shared_ids),
                key=lambda pg: rank[id(pg[0])],
            )
            for q, g in per_task:
                if id(q) not in bal._shared_ids:
                    step.writes.add(q, g.sum(0))
            grads = DensePerTaskGrads(
                [p for p, _ in shared],
                [bal._per_task_transforms(p, g) for p, g in shared],
            )
        else:
            for p, g in per_task:
                step.writes.add(p, bal._combined(p, g.sum(0)))
    # as a one-batch step: under DDP the losses were checked when the ranks agreed on them
    if grads is None:
        if (checking and world == 1) or domain is not None:
            ok = torch.isfinite(raw).all()
            if domain is not None:
                ok = ok & domain[0].all()
            if not bool(ok):  # the one host sync
                bal._refuse(step, domain)
        return info
    gram = grads.gramian()
    if checking:
        finite = torch.isfinite(gram.diagonal()).all()
        if world == 1:
            finite = finite & torch.isfinite(raw).all()
        if domain is not None:
            finite = finite & domain[0].all()
        if not bool(finite):  # the one host sync
            bal._refuse(step, domain)
            return bal._nonfinite_grads(step, grads, gram, info, scaler)
    unscaled = gram if scale is None else gram / (scale.to(gram.dtype) ** 2)
    # reported in the dtype a one-batch step reports (the solve below takes float64)
    info.gramian = unscaled.detach().to(gramian_dtype(raw.dtype))
    bal._aggregate(step, grads, unscaled, info, ctx)
    return info
