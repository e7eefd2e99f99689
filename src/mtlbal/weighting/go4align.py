"""GO4Align — group optimization for multi-task alignment (Shen, Wang, Xiao, van Noord &
Worring, NeurIPS 2024, arXiv:2404.06486).

Adaptive group risk minimisation: tasks whose *risk-guided indicators* are close are put in one
group and share one weight. Per step, with the current losses ``L`` (``[m]``, detached):

* scale-balance factor ``β_t = (Σ_s L_s) / L_t`` (a task with a small loss is scaled up);
* smooth-alignment factor ``α``, a running exponential reweighting of the risks,

      α ← α ⊙ exp(−η L) / Σ(α ⊙ exp(−η L)),     α₀ = 1/m,

  i.e. ``α = softmax(−η Σ_τ L(τ))`` over every step so far, this one included (``η`` =
  ``step_size``, 1e-4);
* indicators ``γ = β ⊙ α``;
* group assignment: K-means of the ``m`` scalars ``γ_t`` into ``K`` = ``num_groups`` groups;
  every task of group ``k`` gets the group's centroid ``ω_k`` (the mean of its ``γ``):

      ℓ_t = ω_{g(t)} · L_t.

With ``K = m`` every task keeps its own ``γ_t``; with ``K = 1`` every task gets ``mean(γ)``.
Scale: ``Σ_t γ_t L_t = Σ_t L_t · Σ_t α_t = Σ_t L_t``, so equal losses give ``w = 1`` (the
sum), the library's ``"sum"`` convention, as the official code.

K-means here is the **exact** one-dimensional optimum (a dynamic programme over the sorted
``γ``, O(K m²), on the losses' device, no host sync; groups are numbered by increasing
centroid). The official code runs Lloyd's K-means from ``kmeans_pytorch`` (random initial
centres from the global RNG; a local optimum that can differ between runs, and the import is
commented out in the released file, so ``num_groups ≥ 2`` needs that package installed). Both
agree wherever Lloyd reaches the optimum (e.g. well-separated indicators).

State (``state_dict``): ``α`` (``risk_probs``, ``[m]``) and the last group assignment
(``groups``, ``[m]`` int64, for inspection; it is recomputed every step). A refused step
changes neither. The weights themselves are not learned: nothing to put in an optimizer.

Defaults: ``η = 1e-4`` (official); ``num_groups = 2``. The official NYUv2 trainer's default is
``--num_groups 1``, which gives every task the same weight ``mean(γ)`` (no grouping at all);
choose ``K`` between 2 and ``m − 1`` to get the method's grouping.

Domain: ``β`` divides by each loss, so every loss must be ``> 0``; a step with ``L_t ≤ 0`` is
refused naming the task (through the Balancer's one host sync). The official code has no check
(it yields inf/NaN weights).

Shapes: ``L`` ``[m]`` → weights ``[m]``.

Example:
    >>> import torch
    >>> losses = torch.tensor([1.0, 2.0, 4.0])
    >>> GO4Align(3, num_groups=3, step_size=0.0)(losses)  # one group each: γ = (ΣL / L) / 3
    tensor([2.3333, 1.1667, 0.5833])
    >>> GO4Align(3, num_groups=2, step_size=0.0)(losses)  # {2.33}, {1.17, 0.58}
    tensor([2.3333, 0.8750, 0.8750])
    >>> GO4Align(3, num_groups=1, step_size=0.0)(losses)  # one group: mean(γ)
    tensor([1.3611, 1.3611, 1.3611])
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["GO4Align", "go4align_indicators", "go4align_weights", "kmeans_1d"]


def go4align_indicators(
    losses: Tensor, risk_probs: Tensor, step_size: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """``(γ, α')``: the risk-guided indicators ``γ = (ΣL / L) ⊙ α'`` and the updated
    smooth-alignment factor ``α' ∝ α ⊙ exp(−η L)`` (``[m]`` each)."""
    alpha = risk_probs * torch.exp(-step_size * losses)
    alpha = alpha / alpha.sum()
    return losses.sum() / losses * alpha, alpha


def kmeans_1d(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact K-means of ``m`` scalars: ``(labels [m] int64, centroids [k])``.

    The global minimum of the within-group sum of squares (a dynamic programme over the sorted
    values, O(k m²) work, no host sync). Groups are contiguous in sorted order and numbered by
    increasing centroid; ties between equally good partitions go to the first split in sorted
    order (a stable sort keeps the input order of equal values).
    """
    m = values.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"k must be between 1 and the number of values ({m}), got {k}")
    work = torch.float64 if values.device.type != "mps" else torch.float32
    x, order = torch.sort(values.detach().to(work), stable=True)
    c = x - x.mean()  # the sums of squares are shift-invariant: centring limits cancellation
    zero = x.new_zeros(1)
    p1 = torch.cat([zero, c.cumsum(0)])
    p2 = torch.cat([zero, (c * c).cumsum(0)])
    idx = torch.arange(m, device=x.device)
    count = (idx[None, :] - idx[:, None] + 1).to(work).clamp_min(1)
    seg = p1[None, 1:] - p1[:-1, None]  # [start i, end j]: Σ x[i..j]
    sq = p2[None, 1:] - p2[:-1, None]
    inf = torch.tensor(float("inf"), dtype=work, device=x.device)
    # the within-group sum of squares of x[i..j]; +inf below the diagonal (no such group)
    below = torch.full((m, m), float("inf"), dtype=work, device=x.device).tril(-1)
    cost = torch.maximum(sq - seg * seg / count, inf.new_zeros(())) + below
    best = cost[0]  # best[j]: the optimum of x[0..j] in the current number of groups
    starts = [torch.zeros(1, dtype=torch.long, device=x.device)]
    back = []
    for _ in range(1, k):
        shifted = torch.cat([inf.view(1), best[:-1]])  # the optimum of x[0..i-1]
        cand = shifted[:, None] + cost  # [start i, end j]
        arg = cand.argmin(dim=0)  # the first best start (ties: the earliest split)
        best = cand.gather(0, arg.view(1, -1)).view(-1)
        back.append(arg)
    # walk back: the last group starts at arg[end] (gathers, not a 0-d index: no host read)
    end = torch.full((1,), m - 1, dtype=torch.long, device=x.device)
    for arg in reversed(back):
        start = arg.gather(0, end)
        starts.append(start)
        end = start - 1
    bounds = torch.sort(torch.cat(starts)).values  # [k] ascending group starts, 0 first
    labels_sorted = (idx[:, None] >= bounds[None, :]).sum(1) - 1
    sums = torch.zeros(k, dtype=work, device=x.device).index_add(0, labels_sorted, x)
    counts = torch.zeros(k, dtype=work, device=x.device).index_add(
        0, labels_sorted, torch.ones_like(x)
    )
    centroids = (sums / counts).to(values.dtype)
    labels = torch.empty_like(labels_sorted).scatter_(0, order, labels_sorted)
    return labels, centroids


def go4align_weights(indicators: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """``(w, labels)``: each task's group centroid ``ω_{g(t)}`` after exact K-means of the
    indicators ``γ`` into ``num_groups`` groups (``[m]`` each)."""
    labels, centroids = kmeans_1d(indicators, num_groups)
    return centroids[labels], labels


class GO4Align(LossWeighting):
    """Group optimisation for multi-task alignment: K-means groups of risk-guided indicators.

    Args:
        num_tasks: ``m``.
        num_groups: ``K`` (1 ≤ K ≤ m; 2).
        step_size: ``η`` of the smooth-alignment factor (1e-4).
    """

    risk_probs: Tensor
    groups: Tensor | None
    num_tasks: int

    supports_missing_tasks = False
    missing_tasks_note = (
        "its smooth-alignment factor is a softmax over every task's cumulative loss and the "
        "groups are a K-means over all tasks' indicators: a step without a task has no "
        "defined update of either"
    )

    def __init__(self, num_tasks: int, *, num_groups: int = 2, step_size: float = 1e-4) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        if not 1 <= num_groups <= num_tasks:
            raise ValueError(
                f"num_groups must be between 1 and num_tasks ({num_tasks}), got {num_groups}"
            )
        if not step_size >= 0:
            raise ValueError(f"step_size must be ≥ 0, got {step_size}")
        self.num_tasks = num_tasks
        self.num_groups = int(num_groups)
        self.step_size = float(step_size)
        self.add_state("risk_probs", torch.full((num_tasks,), 1.0 / num_tasks))
        self.add_state("groups", None)

    def hparams(self) -> dict[str, object]:
        return {
            "num_tasks": self.num_tasks,
            "num_groups": self.num_groups,
            "step_size": self.step_size,
        }

    def _check_m(self, losses: Tensor) -> None:
        if losses.dim() != 1 or losses.shape[0] != self.num_tasks:
            raise ValueError(f"GO4Align has {self.num_tasks} tasks, got {tuple(losses.shape)}")

    def _step(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        alpha = self.risk_probs.to(device=raw.device, dtype=raw.dtype)
        gamma, new_alpha = go4align_indicators(raw, alpha, self.step_size)
        w, labels = go4align_weights(gamma, self.num_groups)
        return w, labels, new_alpha

    def current_weights(self, losses: Tensor) -> Tensor:
        """The weights this step would give ``losses`` (``α`` updated with them), without
        changing the state."""
        raw = losses.detach()
        self._check_m(raw)
        return self._step(raw)[0]

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        raw = losses.detach()
        self._check_m(raw)
        w, labels, new_alpha = self._step(raw)
        # replaced, never mutated: a refused step puts the previous tensors back
        self.risk_probs = new_alpha.to(self.risk_probs.dtype)
        self.groups = labels
        what = "GO4Align's scale-balance factor ΣL / L_t divides by each loss: it needs L_t > 0"
        return WeightedLosses(w * losses, w, domain=(raw > 0, what))
