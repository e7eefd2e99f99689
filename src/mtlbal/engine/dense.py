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

from mtlbal.engine.base import PerTaskGrads, accumulate_grad, gramian_of

__all__ = [
    "CutPerTaskGrads",
    "DensePerTaskGrads",
    "batched_grads",
    "split_task_grads",
    "task_grad_norms",
]


def batched_grads(
    objectives: Tensor,
    inputs: Sequence[Tensor],
    *,
    chunk_size: int | None = None,
    retain_graph: bool = False,
) -> list[Tensor]:
    """``[m, *x.shape]`` gradients of each ``objectives[t]`` w.r.t. each ``x`` in ``inputs``.

    Inputs that a task does not reach get zeros (never ``None``).
    """
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


def split_task_grads(
    objectives: Tensor,
    stacked: Tensor,
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
) -> list[Tensor]:
    """``[m, *x.shape]`` gradients of ``objectives`` w.r.t. ``inputs``, one task at a time.

    ``objectives`` (``ℓ``, ``[m]``) must depend on the network only through
    ``stacked = torch.stack(losses)``. With ``C = ∂ℓ/∂L`` (``[m, m]``, from a tiny batched
    backward through the weighting), ``∂ℓ_t/∂x = Σ_s C_ts ∂L_s/∂x``, and each ``∂L_s/∂x`` is
    taken from the scalar ``L_s`` itself, so autograd visits only task ``s``'s own head: the
    heads cost one pass in total instead of the ``m`` passes (mostly with zero cotangents) of a
    batched backward from the stacked vector.
    """
    (c,) = batched_grads(objectives, [stacked], retain_graph=True)  # [m, m]
    rows = [
        torch.autograd.grad(
            loss, list(inputs), retain_graph=True, allow_unused=True, materialize_grads=True
        )
        for loss in losses
    ]
    out = []
    for k in range(len(inputs)):
        per_loss = torch.stack([r[k] for r in rows])  # [m, *x.shape], ∂L_s/∂x
        out.append(torch.tensordot(c.to(per_loss.dtype), per_loss, dims=1))
    return out


def task_grad_norms(losses: Sequence[Tensor], inputs: Sequence[Tensor]) -> Tensor:
    """``[m]`` norms ``‖∂L_t/∂inputs‖``, one task at a time (each visits its own head only)."""
    norms = []
    for loss in losses:
        gs = torch.autograd.grad(
            loss, list(inputs), retain_graph=True, allow_unused=True, materialize_grads=True
        )
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in gs)))  # type: ignore[arg-type]
    return torch.stack(norms)


class DensePerTaskGrads(PerTaskGrads):
    """Per-task gradients kept as one ``[m, *p.shape]`` tensor per shared parameter."""

    def __init__(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        *,
        combined_transform: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.params = list(params)
        self.grads = list(grads)
        self.m = int(self.grads[0].shape[0]) if self.grads else 0
        self._gramian: Tensor | None = None
        self._combined_transform = combined_transform

    def gramian(self) -> Tensor:
        if self._gramian is None:
            self._gramian = gramian_of(self.grads, self.m)
        return self._gramian

    def jacobian(self) -> Tensor:
        return torch.cat([jp.reshape(self.m, -1) for jp in self.grads], dim=1)

    def apply_weights(self, w: Tensor) -> None:
        for p, jp in zip(self.params, self.grads):
            g = torch.tensordot(w.to(jp.dtype), jp, dims=1)
            if self._combined_transform is not None:
                g = self._combined_transform(p, g)
            accumulate_grad(p, g)

    def apply_direction(self, g: Tensor) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            gp = g[offset : offset + n].view_as(p)
            if self._combined_transform is not None:
                gp = self._combined_transform(p, gp)
            accumulate_grad(p, gp)
            offset += n


class CutPerTaskGrads(PerTaskGrads):
    """Per-task gradients of the shared representation(s) captured at a cut point.

    ``outputs[k]`` is the k-th captured output of the cut module (still attached to the trunk)
    and ``grads[k]`` its ``[m, *shape]`` per-task gradient. Applying a combination runs one
    backward through the trunk.
    """

    def __init__(
        self,
        outputs: Sequence[Tensor],
        grads: Sequence[Tensor],
        *,
        extra_roots: Sequence[Tensor] = (),
    ) -> None:
        self.outputs = list(outputs)
        self.grads = list(grads)
        # scalars backpropagated (with gradient 1) in the same backward call as the cut
        self.extra_roots = list(extra_roots)
        self.m = int(self.grads[0].shape[0])
        self._gramian: Tensor | None = None

    def gramian(self) -> Tensor:
        if self._gramian is None:
            self._gramian = gramian_of(self.grads, self.m)
        return self._gramian

    def jacobian(self) -> Tensor:
        return torch.cat([z.reshape(self.m, -1) for z in self.grads], dim=1)

    def apply_weights(self, w: Tensor) -> None:
        cot = [torch.tensordot(w.to(z.dtype), z, dims=1) for z in self.grads]
        self._backward(cot)

    def apply_direction(self, g: Tensor) -> None:
        cot = []
        offset = 0
        for z in self.outputs:
            n = z.numel()
            cot.append(g[offset : offset + n].view_as(z).to(z.dtype))
            offset += n
        self._backward(cot)

    def _backward(self, cot: list[Tensor]) -> None:
        roots = self.outputs + self.extra_roots
        grads: list[Tensor | None] = [*cot, *[None] * len(self.extra_roots)]
        torch.autograd.backward(roots, grads)
