"""The cut-point engine: per-task gradients of a shared representation.

A *cut point* is a module whose output ``z`` is the representation every task head reads. A
forward hook (:class:`CutPoint`) records ``z``; when per-task gradients are needed there, it
hands the heads a detached leaf ``ẑ`` (same value) so that the heads' graph stops at ``ẑ``. The
per-task gradients ``∂ℓ_t/∂ẑ`` are then taken one task at a time (:func:`split_task_grads`), and
the combination ``Σ_t w_t ∂ℓ_t/∂ẑ`` is staged as the cotangent of ``z`` for the single backward
of the commit stage, which runs the heads and the trunk together (DDP's reducer sees one
backward).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlbal.engine.base import GradWrites, PerTaskGrads, gramian_of
from mtlbal.engine.dense import batched_grads

__all__ = ["CutPerTaskGrads", "CutPoint", "split_task_grads"]

# module -> the CutPoint hooked on it: one capture per module, so that a second Balancer on the
# same module (or a forgotten one) cannot silently detach the trunk from the graph
_OWNERS: weakref.WeakKeyDictionary[nn.Module, CutPoint] = weakref.WeakKeyDictionary()


class CutPoint:
    """A forward hook on ``module`` that records its output for the next step.

    With ``detach=True`` the hook replaces the output ``z`` by a detached leaf ``ẑ`` (same value)
    and keeps ``(z, ẑ)``; otherwise the output passes through unchanged and ``(z, z)`` is kept.
    Per-step data (the captured tensors) is not pickled.
    """

    role: str
    handle: Any

    def __init__(self, module: nn.Module, *, detach: bool, role: str = "cut point") -> None:
        owner = _OWNERS.get(module)
        if owner is not None and owner.handle is not None:
            raise ValueError(
                f"{type(module).__name__} is already the {owner.role} of another Balancer: call "
                "remove() on that Balancer first (two captures on one module would detach the "
                "trunk behind the second one's back)"
            )
        self.module = module
        self.detach = detach
        self.role = role
        self.captured: list[tuple[Tensor, Tensor]] = []
        self.handle: Any = module.register_forward_hook(self._hook)
        _OWNERS[module] = self

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"the {self.role} {type(module).__name__} must return a single tensor, "
                f"got {type(output).__name__}"
            )
        if not (torch.is_grad_enabled() and output.requires_grad):
            return None
        if not self.detach:
            self.captured.append((output, output))
            return None
        leaf = output.detach().requires_grad_(True)
        self.captured.append((output, leaf))
        return leaf

    def take(self) -> list[tuple[Tensor, Tensor]]:
        out, self.captured = self.captured, []
        return out

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if _OWNERS.get(self.module) is self:
            del _OWNERS[self.module]
        self.captured = []

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["captured"] = []  # per-step tensors with a live graph are not state
        return state


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


class CutPerTaskGrads(PerTaskGrads):
    """Per-task gradients of the shared representation(s) captured at a cut point.

    ``outputs[k]`` is the k-th captured output of the cut module (still attached to the trunk)
    and ``grads[k]`` its ``[m, *shape]`` per-task gradient. Writing a combination stages one
    backward through the trunk, together with ``extra_roots`` (scalars backpropagated with
    gradient 1 in the same call: the heads' objective, a weighting's auxiliary term).
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
        self.extra_roots = list(extra_roots)
        self.m = int(self.grads[0].shape[0])
        self._gramian: Tensor | None = None

    def gramian(self) -> Tensor:
        if self._gramian is None:
            self._gramian = gramian_of(self.grads, self.m)
        return self._gramian

    def set_gramian(self, gramian: Tensor) -> None:
        """Replace the Gramian (e.g. by the global one under DDP)."""
        self._gramian = gramian

    def jacobian(self) -> Tensor:
        return torch.cat([z.reshape(self.m, -1) for z in self.grads], dim=1)

    def write_weights(self, w: Tensor, writes: GradWrites) -> None:
        cot = [torch.tensordot(w.to(z.dtype), z, dims=1) for z in self.grads]
        self._stage(cot, writes)

    def write_direction(self, g: Tensor, writes: GradWrites) -> None:
        cot = []
        offset = 0
        for z in self.outputs:
            n = z.numel()
            cot.append(g[offset : offset + n].view_as(z).to(z.dtype))
            offset += n
        self._stage(cot, writes)

    def _stage(self, cot: list[Tensor], writes: GradWrites) -> None:
        roots = self.outputs + self.extra_roots
        grads: list[Tensor | None] = [*cot, *[None] * len(self.extra_roots)]
        writes.backward(roots, grads)
