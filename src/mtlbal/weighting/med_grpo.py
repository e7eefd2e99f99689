"""MedGRPO cross-dataset normalisation (Su, Choudhuri, Gao, Planche, Nguyen, Zheng, Shen,
Innanje, Chen, Elhamifar, Wu, "MedGRPO: Multi-Task Reinforcement Learning for Heterogeneous
Medical Video Understanding", CVPR 2026, arXiv:2512.06581).

Datasets (tasks) of very different difficulty give rewards on different scales, and raw rewards
make GRPO overfit the easy datasets and abandon the hard ones. MedGRPO maps each dataset's
**median** performance to one common value with a logistic function, so that "typical for this
dataset" means the same everywhere. Here that is done with a running median per task, for
rewards and for losses:

* **rewards** (a GRPO-style loop): :meth:`MedGRPO.normalize_rewards` maps a reward ``r`` of task
  ``k`` to ``r̃ = σ(κ · (r − med_k))``: the running median goes to ``σ(0) = 1/2`` for every
  task, better than typical towards 1, worse towards 0.
* **supervised losses** (a loss weighting): the objectives are ``w_t · L_t`` with
  ``w_t = c / med_t`` (detached): each task's loss at its running median is worth ``c`` (1:
  at the median every weighted loss is 1, so equal losses give ``Σ_t L_t``). A logistic of the
  loss would change the shape of its gradient; a weight only rescales it.

The running median ``med_k`` is the median (the mean of the two middle values for an even
count) of the last ``window`` per-step values of task ``k``: the step's loss (the Balancer
observes each committed step's losses), or for rewards the median of the task's rewards in the
batch. The first step uses its own values (there is nothing before it).

Not published (as far as we could read: the project page and the abstract), hence chosen here
and documented: the logistic's steepness ``κ`` (default 10, for rewards in ``[0, 1]``), the
median's window (100 steps) and the linear weight form for losses. The paper normalises per
dataset; here a task is a dataset.

Under DDP the loss weighting sees the global (rank-mean) losses, so every rank holds the same
medians; for rewards, pass every rank's rewards (gathered) or accept per-rank medians.

Missing tasks: a supervised step without some tasks' losses is refused. A reward batch may lack
tasks: their medians are left as they are.

Example:
    >>> import torch
    >>> med = MedGRPO(2, window=4)
    >>> r = med.normalize_rewards(torch.tensor([0.9, 0.5, 0.1, 0.2, 0.1, 0.0]),
    ...                           torch.tensor([0, 0, 0, 1, 1, 1]))
    >>> r[1], r[4]  # each task's median reward maps to 1/2
    (tensor(0.5000), tensor(0.5000))
    >>> w = med.current_weights(torch.tensor([2.0, 0.5]))  # no history yet: its own values
    >>> w
    tensor([0.5000, 2.0000])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["MedGRPO", "logistic_normalize", "running_median"]


def running_median(window: Tensor) -> Tensor:
    """Per-column median of ``window`` (``[n, m]``; NaN marks an empty slot): the mean of the
    two middle values for an even count; NaN for a column without values."""
    return torch.nanquantile(window, 0.5, dim=0)


def logistic_normalize(rewards: Tensor, medians: Tensor, steepness: float) -> Tensor:
    """``σ(κ (r − med))`` elementwise (``medians`` broadcast to ``rewards``)."""
    return torch.sigmoid(steepness * (rewards - medians))


class MedGRPO(LossWeighting):
    """Median-to-common-value normalisation of per-task losses or rewards.

    Args:
        num_tasks: ``m``.
        window: the number of past steps in each task's running median (100).
        steepness: ``κ`` of the reward logistic (10).
        target: ``c``, the weighted loss of a task at its running median (1).
        eps: floor of a loss median before ``c / med`` (1e-12).
    """

    supports_missing_tasks = False
    missing_tasks_note = (
        "MedGRPO's loss windows hold one value per task per step; a step without some tasks' "
        "losses is refused (rewards may lack tasks: normalize_rewards)"
    )

    num_tasks: int
    loss_window: Tensor | None
    reward_window: Tensor | None

    def __init__(
        self,
        num_tasks: int,
        *,
        window: int = 100,
        steepness: float = 10.0,
        target: float = 1.0,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        if window < 1 or steepness <= 0 or target <= 0 or eps <= 0:
            raise ValueError(
                "need window ≥ 1, steepness > 0, target > 0 and eps > 0, got "
                f"{window}, {steepness}, {target}, {eps}"
            )
        self.num_tasks = num_tasks
        self.window = int(window)
        self.steepness = float(steepness)
        self.target = float(target)
        self.eps = float(eps)
        # [≤window, m], the last steps' losses; [window, m] rewards, NaN where a task had none
        self.add_state("loss_window", None, per_task=False)
        self.add_state("reward_window", None, per_task=False)

    def hparams(self) -> dict[str, object]:
        return {
            "num_tasks": self.num_tasks,
            "window": self.window,
            "steepness": self.steepness,
            "target": self.target,
            "eps": self.eps,
        }

    # ---------------------------------------------------------------- losses (a weighting)
    def loss_medians(self) -> Tensor | None:
        """The running median of each task's loss (``[m]``), or ``None`` before any step."""
        return None if self.loss_window is None else running_median(self.loss_window)

    def current_weights(self, losses: Tensor) -> Tensor:
        med = self.loss_medians()
        ref = losses.detach() if med is None else med.to(device=losses.device, dtype=losses.dtype)
        return (self.target / ref.abs().clamp_min(self.eps)).detach()

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        w = self.current_weights(losses)
        return WeightedLosses(w * losses, w)

    def observe(self, losses: Tensor, present: tuple[int, ...] | None = None) -> None:
        x = losses.detach().to(torch.float64).reshape(1, -1)
        if self.loss_window is not None:
            x = torch.cat([self.loss_window, x.to(self.loss_window.device)])[-self.window :]
        self.loss_window = x

    # ---------------------------------------------------------------- rewards (a GRPO loop)
    def reward_medians(self) -> Tensor | None:
        """The running median of each task's per-batch median reward (``[m]``; NaN for a task
        never seen), or ``None`` before any reward."""
        return None if self.reward_window is None else running_median(self.reward_window)

    def observe_rewards(self, rewards: Tensor, tasks: Tensor | Sequence[int]) -> None:
        """Push this batch's median reward of each task present into its window."""
        r = torch.as_tensor(rewards).detach().to(torch.float64).reshape(-1)
        k = torch.as_tensor(tasks).reshape(-1).to(torch.long)
        if r.shape != k.shape:
            raise ValueError(f"rewards {tuple(r.shape)} and tasks {tuple(k.shape)} differ")
        if bool((k < 0).any()) or bool((k >= self.num_tasks).any()):
            raise ValueError(f"task indices must lie in [0, {self.num_tasks}), got {k.tolist()}")
        if not bool(torch.isfinite(r).all()):
            raise ValueError("MedGRPO: non-finite reward")
        row = torch.full((1, self.num_tasks), float("nan"), dtype=torch.float64)
        for t in k.unique().tolist():
            row[0, t] = torch.quantile(r[k == t], 0.5)
        if self.reward_window is None:
            # an empty window: NaN rows count for nothing in the median
            win = torch.full((self.window, self.num_tasks), float("nan"), dtype=torch.float64)
        else:
            win = self.reward_window
        present = ~torch.isnan(row[0])
        # shift each present task's column by one and append its value; absent tasks keep theirs
        shifted = torch.cat([win[1:], row.to(win.device)])
        self.reward_window = torch.where(present.to(win.device), shifted, win)

    def normalize_rewards(
        self, rewards: Tensor, tasks: Tensor | Sequence[int], *, update: bool = True
    ) -> Tensor:
        """``σ(κ (r − med_k))`` for each reward ``r`` of task ``k`` (``[n]``, with ``tasks``
        the ``[n]`` task index of each reward). ``update``: push this batch into the medians
        first (default), so the first batch is normalised by its own medians."""
        r = torch.as_tensor(rewards)
        k = torch.as_tensor(tasks).reshape(-1).to(torch.long)
        if update:
            self.observe_rewards(r, k)
        med = self.reward_medians()
        if med is None or bool(torch.isnan(med[k]).any()):
            raise ValueError(
                "MedGRPO.normalize_rewards: a task without any observed reward (call it with "
                "update=True, or observe_rewards first)"
            )
        return logistic_normalize(r, med[k].to(device=r.device, dtype=r.dtype), self.steepness)
