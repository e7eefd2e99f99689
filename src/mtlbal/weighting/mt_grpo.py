"""MT-GRPO — improvement-aware task weights and the ratio-preserving task sampler (Ramesh, Ji,
Zimmer, Yoon, Wang, Bou Ammar, Lucchi, Bogunovic, "Multi-Task GRPO: Reliable LLM Reasoning
Across Tasks", arXiv:2602.05547; official code: rsshyam/MT-GRPO).

Task weights ``z = softmax(ξ)`` (``ξ`` the task logits, initially 0) are updated after every
policy step by the improvement-aware weight update (IWU, the paper's Subroutine 1) from the
task rewards ``J_k`` and the task improvements ``I_k`` (the change of task ``k``'s objective
over the step):

    s_k = I_k + λ J_k,          g_k = z_k (s_k − Σ_j z_j s_j),          ξ ← ξ − β g

so the tasks with a low reward that are improving little gain weight (``λ → ∞``: strict
worst-task reward maximisation, which collapses onto the current worst task; small ``λ``:
balanced improvement). The paper implements the ``ξ`` step with AdamW (``β = 0.025``, weight
decay ``1e-5`` / ``1e-4``) and clips the improvements to ``[−c, c]`` (``c`` of 0.1 or 0.2);
``optimizer="sgd"`` gives Subroutine 1's plain step. Defaults: ``λ = 0.2`` (the 3-task
experiment), AdamW with ``lr = 0.025``, betas (0.9, 0.999), weight decay ``1e-5``, ``c = 0.1``.

Two ways to feed it:

* **RL loop** (GRPO): :meth:`MTGRPO.update_from_rewards` with the per-task batch rewards
  ``J_k(θ_t)`` and improvements ``I_k`` you measured; read :meth:`MTGRPO.task_weights` to
  weight the per-task policy losses, or sample the next batch with
  :class:`RatioPreservingSampler`.
* **Supervised losses** (a loss weighting in a :class:`~mtlbal.Balancer`): the objectives are
  ``w_t · L_t`` with ``w = m · z`` (``reduction="sum"``, default; ``z`` with ``"mean"``); after
  ``optimizer.step()`` call ``balancer.update(losses re-evaluated on the same batch)``
  (``Need.LOSSES_AFTER_STEP``, as for FAMO). The reward of task ``k`` is then ``J_k = −L_k``
  before the step and its improvement ``I_k = L_k(before) − L_k(after)`` (a choice: the paper
  defines rewards for RL only).

The **ratio-preserving sampler** (the paper's Algorithm 2, the part that concerns the data): each
batch's target task counts are ``n ~ Multinomial(B, z)``; the counts actually drawn come from
the inflated distribution ``ẑ_k ∝ z_k m_k``, ``m_k = min(1/(1 − ρ_k), M_acc)``, over
``⌈M_os B⌉`` draws, where ``ρ_k`` is a running estimate of the fraction of task ``k``'s samples
your filter drops (GRPO's zero-advantage prompts; :meth:`RatioPreservingSampler.record_filtered`).
:meth:`RatioPreservingSampler.trim` then keeps at most ``n_k`` accepted samples of each task and
tops the batch up to ``B`` from the other accepted ones (Algorithm 2, lines 27–33). Without a
filter (``ρ = 0``, ``M_os = 1``) every batch has ``B`` samples whose task counts are
``Multinomial(B, z)``. The regeneration rounds of Algorithm 2 (lines 13–26) need the rollouts:
they stay in your loop (draw another batch).

Missing tasks: a step without some tasks' losses is refused (the logit step is over every task).

Example:
    >>> import torch
    >>> mt = MTGRPO(3, lam=1.0, optimizer="sgd", lr=1.0, improvement_clip=None)
    >>> mt.update_from_rewards(torch.tensor([0.9, 0.2, 0.5]), torch.zeros(3))
    >>> z = mt.task_weights()
    >>> bool(z[1] > z[2] > z[0])  # the worst task gains the most weight
    True
    >>> sampler = RatioPreservingSampler([10, 10, 10], batch_size=6, weights=mt, seed=0)
    >>> batch = next(iter(sampler))  # global indices into ConcatDataset([d0, d1, d2])
    >>> len(batch)
    6
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Sampler

from mtlbal.step import Need
from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["MTGRPO", "RatioPreservingSampler", "iwu_logit_grad"]


def iwu_logit_grad(logits: Tensor, rewards: Tensor, improvements: Tensor, lam: float) -> Tensor:
    """Subroutine 1's ``g``: ``z ⊙ (s − zᵀs)`` with ``s = I + λJ`` and ``z = softmax(ξ)``
    (``[K]`` each)."""
    z = torch.softmax(logits, dim=0)
    s = improvements + lam * rewards
    return z * (s - (z * s).sum())


class MTGRPO(LossWeighting):
    """Improvement-aware task weights (MT-GRPO's IWU) for RL rewards or supervised losses.

    Args:
        num_tasks: ``K``.
        lam: ``λ``, the reward/improvement trade-off (0.2).
        lr: ``β`` (0.025).
        weight_decay: AdamW's decoupled decay of the logits (1e-5; ``"sgd"``: none).
        optimizer: ``"adamw"`` (the paper's implementation, default) or ``"sgd"``
            (Subroutine 1's ``ξ ← ξ − βg``).
        betas, adam_eps: AdamW's (0.9, 0.999) and 1e-8.
        improvement_clip: ``c``: the improvements are clipped to ``[−c, c]`` (0.1; ``None``:
            no clip).
        reduction: ``"sum"`` (weights ``K·z``, default) or ``"mean"`` (``z``).
    """

    needs = frozenset({Need.LOSSES_AFTER_STEP})
    supports_missing_tasks = False
    missing_tasks_note = (
        "MT-GRPO's weights are a softmax over every task's logit and its logit step uses every "
        "task's reward and improvement; give every task a loss in every step"
    )

    num_tasks: int
    logits: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    adam_step: Tensor
    prev_losses: Tensor | None

    def __init__(
        self,
        num_tasks: int,
        *,
        lam: float = 0.2,
        lr: float = 0.025,
        weight_decay: float = 1e-5,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        improvement_clip: float | None = 0.1,
        reduction: Literal["sum", "mean"] = "sum",
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        if lam < 0 or lr <= 0 or weight_decay < 0:
            raise ValueError(
                f"need lam ≥ 0, lr > 0 and weight_decay ≥ 0, got {lam}, {lr}, {weight_decay}"
            )
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if improvement_clip is not None and improvement_clip <= 0:
            raise ValueError(f"improvement_clip must be > 0 or None, got {improvement_clip}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.num_tasks = num_tasks
        self.lam = float(lam)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.optimizer: Literal["adamw", "sgd"] = optimizer
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = float(adam_eps)
        self.improvement_clip = None if improvement_clip is None else float(improvement_clip)
        self.reduction: Literal["sum", "mean"] = reduction
        self.add_state("logits", torch.zeros(num_tasks, dtype=torch.float64))
        self.add_state("exp_avg", torch.zeros(num_tasks, dtype=torch.float64))
        self.add_state("exp_avg_sq", torch.zeros(num_tasks, dtype=torch.float64))
        self.add_state("adam_step", torch.zeros((), dtype=torch.float64))
        self.add_state("prev_losses", None)

    def hparams(self) -> dict[str, object]:
        return {
            "num_tasks": self.num_tasks,
            "lam": self.lam,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "optimizer": self.optimizer,
            "betas": self.betas,
            "adam_eps": self.adam_eps,
            "improvement_clip": self.improvement_clip,
            "reduction": self.reduction,
        }

    def task_weights(self) -> Tensor:
        """``z = softmax(ξ)`` (``[K]``, sums to 1)."""
        return torch.softmax(self.logits, dim=0)

    def _mult(self) -> float:
        return float(self.num_tasks) if self.reduction == "sum" else 1.0

    def current_weights(self, losses: Tensor) -> Tensor:
        z = self.task_weights().to(device=losses.device, dtype=losses.dtype)
        return (z * self._mult()).detach()

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        w = self.current_weights(losses)
        self.prev_losses = losses.detach().clone()
        return WeightedLosses(w * losses, w)

    def update(self, losses: Tensor) -> None:
        """Supervised use: the losses re-evaluated on the same batch after the optimizer
        step; rewards ``−L(before)``, improvements ``L(before) − L(after)``."""
        if self.prev_losses is None:
            raise ValueError(
                "MTGRPO.update() needs the losses of a previous backward: call "
                "balancer.backward(losses) and optimizer.step() first"
            )
        dev, dt = self.logits.device, self.logits.dtype
        after = losses.detach().to(device=dev, dtype=dt).reshape(-1)
        if after.shape != self.logits.shape:
            raise ValueError(f"MTGRPO has {self.num_tasks} tasks, got {after.shape[0]} losses")
        before = self.prev_losses.to(device=dev, dtype=dt)
        self.update_from_rewards(-before, before - after)

    def update_from_rewards(self, rewards: Tensor, improvements: Tensor) -> None:
        """One IWU step from the per-task rewards ``J_k(θ_t)`` and improvements ``I_k``
        (``[K]`` each; the improvements are clipped to ``[−c, c]`` first)."""
        dev, dt = self.logits.device, self.logits.dtype
        j = torch.as_tensor(rewards).detach().to(device=dev, dtype=dt).reshape(-1)
        i = torch.as_tensor(improvements).detach().to(device=dev, dtype=dt).reshape(-1)
        if j.shape != self.logits.shape or i.shape != self.logits.shape:
            raise ValueError(
                f"MTGRPO has {self.num_tasks} tasks: rewards and improvements must be "
                f"[{self.num_tasks}], got {tuple(j.shape)} and {tuple(i.shape)}"
            )
        if not (bool(torch.isfinite(j).all()) and bool(torch.isfinite(i).all())):
            raise ValueError("MTGRPO: non-finite reward or improvement")
        if self.improvement_clip is not None:
            i = i.clamp(-self.improvement_clip, self.improvement_clip)
        g = iwu_logit_grad(self.logits, j, i, self.lam)
        if self.optimizer == "sgd":
            self.logits = self.logits - self.lr * g
            return
        b1, b2 = self.betas
        step = self.adam_step + 1
        logits = self.logits * (1 - self.lr * self.weight_decay)  # decoupled (AdamW)
        exp_avg = self.exp_avg * b1 + (1 - b1) * g
        exp_avg_sq = self.exp_avg_sq * b2 + (1 - b2) * g * g
        denom = (exp_avg_sq / (1 - b2**step)).sqrt() + self.adam_eps
        self.logits = logits - self.lr * (exp_avg / (1 - b1**step)) / denom
        self.exp_avg, self.exp_avg_sq, self.adam_step = exp_avg, exp_avg_sq, step


class RatioPreservingSampler(Sampler[list[int]]):
    """A batch sampler whose batches' task mix follows the task weights (MT-GRPO's RP sampler).

    The tasks' datasets are concatenated in order (``torch.utils.data.ConcatDataset``): task
    ``k``'s samples are the global indices ``offset_k … offset_k + sizes[k] − 1``. Pass it as
    ``DataLoader(concat, batch_sampler=sampler)``. Within a task, samples are drawn without
    replacement from a seeded permutation that is redrawn when used up.

    Args:
        sizes: number of samples of each task.
        batch_size: ``B``.
        weights: the task weights, read at each batch: a ``[K]`` tensor (normalised), an
            :class:`MTGRPO` (its :meth:`~MTGRPO.task_weights`) or any object with a
            ``task_weights()`` method; default uniform. :meth:`set_weights` replaces it.
        num_batches: batches per epoch (default ``sum(sizes) // B``).
        oversample: ``M_os``: each batch draws ``⌈M_os·B⌉`` samples, for a filter to drop
            some (1: no oversampling).
        max_inflation: ``M_acc``, the cap of ``1/(1 − ρ_k)`` (5).
        filter_momentum: the running estimate ``ρ_k ← μ ρ_k + (1 − μ)·(dropped fraction)``
            (0.9; a choice, the paper does not give its estimator).
        seed: the generator's seed.

    Its ``state_dict`` holds the generator, the permutations and their cursors, ``ρ``, the
    position in the epoch and the last target counts: loading it resumes the same sequence
    (with the same weights). The weights are read when a batch is drawn: a ``DataLoader`` with
    workers draws (and saves the sampler's position) a few batches ahead of training, so for
    batches that follow the latest weights, and an exact resume, use ``num_workers=0`` or call
    :meth:`next_batch` yourself.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        weights: Any = None,
        *,
        num_batches: int | None = None,
        oversample: float = 1.0,
        max_inflation: float = 5.0,
        filter_momentum: float = 0.9,
        seed: int = 0,
    ) -> None:
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise ValueError(f"every task needs at least one sample, got sizes {self.sizes}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if oversample < 1 or max_inflation < 1 or not 0 <= filter_momentum < 1:
            raise ValueError(
                "need oversample ≥ 1, max_inflation ≥ 1 and 0 ≤ filter_momentum < 1, got "
                f"{oversample}, {max_inflation}, {filter_momentum}"
            )
        self.batch_size = int(batch_size)
        self.num_batches = (
            int(num_batches) if num_batches is not None else max(1, sum(self.sizes) // batch_size)
        )
        self.oversample = float(oversample)
        self.max_inflation = float(max_inflation)
        self.filter_momentum = float(filter_momentum)
        self.offsets = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        self.seed = int(seed)
        self._weights = weights
        self._gen = torch.Generator().manual_seed(self.seed)
        self._perms: list[Tensor] = [torch.randperm(s, generator=self._gen) for s in self.sizes]
        self._cursors = [0] * len(self.sizes)
        self.rho = torch.zeros(len(self.sizes), dtype=torch.float64)
        self.position = 0  # batches yielded in the current epoch
        self.epoch = 0
        self.last_targets: Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.sizes)

    def set_weights(self, weights: Any) -> None:
        """Replace the weights source (a ``[K]`` tensor or an object with ``task_weights()``)."""
        self._weights = weights

    def weights(self) -> Tensor:
        """The current task weights ``z`` (``[K]``, float64, summing to 1)."""
        src = self._weights
        if src is None:
            z = torch.ones(self.num_tasks, dtype=torch.float64)
        elif hasattr(src, "task_weights"):
            z = src.task_weights()
        else:
            z = torch.as_tensor(src)
        z = z.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if z.shape[0] != self.num_tasks or not bool(torch.isfinite(z).all()) or bool((z < 0).any()):
            raise ValueError(
                f"the sampler's weights must be {self.num_tasks} finite non-negative numbers, "
                f"got {z.tolist()}"
            )
        if float(z.sum()) <= 0:
            raise ValueError("the sampler's weights sum to 0")
        return z / z.sum()

    def inflation(self) -> Tensor:
        """``m_k = min(1/(1 − ρ_k), M_acc)`` (``[K]``)."""
        return (1.0 / (1.0 - self.rho).clamp_min(1e-12)).clamp(max=self.max_inflation)

    def _take(self, k: int, n: int) -> list[int]:
        out: list[int] = []
        while n > 0:
            perm, c = self._perms[k], self._cursors[k]
            got = perm[c : c + n]
            out.extend(int(i) + self.offsets[k] for i in got)
            n -= got.numel()
            self._cursors[k] = c + got.numel()
            if self._cursors[k] >= self.sizes[k]:
                self._perms[k] = torch.randperm(self.sizes[k], generator=self._gen)
                self._cursors[k] = 0
        return out

    def next_batch(self) -> list[int]:
        """Draw one batch: the target counts ``n ~ Multinomial(B, z)`` (kept in
        :attr:`last_targets`), then ``⌈M_os·B⌉`` samples from ``ẑ ∝ z ⊙ m``."""
        z = self.weights()
        targets = torch.multinomial(z, self.batch_size, replacement=True, generator=self._gen)
        self.last_targets = torch.bincount(targets, minlength=self.num_tasks)
        draws = math.ceil(self.oversample * self.batch_size)
        if draws == self.batch_size and bool((self.rho == 0).all()):
            counts = self.last_targets
        else:
            zhat = z * self.inflation()
            picks = torch.multinomial(
                zhat / zhat.sum(), draws, replacement=True, generator=self._gen
            )
            counts = torch.bincount(picks, minlength=self.num_tasks)
        batch: list[int] = []
        for k in range(self.num_tasks):
            batch.extend(self._take(k, int(counts[k])))
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while self.position < self.num_batches:
            batch = self.next_batch()
            self.position += 1
            yield batch
        self.position = 0
        self.epoch += 1

    def __len__(self) -> int:
        return self.num_batches

    def task_of(self, index: int) -> int:
        """The task of a global index."""
        for k in range(self.num_tasks - 1, -1, -1):
            if index >= self.offsets[k]:
                return k
        raise ValueError(f"negative index {index}")

    def record_filtered(
        self, generated: Sequence[int] | Tensor, kept: Sequence[int] | Tensor
    ) -> None:
        """Update ``ρ`` from one batch: per task, how many samples were generated and how many
        the filter kept (``[K]`` counts each; a task with none generated keeps its ``ρ``)."""
        gen = torch.as_tensor(generated, dtype=torch.float64).reshape(-1)
        kep = torch.as_tensor(kept, dtype=torch.float64).reshape(-1)
        if gen.shape[0] != self.num_tasks or kep.shape[0] != self.num_tasks:
            raise ValueError(f"need {self.num_tasks} counts for generated and kept")
        if bool((kep > gen).any()) or bool((kep < 0).any()):
            raise ValueError("kept counts must satisfy 0 ≤ kept ≤ generated")
        has = gen > 0
        dropped = torch.where(has, 1 - kep / gen.clamp_min(1), 0.0)
        mu = self.filter_momentum
        self.rho = torch.where(has, mu * self.rho + (1 - mu) * dropped, self.rho).clamp(0, 1)

    def trim(self, accepted: Sequence[int]) -> list[int]:
        """Algorithm 2's last step: from the accepted global indices of the last batch, keep at
        most ``n_k`` of each task (in order), then top up to ``B`` with a seeded random choice
        of the others."""
        if self.last_targets is None:
            raise ValueError("trim() needs a batch drawn first")
        acc = list(accepted)
        if len(acc) <= self.batch_size:
            return acc
        left = [int(n) for n in self.last_targets]
        kept, rest = [], []
        for i in acc:
            k = self.task_of(i)
            if left[k] > 0:
                kept.append(i)
                left[k] -= 1
            else:
                rest.append(i)
        need = self.batch_size - len(kept)
        if need > 0:
            order = torch.randperm(len(rest), generator=self._gen)[:need]
            kept.extend(rest[int(j)] for j in sorted(order.tolist()))
        return kept

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self._gen.get_state(),
            "perms": [p.clone() for p in self._perms],
            "cursors": list(self._cursors),
            "rho": self.rho.clone(),
            "position": self.position,
            "epoch": self.epoch,
            "last_targets": None if self.last_targets is None else self.last_targets.clone(),
            "sizes": list(self.sizes),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["sizes"]) != self.sizes or int(state["batch_size"]) != self.batch_size:
            raise ValueError(
                f"the state is of a sampler with sizes {list(state['sizes'])} and batch_size "
                f"{state['batch_size']}, this one has {self.sizes} and {self.batch_size}"
            )
        self._gen.set_state(state["generator"])
        self._perms = [p.clone() for p in state["perms"]]
        self._cursors = [int(c) for c in state["cursors"]]
        self.rho = state["rho"].clone()
        self.position = int(state["position"])
        self.epoch = int(state["epoch"])
        lt = state["last_targets"]
        self.last_targets = None if lt is None else lt.clone()
