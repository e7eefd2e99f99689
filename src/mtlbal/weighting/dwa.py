"""DWA — Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019).

Epoch version (the paper and LibMTL). With ``L̄_k(e)`` the average training loss of task ``k``
over epoch ``e`` and ``r_k = L̄_k(e−1) / L̄_k(e−2)`` the relative descent rate,

    w_k(e) = m · exp(r_k / τ) / Σ_i exp(r_i / τ),        ℓ_k = w_k · L_k,

with ``w = 1`` during the first two epochs (no two completed epochs to compare). Policy for an
epoch mean of zero: ``r_k = 1`` (neutral) when ``L̄_k(e−2) = 0``, where the ratio is undefined
(``0/0`` or ``x/0``), so the weights are never NaN. Default
``τ = 2``. The weights sum to ``m``: equal rates give ``w = 1``, i.e. ``Σ_k L_k`` — the library's
"sum" scale is the paper's own.

The epoch averages are accumulated (in float64) from the raw losses the Balancer reports after
every taken step (:meth:`observe`); call ``balancer.epoch_end()`` at the end of each epoch.
An epoch without any step is ignored. State (saved by ``state_dict``): the running sum and count
of the current epoch and the last two epoch averages. No host sync.

Missing tasks (a step without some tasks' losses): a task's epoch mean is taken over the steps
in which it had a loss (a per-task count of absent steps, ``epoch_absent``, is kept from the
first such step on). A missing-task step weighs its ``m'`` present tasks as DWA on them,
``w_P = m' · softmax(r_P / τ)``. A task without a loss in a whole epoch carries its previous
epoch mean forward (rate 1 at the next comparison); with no previous mean its mean is NaN, and
a rate from a NaN mean is 1 (neutral), like one from a zero mean.

Shapes: ``L`` ``[m]`` → weights ``[m]``.

Example:
    >>> import torch
    >>> dwa = DWA()
    >>> for losses in ([2.0, 2.0], [1.0, 2.0]):  # two epochs of one step each
    ...     dwa.observe(torch.tensor(losses)); dwa.epoch_end()
    >>> dwa(torch.tensor([1.0, 1.0]))  # task 0 halved its loss: rate ½ vs 1
    tensor([0.8756, 1.1244])
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbal.step import Need
from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["DWA", "dwa_weights"]


def dwa_weights(prev: Tensor, prev2: Tensor, temperature: float = 2.0) -> Tensor:
    """``m · softmax((L̄(e−1) / L̄(e−2)) / τ)`` for the last two epoch means (``[m]`` each);
    the rate of a task with ``L̄(e−2) = 0`` (or a NaN mean: no loss in that epoch) is 1."""
    zero = (prev2 == 0) | prev.isnan() | prev2.isnan()
    rate = torch.where(zero, torch.ones_like(prev), prev / torch.where(zero, 1.0, prev2))
    return prev.shape[0] * torch.softmax(rate / temperature, dim=0)


class DWA(LossWeighting):
    """Dynamic weight average over epoch-mean losses.

    Args:
        num_tasks: optional; checked against the number of losses when given.
        temperature: ``τ`` (2, as the paper).
    """

    needs = frozenset({Need.EPOCHS})

    epoch_sum: Tensor | None
    epoch_count: Tensor
    epoch_absent: Tensor | None
    supports_missing_tasks = True
    prev_mean: Tensor | None
    prev2_mean: Tensor | None

    linear_in_losses = True

    def __init__(self, num_tasks: int | None = None, *, temperature: float = 2.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        self.num_tasks = num_tasks
        self.temperature = float(temperature)
        self.add_state("epoch_sum", None)
        self.add_state("epoch_count", torch.zeros((), dtype=torch.int64))
        self.add_state("prev_mean", None)
        self.add_state("prev2_mean", None)
        # per task: the steps of the current epoch without its loss (lazy: only once a
        # missing-task step happened)
        self.add_state("epoch_absent", None)

    def hparams(self) -> dict[str, object]:
        return {"num_tasks": self.num_tasks, "temperature": self.temperature}

    def current_weights(self, losses: Tensor, present: tuple[int, ...] | None = None) -> Tensor:
        prev, prev2 = self.prev_mean, self.prev2_mean
        if prev is None or prev2 is None:
            return torch.ones_like(losses).detach()
        if present is not None:
            idx = torch.tensor(present, device=prev.device)
            prev, prev2 = prev[idx], prev2.to(prev.device)[idx]
        if prev.shape[0] != losses.shape[0]:
            raise ValueError(f"DWA has statistics for {prev.shape[0]} tasks, got {losses.shape[0]}")
        w = dwa_weights(prev, prev2.to(prev.device), self.temperature)
        return w.to(device=losses.device, dtype=losses.dtype)

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        if ctx.present is not None and self.epoch_sum is None:
            # a missing-task step first: the running sum is sized by the full task count
            # (state replaced, not mutated: a refused step puts None back)
            m = ctx.num_all_tasks(losses.shape[0])
            self.epoch_sum = torch.zeros(m, dtype=torch.float64, device=losses.device)
            self.epoch_count = self.epoch_count.to(losses.device)
        w = self.current_weights(losses, ctx.present)
        return WeightedLosses(w * losses, w)

    def observe(self, losses: Tensor, present: tuple[int, ...] | None = None) -> None:
        x = losses.detach().to(torch.float64)
        if self.epoch_sum is None:
            if present is not None:  # sized by objectives() from the full task count
                raise RuntimeError("DWA.observe: a missing-task step before objectives()")
            self.epoch_sum = torch.zeros_like(x)
            self.epoch_count = self.epoch_count.to(x.device)
        elif present is None and self.epoch_sum.shape != x.shape:
            raise ValueError(
                f"DWA accumulates {self.epoch_sum.shape[0]} tasks, got {x.shape[0]} losses"
            )
        # state restored by load_state_dict may sit on another device than the losses
        total = self.epoch_sum.to(x.device)
        if present is None:
            self.epoch_sum = total + x
        else:
            idx = torch.tensor(present, device=x.device)
            self.epoch_sum = total.index_add(0, idx, x)
            absent = torch.ones(total.shape[0], dtype=torch.int64, device=x.device)
            absent = absent.index_fill(0, idx, 0)
            prior = self.epoch_absent
            self.epoch_absent = absent if prior is None else prior.to(x.device) + absent
        self.epoch_count = self.epoch_count.to(x.device) + 1

    def epoch_end(self) -> None:
        if self.epoch_sum is None or int(self.epoch_count) == 0:
            return
        count = self.epoch_count.to(self.epoch_sum.device)
        absent = self.epoch_absent
        if absent is None:
            mean = self.epoch_sum / count
        else:  # per task: over the steps that had its loss
            seen = count - absent.to(count.device)
            mean = self.epoch_sum / seen.clamp_min(1)
            # no loss in the whole epoch: the previous mean carried forward (NaN without one)
            carried = (
                torch.full_like(mean, float("nan"))
                if self.prev_mean is None
                else self.prev_mean.to(mean.device)
            )
            mean = torch.where(seen > 0, mean, carried)
        self.prev2_mean = self.prev_mean
        self.prev_mean = mean
        self.epoch_sum = torch.zeros_like(self.epoch_sum)
        self.epoch_count = torch.zeros_like(self.epoch_count)
        self.epoch_absent = None
