"""The contract between the Balancer and a gradient engine.

An engine turns the per-task objectives ``ℓ`` (shape ``[m]``) into a :class:`PerTaskGrads`: the
per-task gradients of the *shared* quantity (the shared parameters, or the shared representation
at a cut point), in whatever form is cheapest to keep. A strategy then asks it for what it needs
(the Gramian ``G = J Jᵀ`` ``[m, m]``, or the Jacobian ``J`` ``[m, n]``), and the Balancer asks it
to write the combined gradient ``Jᵀ w`` (or an explicit direction ``g`` ``[n]``) into ``.grad``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

__all__ = ["PerTaskGrads", "accumulate_grad", "gramian_of"]


def accumulate_grad(param: Tensor, grad: Tensor) -> None:
    """Add ``grad`` to ``param.grad`` (setting it when absent), in ``param``'s dtype."""
    if param.grad is None:
        param.grad = grad.detach().to(param.dtype)
    else:
        param.grad.add_(grad.to(param.grad.dtype))


def gramian_of(blocks: list[Tensor], m: int) -> Tensor:
    """``Σ_k B_k B_kᵀ`` for per-task blocks ``B_k`` of shape ``[m, ...]`` (flattened)."""
    g: Tensor | None = None
    for block in blocks:
        flat = block.reshape(m, -1)
        term = flat @ flat.T
        g = term if g is None else g + term
    if g is None:
        raise ValueError("no per-task gradient to form a Gramian from")
    return g


class PerTaskGrads(ABC):
    """Per-task gradients of the shared part, for ``m`` tasks.

    ``J`` (``[m, n]``) is the logical Jacobian: row ``t`` is ``∂ℓ_t/∂shared`` flattened, ``n``
    elements, in the order of the engine's :attr:`parameters` (or of the cut tensor).
    """

    m: int

    @abstractmethod
    def gramian(self) -> Tensor:
        """``G = J Jᵀ``, shape ``[m, m]``, in the gradients' dtype. Cached after the first call."""

    @abstractmethod
    def jacobian(self) -> Tensor:
        """``J``, shape ``[m, n]`` (materialised on demand)."""

    @abstractmethod
    def apply_weights(self, w: Tensor) -> None:
        """Accumulate ``Σ_t w_t ∂ℓ_t/∂shared`` into the shared ``.grad`` (from a cut: backward)."""

    @abstractmethod
    def apply_direction(self, g: Tensor) -> None:
        """Accumulate an explicit direction ``g`` (``[n]``, the layout of :meth:`jacobian`)."""
