"""Gradient transforms: per-parameter operations on gradients (masks, clipping, …)."""

from __future__ import annotations

from torch import Tensor, nn

from mtlbal._stateful import Stateful
from mtlbal.step import Need

__all__ = ["GradientTransform"]


class GradientTransform(Stateful):
    """Base class for per-parameter gradient transforms.

    The Balancer calls :meth:`per_task` on each shared parameter's per-task gradients
    (``[m, *param.shape]``) before any aggregation or statistic, and :meth:`combined` on the
    gradient that reaches ``.grad`` when no per-task gradients were formed. After the wrapped
    optimizer's step it calls :meth:`after_step` (e.g. to keep frozen entries bitwise unchanged
    under weight decay).

    :meth:`bind` is called once by the Balancer with the shared parameters (and modules), so a
    transform built without parameters can select what it acts on. A transform whose effect
    needs the per-task gradients (not just the combined one) sets :attr:`needs_per_task`; the
    Balancer then forms them even without an aggregator. Otherwise, without an aggregator, the
    Balancer runs one ordinary backward and applies :meth:`combined`.
    """

    needs_per_task: bool = False

    @property
    def needs(self) -> frozenset[Need]:  # type: ignore[override]
        """``Need.GRAMIAN`` (per-task gradients) when :attr:`needs_per_task` is set."""
        return frozenset({Need.GRAMIAN}) if self.needs_per_task else frozenset()

    def bind(self, shared_params: list[Tensor], shared_modules: list[nn.Module]) -> None:
        """Told the Balancer's shared parameters and modules once, at construction."""

    def per_task(self, param: Tensor, grads: Tensor) -> Tensor:
        return grads

    def combined(self, param: Tensor, grad: Tensor) -> Tensor:
        return grad

    def applies_to(self, param: Tensor) -> bool:
        """Whether this transform changes ``param``'s gradients at all."""
        return False

    def after_step(self) -> None:
        """Called after the optimizer step (through :func:`mtlbal.wrap` or by the user)."""
