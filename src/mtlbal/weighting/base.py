"""Loss-level strategies: ``L [m] → w [m]``, never needing per-task gradients."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mtlbal._stateful import Stateful
from mtlbal.step import Need, StepContext

__all__ = ["Equal", "LossContext", "LossWeighting", "WeightedLosses"]


@dataclass
class WeightedLosses:
    """What a loss weighting hands the Balancer for one step.

    Attributes:
        objectives: ``[m]``; the per-task objectives ``ℓ_t`` whose gradients the engine takes
            (``w_t·L_t`` for a plain weighting, ``w_t·log L_t`` for IGB, …). Differentiable with
            respect to the network and, for learnable strategies, their own parameters.
        weights: ``[m]``, detached; the effective multiplier of ``∇L_t`` in ``∇ℓ_t``
            (``∂ℓ_t/∂L_t``), reported in the step info.
        aux: optional scalar added once to the backward (e.g. the ``b·s_t`` terms of
            uncertainty weighting); it only reaches the strategy's own parameters.
        param_grads: ``(parameter, gradient)`` pairs for the strategy's own parameters that
            are not gradients of ``objectives`` (GradNorm's weights). The Balancer adds them
            to ``.grad`` at its commit stage: a strategy never writes ``.grad`` itself.
        domain: ``(ok, what)`` for a strategy whose formula holds only for some losses (FAMO's
            ``log(L − L*)``, IGB's ``log L``): ``ok`` is a ``[m]`` bool tensor (no host read
            here), ``what`` the precondition in words. The Balancer folds ``ok`` into its one
            host sync and refuses the step naming the tasks outside the domain.
    """

    objectives: Tensor
    weights: Tensor
    aux: Tensor | None = None
    param_grads: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    domain: tuple[Tensor, str] | None = None


# the one context object of a step (kept under its first name for loss weightings)
LossContext = StepContext


class LossWeighting(Stateful):
    """Base class: map the loss vector ``L`` (``[m]``) to per-task objectives.

    Subclasses implement :meth:`objectives`. ``weighting(L)`` returns the current weights
    ``[m]`` (standalone use, as in TorchJD). A strategy that needs ``‖∇_W L_t‖`` for some
    parameters ``W`` declares ``Need.LAYER_NORMS`` in :attr:`needs` and returns them from
    :meth:`grad_norm_params`.
    """

    num_tasks: int | None = None
    #: ``ℓ_t = c_t·L_t`` (+ an ``aux`` term) with ``c`` and ``aux`` independent of the current
    #: losses' values (they may depend on the strategy's state, parameters and randomness).
    #: Gradient accumulation then needs one backward per micro-batch instead of per-task
    #: gradients (:mod:`mtlbal._accumulate`). ``False`` (the safe default) for anything else.
    linear_in_losses: bool = False

    @property
    def needs_layer_grad_norms(self) -> bool:
        """Whether the strategy declared ``Need.LAYER_NORMS``."""
        return Need.LAYER_NORMS in self.needs

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        raise NotImplementedError

    def forward(self, losses: Tensor) -> Tensor:
        """Weights for ``losses`` (``[m]`` → ``[m]``), without changing any state."""
        return self.current_weights(losses)

    def current_weights(self, losses: Tensor) -> Tensor:
        raise NotImplementedError

    def grad_norm_params(self) -> list[Tensor]:
        """Parameters ``W`` whose per-task gradient norms this strategy needs (if any)."""
        return []

    def bind(self, shared_params: list[Tensor], at_module: object | None) -> None:
        """Called once by the Balancer with what it balances (e.g. to pick a default layer)."""

    def epoch_end(self) -> None:
        """Mark the end of an epoch (IGB, DWA use epoch means)."""

    def observe(self, losses: Tensor, present: tuple[int, ...] | None = None) -> None:
        """Called after every taken step with the detached raw losses ``[m]``. On a
        missing-task step (only for a strategy that supports them) ``losses`` holds the present
        tasks' losses and ``present`` their indices in the full task list (as
        ``StepContext.present``); it is passed only then, so a strategy that never supports
        missing tasks may leave it out of its signature."""


class Equal(LossWeighting):
    """Equal weights: ``ℓ_t = L_t`` (``w = 1``), so the result is ``∇ Σ_t L_t``.

    Missing tasks: ``∇ Σ_t L_t`` over the present tasks.

    Example:
        >>> import torch
        >>> Equal()(torch.tensor([2.0, 3.0]))
        tensor([1., 1.])
    """

    linear_in_losses = True
    supports_missing_tasks = True

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        return WeightedLosses(losses, torch.ones_like(losses).detach())

    def current_weights(self, losses: Tensor) -> Tensor:
        return torch.ones_like(losses).detach()
