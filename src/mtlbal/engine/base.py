"""The contract between the Balancer and a gradient engine.

An engine turns the per-task objectives ``ℓ`` (shape ``[m]``) into a :class:`PerTaskGrads`: the
per-task gradients of the *shared* quantity (the shared parameters, or the shared representation
at a cut point), in whatever form is cheapest to keep. A strategy then asks it for what it needs
(the Gramian ``G = J Jᵀ`` ``[m, m]``, always in at least float32, or the Jacobian ``J``
``[m, n]``), and the Balancer asks it to *stage* the combined gradient ``Jᵀ w`` (or an explicit
direction ``g`` ``[n]``) in a :class:`GradWrites`. Nothing an engine does writes ``.grad``: the
Balancer's commit stage does, once everything that can fail has succeeded.

Gradient transforms have one meaning, applied in one place: where per-task gradients of a shared
parameter are formed, ``per_task`` acts on them (before the Gramian and the aggregator) and the
combination is written as is; where they are not formed (no gradient method, or at a cut point),
``combined`` acts on the gradient that reaches the parameter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["GradWrites", "PerTaskGrads", "accumulate_grad", "gramian_dtype", "gramian_of"]


def accumulate_grad(param: Tensor, grad: Tensor) -> None:
    """Add ``grad`` to ``param.grad`` (setting it when absent), in ``param``'s dtype."""
    if param.grad is None:
        param.grad = grad.detach().to(param.dtype)
    else:
        param.grad.add_(grad.to(param.grad.dtype))


def gramian_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a Gramian of gradients in ``dtype`` is formed in: at least float32."""
    if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point:
        return torch.float32
    return dtype


def gramian_of(blocks: list[Tensor], m: int) -> Tensor:
    """``Σ_k B_k B_kᵀ`` for per-task blocks ``B_k`` of shape ``[m, ...]`` (flattened).

    Formed in at least float32 and outside any autocast region (under fp16 autocast a matmul
    would otherwise run, and overflow, in fp16)."""
    g: Tensor | None = None
    for block in blocks:
        flat = block.reshape(m, -1)
        flat = flat.to(gramian_dtype(flat.dtype))
        with torch.autocast(flat.device.type, enabled=False):
            term = flat @ flat.T
        g = term if g is None else g + term
    if g is None:
        raise ValueError("no per-task gradient to form a Gramian from")
    return g


class GradWrites:
    """The ``.grad`` writes of one step, staged until :meth:`commit`.

    ``add(p, g)`` stages ``p.grad += g``; ``backward(roots, cotangents)`` stages one
    ``torch.autograd.backward`` call (the cut point's and the plain path's single backward, which
    DDP's reducer must see). :meth:`commit` runs the backward calls, then the direct additions.
    """

    def __init__(self) -> None:
        self._direct: list[tuple[Tensor, Tensor]] = []
        self._backward: list[tuple[list[Tensor], list[Tensor | None]]] = []
        self.committed = False

    def add(self, param: Tensor, grad: Tensor) -> None:
        self._direct.append((param, grad.detach()))

    def backward(self, roots: Sequence[Tensor], cotangents: Sequence[Tensor | None]) -> None:
        self._backward.append((list(roots), list(cotangents)))

    def direct(self) -> Iterable[tuple[Tensor, Tensor]]:
        """The staged direct ``(param, gradient)`` pairs."""
        return iter(self._direct)

    def commit(self) -> None:
        if self.committed:
            raise RuntimeError("these gradient writes were already committed")
        self.committed = True
        for roots, cots in self._backward:
            torch.autograd.backward(roots, cots)
        for p, g in self._direct:
            accumulate_grad(p, g)
        self._direct, self._backward = [], []


class PerTaskGrads(ABC):
    """Per-task gradients of the shared part, for ``m`` tasks.

    ``J`` (``[m, n]``) is the logical Jacobian: row ``t`` is ``∂ℓ_t/∂shared`` flattened, ``n``
    elements, in the order of the engine's :attr:`parameters` (or of the cut tensor).
    """

    m: int

    @abstractmethod
    def gramian(self) -> Tensor:
        """``G = J Jᵀ``, shape ``[m, m]``, in at least float32. Cached after the first call."""

    @abstractmethod
    def jacobian(self) -> Tensor:
        """``J``, shape ``[m, n]`` (materialised on demand)."""

    @abstractmethod
    def write_weights(self, w: Tensor, writes: GradWrites) -> None:
        """Stage ``Σ_t w_t ∂ℓ_t/∂shared`` for the shared ``.grad`` (from a cut: a backward)."""

    @abstractmethod
    def write_direction(self, g: Tensor, writes: GradWrites) -> None:
        """Stage an explicit direction ``g`` (``[n]``, the layout of :meth:`jacobian`)."""

    def apply_weights(self, w: Tensor) -> None:
        """Write ``Σ_t w_t ∂ℓ_t/∂shared`` into ``.grad`` now (standalone use)."""
        writes = GradWrites()
        self.write_weights(w, writes)
        writes.commit()

    def apply_direction(self, g: Tensor) -> None:
        """Write an explicit direction into ``.grad`` now (standalone use)."""
        writes = GradWrites()
        self.write_direction(g, writes)
        writes.commit()
