"""Hugging Face ``Trainer`` integration: :class:`BalancedTrainer`.

``transformers`` is imported when this module is, never by ``import mtlbal``. The model's
forward returns the per-task losses: a dict of scalar tensors, or a dict / ``ModelOutput`` with
them under ``losses``. :class:`BalancedTrainer` runs the model, hands the losses to the
:class:`~mtlbal.Balancer` (which fills ``.grad``) and lets the ``Trainer`` step as usual.

- The optimizer the ``Trainer`` builds (or the one you pass) is wrapped with
  :func:`mtlbal.wrap`; the balancer's learnable parameters (uncertainty weighting's
  log-variances, GradNorm's weights) are added to it as a parameter group without weight decay
  (``balancer_lr=`` sets their learning rate; default the ``Trainer``'s). An optimizer you pass
  that lacks them gets the wrapper's default ``Adam`` for them.
- Checkpoints: the wrapper's ``state_dict`` carries the balancer's state, so HF's
  ``optimizer.pt`` has it, and ``trainer.train(resume_from_checkpoint=...)`` restores it.
- Mixed precision: the accelerator's ``GradScaler`` (fp16 on a GPU) is passed to
  ``balancer.backward``; bf16 needs no scaler. HF refuses fp16 on a CPU.
- Validation losses (``Need.VALIDATION``: CoBa): ``evaluate()`` (called by the ``Trainer``
  with ``eval_strategy``, or by you) averages each task's loss over the evaluation batches
  (each batch counts once), reports them as ``eval_loss_<task>`` and feeds them to the
  balancer (``observe_validation``) when an evaluation dataset's losses cover every task.
  ``eval_loss`` is their sum. Under DDP each rank feeds its own means and the balancer takes
  their rank mean.
- Gradient accumulation (``gradient_accumulation_steps=K``): each batch is a micro-batch of the
  balancer's accumulation window, closed on the batch after which the ``Trainer`` steps
  (accelerate's ``sync_gradients``), so the update is the balanced update of the ``K`` batches
  together (see :mod:`mtlbal._accumulate`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from mtlbal.balancer import Balancer
from mtlbal.optim import BalancedOptimizer, wrap

__all__ = ["BalancedTrainer", "losses_from_outputs"]


def losses_from_outputs(outputs: Any, key: str = "losses") -> Mapping[str, Tensor]:
    """The per-task losses of a model's outputs.

    ``outputs[key]`` or ``outputs.key`` when it exists (a dict, a ``ModelOutput``), else
    ``outputs`` itself when it is a dict of tensors (every value a loss).
    """
    found: Any = None
    if isinstance(outputs, Mapping) and key in outputs:
        found = outputs[key]
    elif not isinstance(outputs, Mapping) and getattr(outputs, key, None) is not None:
        found = getattr(outputs, key)
    elif isinstance(outputs, Mapping) and all(isinstance(v, Tensor) for v in outputs.values()):
        found = outputs
    if not isinstance(found, Mapping) or not found:
        raise ValueError(
            f"the model must return its per-task losses as a dict of tensors, or under "
            f"'{key}' (a dict or a ModelOutput); got {type(outputs).__name__}"
        )
    return found


class BalancedTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step balances the per-task losses.

    Args:
        *args: the ``Trainer``'s.
        balancer: the :class:`~mtlbal.Balancer` over the model's shared part.
        balancer_factory: instead of ``balancer``, a callable ``model -> Balancer``, called once
            with the model the ``Trainer`` holds (after ``model_init`` when one is given).
        balancer_lr: learning rate of the balancer's learnable parameters in the ``Trainer``'s
            optimizer; default ``args.learning_rate``.
        losses_key: where the model's outputs hold the losses (see
            :func:`losses_from_outputs`).
        **kwargs: the ``Trainer``'s.

    ``training_step`` returns the detached sum of the (unweighted, unscaled) task losses, which
    the ``Trainer`` logs as ``loss``; ``trainer.last_info`` is the last
    :class:`~mtlbal.StepInfo` (weights, skipped, ...).
    """

    def __init__(
        self,
        *args: Any,
        balancer: Balancer | None = None,
        balancer_factory: Callable[[nn.Module], Balancer] | None = None,
        balancer_lr: float | None = None,
        losses_key: str = "losses",
        **kwargs: Any,
    ) -> None:
        if (balancer is None) == (balancer_factory is None):
            raise ValueError("give exactly one of balancer= and balancer_factory=")
        super().__init__(*args, **kwargs)
        if balancer is None:
            assert balancer_factory is not None
            if self.model is None:
                raise ValueError("balancer_factory= needs a model (model= or model_init=)")
            balancer = balancer_factory(self.model)
        self.balancer: Balancer = balancer
        if not isinstance(self.balancer, Balancer):
            raise TypeError(f"expected an mtlbal.Balancer, got {type(self.balancer).__name__}")
        self.balancer_lr = balancer_lr
        self.losses_key = losses_key
        self.last_info: Any = None
        self._balanced: BalancedOptimizer | None = None
        self._val_sums: dict[str, tuple[Tensor, int]] | None = None

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The ``Trainer``'s optimizer with the balancer's learnable parameters added, wrapped
        with :func:`mtlbal.wrap`."""
        built_here = self.optimizer is None
        self.balancer.to(self.args.device)
        opt = super().create_optimizer(model) if model is not None else super().create_optimizer()
        # already wrapped (a second train(): accelerate's wrapper around ours)
        inner = getattr(opt, "optimizer", None)
        if isinstance(opt, BalancedOptimizer) or isinstance(inner, BalancedOptimizer):
            self._balanced = opt if isinstance(opt, BalancedOptimizer) else inner
            return opt
        if built_here:
            extra = list(self.balancer.parameters())
            if extra:
                lr = self.balancer_lr if self.balancer_lr is not None else self.args.learning_rate
                opt.add_param_group({"params": extra, "weight_decay": 0.0, "lr": lr})
        self._balanced = wrap(opt, self.balancer)
        self.optimizer = self._balanced
        return self._balanced

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Run the model on ``inputs``, balance its losses into ``.grad``, return their
        detached sum."""
        model.train()
        # the Trainer zeroes the model's gradients (model.zero_grad()), not the optimizer's:
        # the strategy parameters live outside the model, clear theirs when a step starts
        if getattr(self.balancer, "_window", None) is None:
            for p in self.balancer.parameters():
                p.grad = None
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
        losses = dict(losses_from_outputs(outputs, self.losses_key))
        scaler = getattr(self.accelerator, "scaler", None)
        last = None
        if self.args.gradient_accumulation_steps != 1:
            # a micro-batch of the balancer's window, closed when the Trainer steps next
            last = bool(self.accelerator.sync_gradients)
        opt = self._balanced
        if opt is None:  # the Trainer always builds its optimizer first; be safe anyway
            self.last_info = self.balancer.backward(losses, scaler=scaler, last=last)
        else:
            self.last_info = opt.backward(losses, scaler=scaler, last=last)
        return torch.stack([v.detach().float() for v in losses.values()]).sum()

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Evaluation: run the model, record each task's loss for :meth:`evaluate`, return the
        detached sum of the task losses as the batch's loss (no logits, no labels)."""
        model.eval()
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs)
        losses = losses_from_outputs(outputs, self.losses_key)
        if self._val_sums is not None:
            for name, v in losses.items():
                value = v.detach().to(torch.float64).reshape(()).cpu()
                total, count = self._val_sums.get(
                    str(name), (torch.zeros((), dtype=torch.float64), 0)
                )
                self._val_sums[str(name)] = (total + value, count + 1)
        total_loss = torch.stack([v.detach().float().reshape(()) for v in losses.values()]).sum()
        return total_loss, None, None

    def evaluate(
        self,
        eval_dataset: Any | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """The ``Trainer``'s ``evaluate``, then the per-task mean losses are added to the
        metrics (``<prefix>_loss_<task>``) and fed to the balancer
        (:meth:`~mtlbal.Balancer.observe_validation`) when they cover every task."""
        self._val_sums = {}
        try:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            sums, self._val_sums = self._val_sums, None
        if not sums:
            return metrics
        means = {name: total / count for name, (total, count) in sums.items()}
        for name, v in means.items():
            metrics[f"{metric_key_prefix}_loss_{name}"] = float(v)
        tasks = self.balancer.tasks
        if tasks is not None and set(means) == set(tasks):
            self.balancer.observe_validation(means)
        return metrics
