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

__all__ = ["PerTaskGrads"]


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
