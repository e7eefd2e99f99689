"""CoBa — Convergence Balancer (Gong, Yu, Liao, Liu, Chen, Li, EMNLP 2024, arXiv:2410.06741;
official code: codefuse-ai/MFTCoder, ``mftcoder_accelerate/src/utils/loss_utils.py``).

Weights from how fast each task's **validation** loss is converging. The validation losses are
fed with :meth:`mtlbal.Balancer.observe_validation` (``Need.VALIDATION``) and normalised by the
first ones, ``ṽ_t = v_t / v_t(0)``. At each validation observation after the warm-up, with
``α_t`` the least-squares slope of ``ṽ_t`` against the training step over the last ``N``
observations and ``α_max`` the slope of ``max_t ṽ_t``:

    RCS = softmax_t( m · α_t / Σ_j |α_j| )                       relative convergence score
    ACS = softmax_t( −W · α_t / Σ_{k ∈ window} |α_t(k)| )         absolute convergence score
    DF  = min( S · softmax_k( −τ S · α_max(k) / Σ_k' |α_max(k')| )[last], 1 )
    ω   = DF · RCS + (1 − DF) · ACS                              (weights, Σ ω = 1)

``W`` is the number of slope entries in the ACS window (the last ``N``) and ``S`` the number
of ``α_max`` entries since the warm-up (the whole history, as in the paper and the code).
A task whose loss falls more slowly than the others' (RCS), or whose loss has started to rise
against its own history (ACS, which then *lowers* it), gets its weight moved; ``DF`` shifts the
mix from ACS to RCS while no task diverges (``α_max < 0``), and back to ACS when one does.

The objectives are ``w_t · L_t`` with ``w = m · ω`` (``reduction="sum"``, default: equal
weights are 1, as with ``Σ_t L_t``) or ``w = ω`` (``"mean"``, the paper's). Before the first
weights (the warm-up) every weight is ``1`` (``1/m`` with ``"mean"``).

Where the paper and the official code differ (``variant``):

* ``"paper"`` (default): the equations above.
* ``"code"``: as MFTCoder computes it: ``DF`` is not clipped at 1 (``1 − DF`` can be
  negative), a second softmax ``w = softmax(m · ω)`` follows, and any weight below
  ``1/(10m)`` triggers the floor ``w ← 0.9 w + 0.1/m``.

Either way, two defects of the code are not reproduced: its ACS window slices the slope
history with an absolute step index (the effective window is ``N − warmup + 1`` slopes once the
run is longer than ``N`` steps; here it is the last ``N``), and its slope fit drops zero losses
and then truncates ``x``, misaligning the points (here every task has a loss at every
observation: :meth:`~mtlbal.Balancer.observe_validation` requires it).

Schedule: ``warmup_steps`` counts committed training steps (the code's ``coba_warmup_steps``,
100); the slopes are fitted against the training step at which each validation loss was
observed, so feeding every step (the paper: one validation batch per step) and feeding every
``k`` steps or every epoch give the same scores for the same curves. The weights change only
when validation losses arrive. A run whose warm-up has ended with fewer than two validation
observations (a slope needs two points) is refused at its next step with a ``ValueError`` that
says how to feed them: CoBa never silently stays at equal weights.

State (saved by ``state_dict``): ``v0`` ``[m]``; the last ``N`` observation steps and
normalised losses (``[n]``, ``[n, m]``); the last ``N`` per-task slopes ``[s, m]``; every
``α_max`` since the warm-up ``[S]`` (one float per observation); the current weights ``[m]``;
the step and observation counters. The history is float64.

Missing tasks: a training step without some tasks' losses is refused (the weights are a joint
softmax over every task).

Defaults (paper / code): ``N = 200`` (``coba_history_length``), ``τ = 5``, warm-up 100 steps.

Example:
    >>> import torch
    >>> coba = CoBa(2, warmup_steps=2, history=10)
    >>> for step in range(4):  # one committed training step, then one validation observation
    ...     coba.observe(torch.ones(2))
    ...     coba.observe_validation(torch.tensor([1.0 - 0.2 * step, 1.0 - 0.01 * step]))
    >>> w = coba.current_weights(torch.ones(2))
    >>> bool(w[1] > w[0])  # task 1 converges more slowly: it gets more weight
    True
    >>> round(float(w.sum()), 6)  # reduction="sum": the weights sum to m
    2.0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from mtlbal.step import Need
from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["CoBa", "coba_scores", "coba_weights", "window_slope"]


def _safe_div(x: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, x / torch.where(den > 0, den, torch.ones_like(den)), 0.0)


def window_slope(x: Tensor, y: Tensor) -> Tensor:
    """Least-squares slope of each column of ``y`` (``[n, m]``) against ``x`` (``[n]``), all
    points weighted 1; ``0`` with fewer than two distinct ``x``."""
    if x.numel() < 2:
        return torch.zeros(y.shape[1:], dtype=y.dtype, device=y.device)
    xc = x - x.mean()
    yc = y - y.mean(dim=0)
    return _safe_div((xc.unsqueeze(-1) * yc).sum(dim=0), (xc * xc).sum())


def coba_scores(
    slopes: Tensor, window: Tensor, max_slopes: Tensor, tau: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(RCS [m], ACS [m], DF)`` before any clipping.

    ``slopes``: the current ``α_t`` (``[m]``); ``window``: the ACS window of slopes ``[W, m]``
    whose last row is ``slopes``; ``max_slopes``: every ``α_max`` since the warm-up ``[S]``,
    the current one last. A zero denominator (every slope 0) gives a zero logit.
    """
    m = slopes.shape[0]
    rcs = torch.softmax(_safe_div(m * slopes, slopes.abs().sum()), dim=0)
    w = window.shape[0]
    acs = torch.softmax(_safe_div(-w * slopes, window.abs().sum(dim=0)), dim=0)
    s = max_slopes.shape[0]
    logits = _safe_div(-tau * s * max_slopes, max_slopes.abs().sum())
    df = s * torch.softmax(logits, dim=0)[-1]
    return rcs, acs, df


