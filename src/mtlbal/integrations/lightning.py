"""Lightning: balancing in automatic optimization by adding one base class.

:class:`BalancedLightningModule` is ``BalancingMixin`` + ``lightning.pytorch.LightningModule``;
:class:`BalancingMixin` goes before ``LightningModule`` in the bases of your module (it uses only
the ``LightningModule`` API, so ``pytorch_lightning.LightningModule`` works too; this module
imports ``lightning``, which ``import mtlbal`` never does).
With it:

- ``training_step`` returns the per-task losses — a dict ``{task: loss}`` — or
  ``{"loss": total, "losses": {task: loss}, ...}`` (``total`` is what Lightning logs and
  shows; the balancer never differentiates it);
- ``configure_optimizers`` returns ``mtlbal.wrap(optimizer, balancer)`` (optionally with a
  scheduler, in any form Lightning accepts): the wrapper steps the strategy's learnable
  parameters and carries the balancer's state in the optimizer's ``state_dict``, so the
  Trainer's checkpoints save and restore it with no extra hook;
- the mixin's ``backward`` calls ``optimizer.backward(losses, scaler=...)`` with the precision
  plugin's gradient scaler (``"16-mixed"``) or none (``"32-true"``, ``"bf16-mixed"``): Lightning
  scales only the loss it hands to ``backward``, which the mixin does not use, and unscales the
  gradients in its ``optimizer_step`` — the scaler passed here makes the balancer's gradients
  the scaled ones Lightning expects (without it they would come out divided by the scale).

The last :class:`~mtlbal.StepInfo` is ``self.balancing_info``; with ``log_balancing = True``
(a class attribute) its fields are logged each step through ``self.log_dict``
(:func:`mtlbal.logging.info_to_dict`).

Manual optimization (``self.automatic_optimization = False``) needs no mixin: call
``opt.backward(losses, scaler=scaler_of(self.trainer))`` on ``self.optimizers()`` in place of
``self.manual_backward(loss)``, then ``opt.step()`` and ``opt.zero_grad()`` (see
``docs/integrations.md``).

Validation losses (``Need.VALIDATION``: CoBa): a ``validation_step`` that returns the per-task
losses (``{task: loss}`` or ``{"losses": {task: loss}, ...}``) has them averaged over the
validation loop (each batch counts once) and fed to the balancer at its end
(``on_validation_epoch_end``: ``opt.observe_validation(means)``); the sanity check's batches are
not fed. Under DDP each rank feeds its own means and the balancer takes their rank mean.

Gradient accumulation (``accumulate_grad_batches=K``): each batch is a micro-batch of the
balancer's accumulation window, which closes on the batch after which Lightning steps the
optimizer, so the update is the balanced update of the ``K`` batches together (see
:mod:`mtlbal._accumulate`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule

from mtlbal.balancer import StepInfo
from mtlbal.logging import info_to_dict
from mtlbal.optim import BalancedOptimizer

__all__ = ["BalancedLightningModule", "BalancingMixin", "balanced_optimizer", "scaler_of"]


def scaler_of(trainer: Any) -> Any | None:
    """The gradient scaler of ``trainer``'s precision plugin (a ``torch.amp.GradScaler`` for
    ``"16-mixed"``), or ``None`` (``"32-true"``, ``"bf16-mixed"``, a plugin without one)."""
    plugin = getattr(trainer, "precision_plugin", None)
    return getattr(plugin, "scaler", None)


def balanced_optimizer(trainer: Any) -> BalancedOptimizer:
    """The one :class:`~mtlbal.BalancedOptimizer` among ``trainer.optimizers``; raises if there
    is none or more than one."""
    found = [o for o in trainer.optimizers if isinstance(o, BalancedOptimizer)]
    if len(found) != 1:
        raise TypeError(
            f"expected exactly one mtlbal.BalancedOptimizer among the trainer's optimizers, found "
            f"{len(found)}: return mtlbal.wrap(optimizer, balancer) from configure_optimizers"
        )
    return found[0]


def _split(output: Any) -> tuple[Any, Mapping[str, torch.Tensor] | None]:
    """``training_step``'s output -> (what Lightning gets, the per-task losses or None)."""
    if not isinstance(output, Mapping):
        return output, None
    if "losses" in output:
        losses = output["losses"]
        if not isinstance(losses, Mapping):
            raise TypeError("training_step's 'losses' must be a dict {task: loss}")
        rest = {k: v for k, v in output.items() if k != "losses"}
        if "loss" not in rest:
            rest["loss"] = _total(losses)
        return rest, losses
    if "loss" in output:
        return output, None
    if output and all(isinstance(v, torch.Tensor) for v in output.values()):
        return {"loss": _total(output)}, output
    return output, None


