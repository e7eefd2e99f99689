"""Dense per-task gradients: batched vector-Jacobian products, chunked over tasks.

One call of ``torch.autograd.grad`` with ``is_grads_batched=True`` backpropagates the ``m``
one-hot cotangents of ``ℓ`` together (a vmap over the backward), giving ``∂ℓ_t/∂p`` for every
input ``p`` as a ``[m, *p.shape]`` tensor. With ``chunk_size`` set, the tasks are taken
``chunk_size`` at a time (the graph is kept between chunks) to bound peak memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mtlbal.engine.base import GradWrites, PerTaskGrads, gramian_of
from mtlbal.engine.fallback import BatchedBackward

__all__ = ["DensePerTaskGrads", "batched_grads", "per_task_grads", "task_grad_norms"]


def batched_grads(
    objectives: Tensor,
    inputs: Sequence[Tensor],
    *,
    chunk_size: int | None = None,
    retain_graph: bool = False,
    mode: BatchedBackward | None = None,
) -> list[Tensor]:
    """``[m, *x.shape]`` gradients of each ``objectives[t]`` w.r.t. each ``x`` in ``inputs``.

    Inputs that a task does not reach get zeros (never ``None``). With ``mode``, a graph the
    batched backward cannot run on (e.g. a ``torch.compile``'d model) is handled by
    :func:`per_task_grads` instead (see :mod:`mtlbal.engine.fallback`).
    """
    if mode is not None:
        return mode.run(
            lambda retain: _batched_grads(objectives, inputs, chunk_size, retain),
            lambda: per_task_grads(objectives, inputs, retain_graph=retain_graph),
            retain_graph,
        )
    return _batched_grads(objectives, inputs, chunk_size, retain_graph)


def per_task_grads(
    objectives: Tensor, inputs: Sequence[Tensor], *, retain_graph: bool = False
) -> list[Tensor]:
    """What :func:`batched_grads` returns, one backward per task (no vmap)."""
    m = objectives.shape[0]
    rows = [
        torch.autograd.grad(
            objectives[t],
            list(inputs),
            retain_graph=retain_graph or t < m - 1,
            allow_unused=True,
            materialize_grads=True,
        )
        for t in range(m)
    ]
    return [torch.stack([r[i] for r in rows]) for i in range(len(inputs))]


def _batched_grads(
    objectives: Tensor,
    inputs: Sequence[Tensor],
    chunk_size: int | None,
    retain_graph: bool,
) -> list[Tensor]:
    m = objectives.shape[0]
    eye = torch.eye(m, dtype=objectives.dtype, device=objectives.device)
    step = m if chunk_size is None or chunk_size >= m else chunk_size
    parts: list[list[Tensor]] = []
    for start in range(0, m, step):
        stop = min(start + step, m)
        last = stop == m
        grads = torch.autograd.grad(
            objectives,
            list(inputs),
            grad_outputs=eye[start:stop],
            is_grads_batched=True,
            retain_graph=retain_graph or not last,
            allow_unused=True,
            materialize_grads=True,
        )
        rows = stop - start
        parts.append(
            [
                g if g.shape[:1] == (rows,) and g.dim() == x.dim() + 1 else g.expand(rows, *x.shape)
                for g, x in zip(grads, inputs)
            ]
        )
    if len(parts) == 1:
        return parts[0]
    return [torch.cat([p[i] for p in parts], dim=0) for i in range(len(inputs))]


def task_grad_norms(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    *,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``[m]`` norms ``‖∂L_t/∂inputs‖``, one task at a time (each visits its own head only).

    ``reduce`` maps the flattened per-task gradients ``[m, n]`` to the global ones before the
    norms are taken (under DDP: the rank average)."""
    rows = []
    norms = []
    for loss in losses:
        gs = torch.autograd.grad(
            loss, list(inputs), retain_graph=True, allow_unused=True, materialize_grads=True
        )
        if reduce is not None:
            rows.append(torch.cat([g.reshape(-1) for g in gs]))
        else:  # no [m, n] copy of the gradients when nothing needs them flattened
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in gs])))
    if reduce is None:
        return torch.stack(norms)
    return reduce(torch.stack(rows)).norm(dim=1)


class DensePerTaskGrads(PerTaskGrads):
    """Per-task gradients kept as one ``[m, *p.shape]`` tensor per shared parameter."""

    def __init__(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.grads = list(grads)
        self.m = int(self.grads[0].shape[0]) if self.grads else 0
        self._gramian: Tensor | None = None

    def gramian(self) -> Tensor:
        if self._gramian is None:
            self._gramian = gramian_of(self.grads, self.m)
        return self._gramian

    def jacobian(self) -> Tensor:
        return torch.cat([jp.reshape(self.m, -1) for jp in self.grads], dim=1)

    def write_weights(self, w: Tensor, writes: GradWrites) -> None:
        for p, jp in zip(self.params, self.grads):
            writes.add(p, torch.tensordot(w.to(jp.dtype), jp, dims=1))

    def write_direction(self, g: Tensor, writes: GradWrites) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            writes.add(p, g[offset : offset + n].view_as(p))
            offset += n