def coba_weights(
    rcs: Tensor, acs: Tensor, df: Tensor, variant: Literal["paper", "code"] = "paper"
) -> Tensor:
    """The mix ``ω`` (``"paper"``: ``DF`` clipped at 1) or the code's twice-softmaxed,
    floored weights (``"code"``); ``[m]``, summing to 1."""
    m = rcs.shape[0]
    if variant == "paper":
        d = df.clamp(max=1.0)
        return d * rcs + (1 - d) * acs
    w = torch.softmax(m * (df * rcs + (1 - df) * acs), dim=0)
    floor = 1.0 / (10 * m)
    if bool((w < floor).any()):
        w = w * (1 - floor * m) + floor
    return w


class CoBa(LossWeighting):
    """Convergence balancer: weights from the slopes of the validation losses.

    Args:
        num_tasks: ``m``.
        warmup_steps: committed training steps with equal weights before the first CoBa
            weights (100, the code's default); by its end at least two validation
            observations are needed.
        history: ``N``, the number of validation observations in the slope window, and of
            slopes in the ACS window (200).
        tau: ``τ`` of the divergence factor (5).
        variant: ``"paper"`` (default) or ``"code"``; see the module documentation.
        reduction: ``"sum"`` (weights sum to ``m``, default) or ``"mean"`` (sum to 1).
    """

    needs = frozenset({Need.VALIDATION})
    supports_missing_tasks = False
    missing_tasks_note = (
        "CoBa's weights are a joint softmax over every task's convergence slope; a step "
        "without some tasks' losses has no defined weights for the present ones"
    )
    # w_t depends on the state only (the validation history), never on the step's losses
    linear_in_losses = True

    num_tasks: int
    v0: Tensor | None
    val_steps: Tensor | None
    val_hist: Tensor | None
    slope_hist: Tensor | None
    max_slope_hist: Tensor | None
    weights: Tensor

    def __init__(
        self,
        num_tasks: int,
        *,
        warmup_steps: int = 100,
        history: int = 200,
        tau: float = 5.0,
        variant: Literal["paper", "code"] = "paper",
        reduction: Literal["sum", "mean"] = "sum",
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        if warmup_steps < 0 or history < 2:
            raise ValueError(
                f"need warmup_steps ≥ 0 and history ≥ 2, got {warmup_steps}, {history}"
            )
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if variant not in ("paper", "code"):
            raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.num_tasks = num_tasks
        self.warmup_steps = int(warmup_steps)
        self.history = int(history)
        self.tau = float(tau)
        self.variant: Literal["paper", "code"] = variant
        self.reduction: Literal["sum", "mean"] = reduction
        self.add_state("v0", None)
        # histories: their first dimension is time, not the tasks
        self.add_state("val_steps", None, per_task=False)
        self.add_state("val_hist", None, per_task=False)
        self.add_state("slope_hist", None, per_task=False)
        self.add_state("max_slope_hist", None, per_task=False)
        self.add_state("weights", torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64))
        self.steps = 0  # committed training steps
        self.observations = 0  # validation observations

    def hparams(self) -> dict[str, object]:
        return {
            "num_tasks": self.num_tasks,
            "warmup_steps": self.warmup_steps,
            "history": self.history,
            "tau": self.tau,
            "variant": self.variant,
            "reduction": self.reduction,
        }

    def extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps, "observations": self.observations}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.observations = int(state["observations"])

    def reset_extra(self) -> None:
        self.steps = 0
        self.observations = 0

    def _mult(self) -> float:
        return float(self.num_tasks) if self.reduction == "sum" else 1.0

    def _check_fed(self) -> None:
        if self.steps >= self.warmup_steps and self.observations < 2:
            raise ValueError(
                f"CoBa needs validation losses: its warm-up of {self.warmup_steps} training "
                f"steps has ended with {self.observations} validation observation(s), and a "
                "convergence slope needs at least 2. Feed them between steps with "
                "balancer.observe_validation({task: loss}) (or opt.observe_validation with "
                "mtlbal.wrap; the Lightning and Hugging Face integrations do it at the end of "
                "each validation loop), or raise warmup_steps"
            )

    def current_weights(self, losses: Tensor) -> Tensor:
        return (self.weights * self._mult()).to(device=losses.device, dtype=losses.dtype)

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        self._check_fed()
        w = self.current_weights(losses).detach()
        return WeightedLosses(w * losses, w)

    def observe(self, losses: Tensor, present: tuple[int, ...] | None = None) -> None:
        self.steps = self.steps + 1

    def observe_validation(self, losses: Tensor) -> None:
        """One validation observation: ``[m]`` per-task validation losses (the Balancer's
        :meth:`~mtlbal.Balancer.observe_validation` calls this after its checks)."""
        dev = self.weights.device
        v = losses.detach().to(device=dev, dtype=torch.float64).reshape(-1)
        if v.shape[0] != self.num_tasks:
            raise ValueError(f"CoBa has {self.num_tasks} tasks, got {v.shape[0]} losses")
        v0 = self.v0 if self.v0 is not None else v
        if not bool((v0 > 0).all()):
            i = int((v0 <= 0).nonzero()[0, 0])
            raise ValueError(
                f"CoBa normalises the validation losses by the first ones and needs them > 0: "
                f"task {i} has {float(v0[i])!r}"
            )
        x = torch.tensor([float(self.steps)], dtype=torch.float64, device=dev)
        y = (v / v0).unsqueeze(0)
        steps = x if self.val_steps is None else torch.cat([self.val_steps, x])[-self.history :]
        hist = y if self.val_hist is None else torch.cat([self.val_hist, y])[-self.history :]
        self.v0, self.val_steps, self.val_hist = v0, steps, hist
        self.observations = self.observations + 1
        if self.steps < self.warmup_steps or hist.shape[0] < 2:
            return
        alpha = window_slope(steps, hist)
        alpha_max = window_slope(steps, hist.max(dim=1).values.unsqueeze(-1))
        window = alpha.unsqueeze(0)
        if self.slope_hist is not None:
            window = torch.cat([self.slope_hist, window])[-self.history :]
        maxes = (
            alpha_max
            if self.max_slope_hist is None
            else torch.cat([self.max_slope_hist, alpha_max])
        )
        rcs, acs, df = coba_scores(alpha, window, maxes, self.tau)
        self.slope_hist, self.max_slope_hist = window, maxes
        self.weights = coba_weights(rcs, acs, df, self.variant).to(self.weights.dtype)