def _total(losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if not losses:
        raise ValueError("training_step returned no per-task losses")
    return torch.stack([v.detach().float().reshape(()) for v in losses.values()]).sum()


def _wrap_training_step(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        # a subclass's training_step calling super().training_step(): only the outermost call
        # (the one Lightning made) turns the losses into Lightning's output
        depth = self.__dict__.get("_mtlbal_depth", 0)
        self.__dict__["_mtlbal_depth"] = depth + 1
        try:
            output = fn(self, *args, **kwargs)
        finally:
            self.__dict__["_mtlbal_depth"] = depth
        if depth or not self.automatic_optimization:
            return output
        output, losses = _split(output)
        self._mtlbal_losses = losses
        return output

    training_step._mtlbal_wrapped = True  # type: ignore[attr-defined]
    return training_step


def _validation_losses(output: Any) -> Mapping[str, torch.Tensor] | None:
    """``validation_step``'s per-task losses (``{task: loss}`` or under ``"losses"``), or None."""
    if not isinstance(output, Mapping):
        return None
    if "losses" in output and isinstance(output["losses"], Mapping):
        return output["losses"]
    if (
        output
        and "loss" not in output
        and all(isinstance(v, torch.Tensor) for v in output.values())
    ):
        return output
    return None


def _wrap_validation_step(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def validation_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        depth = self.__dict__.get("_mtlbal_val_depth", 0)
        self.__dict__["_mtlbal_val_depth"] = depth + 1
        try:
            output = fn(self, *args, **kwargs)
        finally:
            self.__dict__["_mtlbal_val_depth"] = depth
        losses = None if depth else _validation_losses(output)
        if losses is not None and not self.trainer.sanity_checking:
            sums = self.__dict__.setdefault("_mtlbal_val_sums", {})
            for name, v in losses.items():
                value = v.detach().to(torch.float64).reshape(())
                total, count = sums.get(str(name), (0.0, 0))
                sums[str(name)] = (value + total, count + 1)
        return output

    validation_step._mtlbal_wrapped = True  # type: ignore[attr-defined]
    return validation_step


def _wrap_validation_epoch_end(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def on_validation_epoch_end(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = fn(self, *args, **kwargs)
        _feed_validation(self)
        return out

    on_validation_epoch_end._mtlbal_wrapped = True  # type: ignore[attr-defined]
    return on_validation_epoch_end


def _feed_validation(module: Any) -> None:
    """Feed the epoch's per-task mean validation losses to the balancer (once per loop)."""
    sums = module.__dict__.pop("_mtlbal_val_sums", None)
    if not sums or module.trainer.sanity_checking:
        return
    means = {name: total / count for name, (total, count) in sums.items()}
    balanced_optimizer(module.trainer).observe_validation(means)


class BalancingMixin:
    """Balancing for a ``LightningModule`` in automatic optimization: list it first in the bases,
    ``class Net(BalancingMixin, LightningModule)``; see the module's documentation.

    ``training_step`` returns ``{task: loss}`` or ``{"loss": total, "losses": {task: loss}}``,
    ``configure_optimizers`` returns ``mtlbal.wrap(optimizer, balancer)``.

    Attributes:
        log_balancing: log the step info through ``self.log_dict`` each step (default False).
        balancing_info: the last step's :class:`~mtlbal.StepInfo` (``None`` before the first).
    """

    log_balancing: bool = False
    balancing_info: StepInfo | None = None
    _mtlbal_losses: Mapping[str, torch.Tensor] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if callable(step) and not getattr(step, "_mtlbal_wrapped", False):
            cls.training_step = _wrap_training_step(step)  # type: ignore[attr-defined]
        val = cls.__dict__.get("validation_step")
        if callable(val) and not getattr(val, "_mtlbal_wrapped", False):
            cls.validation_step = _wrap_validation_step(val)  # type: ignore[attr-defined]
        end = cls.__dict__.get("on_validation_epoch_end")
        if callable(end) and not getattr(end, "_mtlbal_wrapped", False):
            cls.on_validation_epoch_end = _wrap_validation_epoch_end(end)  # type: ignore[method-assign]

    def on_validation_epoch_end(self) -> None:
        """Feed the per-task mean validation losses of the loop that ends to the balancer
        (``opt.observe_validation``; skipped during the sanity check). A subclass's own
        ``on_validation_epoch_end`` is wrapped to do the same after it runs."""
        _feed_validation(self)
        parent = getattr(super(), "on_validation_epoch_end", None)
        if callable(parent):
            parent()

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Balance the losses ``training_step`` returned (automatic optimization); in manual
        optimization (``manual_backward``) the plain ``backward`` of the next base."""
        module: Any = self
        if not module.automatic_optimization:
            return super().backward(loss, *args, **kwargs)  # type: ignore[misc]
        losses, self._mtlbal_losses = self._mtlbal_losses, None
        if losses is None:
            raise TypeError(
                "with BalancingMixin, training_step returns the per-task losses: a dict "
                "{task: loss} or {'loss': total, 'losses': {task: loss}}"
            )
        trainer = module.trainer
        last = None
        if trainer.accumulate_grad_batches != 1:
            # gradient accumulation: this batch is a micro-batch of the balancer's window,
            # closed on the batch after which Lightning steps the optimizer
            last = not trainer.fit_loop.epoch_loop._should_accumulate()
        opt = balanced_optimizer(trainer)
        info = opt.backward(losses, scaler=scaler_of(trainer), last=last)
        self.balancing_info = info
        if self.log_balancing and not info.pending:
            module.log_dict(info_to_dict(info), on_step=True, on_epoch=False)
        return None


class BalancedLightningModule(BalancingMixin, LightningModule):
    """``BalancingMixin`` + ``lightning.pytorch.LightningModule``: subclass it in place of
    ``LightningModule`` (the one line); see :class:`BalancingMixin`."""
