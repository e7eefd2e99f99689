"""PCD — Priority-Constrained Descent (Varam & AlHajri, "Not All Objectives Are Born Equal:
Priority-Constrained Descent for Hierarchical Multi-Objective Optimization", TMLR 2026,
arXiv:2606.29521).

Task 0 (the first loss given to the Balancer) is the *primary* objective; the others are
secondary. With ``g̃_i = s_i g_i`` the normalised gradients, PCD follows the primary as closely
as the secondaries allow (Def. 4.1):

    d̃ = argmin_d ½ ‖d − g̃_0‖²   s.t.   g̃_jᵀ d ≥ τ_j ‖g̃_j‖²   (j = 1, …, m−1)

each secondary gets at least a fraction ``τ_j ∈ [0, 1]`` of the first-order progress of a step
along its own normalised gradient. By the KKT conditions (Thm. 4.2) ``d̃ = g̃_0 + Σ_j μ_j g̃_j``
with multipliers ``μ ≥ 0``, which solve the dual ``min_{μ≥0} ½ μᵀ G̃_s μ − bᵀ μ`` with
``G̃_s`` the normalised Gramian of the secondaries and ``b_j = τ_j G̃_jj − G̃_j0``: everything comes
from the Gramian. The update is ``d̃`` rescaled to the primary's norm (Algorithm 1),

    d = d̃ · ‖g_0‖ / ‖d̃‖,   weights  w = (1, μ) ⊙ s · ‖g_0‖ / ‖d̃‖.

Normalisation (Def. 4.5): ``s_i = 1/√(v̂_i + ε)`` with ``v̂_i`` the bias-corrected EMA (decay
``β``) of ``‖g_i‖²`` — Adam's second moment with one scalar per objective. The EMA ``v`` and the
step count are the state; they are updated at every step, also when ``g_0 = 0``.

Special cases: ``g_0 = 0`` gives ``d = 0``; ``d̃ = 0`` (up to round-off: ``‖d̃‖² ≤ 10·eps₆₄ ·
(Σ_i |w_i| ‖g̃_i‖)²``) gives ``d = 0``; constraints that no direction satisfies together (only
possible for ``m ≥ 3``, e.g. two opposite secondaries) are dropped for that step and ``d = g_0``
— the paper's deployment rule, reported by a :class:`PCDInfeasibleWarning` (``on_infeasible``).

Solver: the dual active-set method of Goldfarb & Idnani (1983) for an identity Hessian, in
float64 on the host (``host_sync = True``): about one addition per active constraint, each
``O(m²)`` (the inverse of the active block of ``G̃_s`` is updated by bordering on an addition
and by its Schur complement on a drop). A gradient counts as dependent on the active ones when the
part of it orthogonal to them has a squared norm ``≤ 1e-9`` of its own. The KKT conditions of
the result are checked; a solver that does not reach them raises ``RuntimeError``. The
reference implementation enumerates the working sets instead (App. B.2: exponential in ``m``);
both give the same minimiser.

Not symmetric in the tasks (the first is the primary): no permutation equivariance, and
identical tasks give ``g_0``, not their sum. Scale: the update has the primary's norm
(``reduction="sum"``; ``"mean"`` divides it by ``m``). Homogeneous of degree 1 when
``eps = 0`` (the normalisation makes ``τ`` scale-free); ``ε > 0`` is an absolute floor.

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # the secondary conflicts with the primary
    >>> d = PCD(tau=0.1)(J)
    >>> bool((J[1] @ d) > 0), round(float(d.norm()), 6)  # progress on it, the primary's norm
    (True, 1.0)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction

__all__ = ["PCD", "PCDInfeasibleWarning", "pcd_qp", "pcd_weights"]

OnInfeasible = Literal["warn", "primary", "raise"]


class PCDInfeasibleWarning(UserWarning):
    """PCD's constraints had no common solution this step: the update followed the primary."""


def pcd_qp(
    gramian: np.ndarray | Tensor,
    tau: float | Sequence[float] | np.ndarray,
    *,
    tol: float = 1e-9,
    dependence_tol: float = 1e-9,
    max_iter: int | None = None,
) -> tuple[np.ndarray, bool]:
    """Solve PCD's quadratic program on a (normalised) Gramian, primary first.

    ``min_d ½‖d − g_0‖²`` s.t. ``g_jᵀ d ≥ τ_j ‖g_j‖²`` (``j ≥ 1``). Returns ``(w, feasible)``
    with ``w = (1, μ_1, …, μ_{m−1})`` (``d = Σ_i w_i g_i``, ``μ ≥ 0`` the multipliers), or
    ``((1, 0, …, 0), False)`` when the constraints have no common solution.

    Goldfarb–Idnani dual active set, written on the Gramian: the iterate always satisfies
    ``d = g_0 + Σ μ_j g_j``; each round adds the most violated constraint (a violation larger
    than ``tol · max_i G_ii``), dropping active ones whose multiplier reaches zero on the way.
    Raises ``RuntimeError`` after ``max_iter`` (default ``10 m + 10``) add/drop moves or if the
    KKT conditions of the result fail.
    """
    g = np.asarray(gramian.detach().cpu() if isinstance(gramian, Tensor) else gramian)
    g = g.astype(np.float64)
    m = g.shape[0]
    w = np.zeros(m)
    w[0] = 1.0
    if m == 1:
        return w, True
    taus = np.broadcast_to(np.asarray(tau, dtype=np.float64), (m - 1,))
    gs = g[1:, 1:]
    b = taus * np.diag(gs) - g[1:, 0]  # slack_j(μ) = (G_s μ − b)_j; b_j > 0: g_0 violates j
    mu = np.zeros(m - 1)
    atol = tol * max(float(np.max(np.diag(g))), np.finfo(np.float64).tiny)
    active: list[int] = []
    hinv = np.zeros((0, 0))  # inverse of G_s over the active set, updated at each add / drop
    limit = max_iter if max_iter is not None else 10 * m + 10
    moves = 0
    while True:
        slack = gs @ mu - b
        slack[active] = 0.0
        p = int(np.argmin(slack))
        if slack[p] >= -atol:
            break
        viol = float(slack[p])  # < 0
        while True:
            moves += 1
            if moves > limit:
                raise RuntimeError(f"PCD: the active-set solver did not finish in {limit} moves")
            if active:
                h = gs[active, p]
                r = hinv @ h  # g_p's coordinates on the active g_j
                z2 = float(gs[p, p] - h @ r)  # ‖part of g_p orthogonal to them‖²
                blocking = r > 0
                ratios = np.where(blocking, mu[active] / np.where(blocking, r, 1.0), np.inf)
                k = int(np.argmin(ratios))
                t_drop = float(ratios[k])
            else:
                r = np.zeros(0)
                z2 = float(gs[p, p])
                k, t_drop = -1, math.inf
            t_add = -viol / z2 if z2 > dependence_tol * gs[p, p] else math.inf
            t = min(t_add, t_drop)
            if math.isinf(t):
                return w, False  # g_p depends on the active g_j and no multiplier can give way
            if active:
                mu[active] = mu[active] - t * r
            mu[p] += t
            if t_add <= t_drop:
                # bordered inverse: [[H, h], [hᵀ, G_pp]]⁻¹ from H⁻¹, r = H⁻¹h and z2 (Schur)
                n = len(active)
                grown = np.empty((n + 1, n + 1))
                grown[:n, :n] = hinv + np.outer(r, r) / z2
                grown[:n, n] = grown[n, :n] = -r / z2
                grown[n, n] = 1.0 / z2
                hinv = grown
                active.append(p)
                break
            # drop k: the inverse of H without row and column k, from H⁻¹
            keep = [i for i in range(len(active)) if i != k]
            hinv = hinv[np.ix_(keep, keep)] - np.outer(hinv[keep, k], hinv[k, keep]) / hinv[k, k]
            mu[active[k]] = 0.0
            del active[k]
            viol = float(gs[p] @ mu - b[p])
            if viol >= -atol:  # dropping alone satisfied p (only by round-off)
                break
    mu = np.maximum(mu, 0.0)
    slack = gs @ mu - b
    scale = max(float(np.max(np.diag(g))), np.finfo(np.float64).tiny)
    kkt = max(
        float(np.max(-slack, initial=0.0)),
        float(np.max(np.abs(mu * slack), initial=0.0)) / max(1.0, float(mu.max(initial=0.0))),
    )
    if kkt > 1e-7 * scale:
        raise RuntimeError(f"PCD: KKT conditions violated by {kkt:.3e} (scale {scale:.3e})")
    w[1:] = mu
    return w, True


def pcd_weights(
    gramian: Tensor,
    scales: Tensor,
    tau: float | Sequence[float] | Tensor = 0.02,
) -> tuple[Tensor, bool]:
    """PCD weights (``[m]``, float64, the primary's-norm scale) and whether the QP was feasible.

    Args:
        gramian: ``G`` ``[m, m]`` of the raw gradients, primary first.
        scales: the normalisation ``s`` ``[m]`` (``1/√(v̂ + ε)``; ones for none).
        tau: ``τ``, one number or ``m − 1``.
    """
    g = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    g = 0.5 * (g + g.T)
    s = scales.detach().to(device="cpu", dtype=torch.float64).numpy()
    t = tau.detach().cpu().numpy() if isinstance(tau, Tensor) else tau
    m = g.shape[0]
    out = np.zeros(m)
    feasible = True
    if g[0, 0] > 0:
        gt = g * np.outer(s, s)
        w, feasible = pcd_qp(gt, t)
        sq = float(w @ gt @ w)
        mag = float(np.abs(w) @ np.sqrt(np.clip(np.diag(gt), 0.0, None))) ** 2
        if sq > 10 * np.finfo(np.float64).eps * mag:
            out = w * s * math.sqrt(g[0, 0] / sq)
    return torch.as_tensor(out, dtype=torch.float64, device=gramian.device), feasible


class PCD(GramianAggregator):
    """Priority-constrained descent: the first task is primary, the others are constraints.

    Args:
        tau: ``τ ∈ [0, 1]``, the guaranteed fraction of each secondary's normalised progress:
            one number, or one per secondary (``m − 1``).
        beta: decay ``β ∈ [0, 1)`` of the EMA of the squared gradient norms.
        eps: ``ε ≥ 0`` under the square root of the normalisation.
        on_infeasible: when the constraints have no common solution: ``"warn"`` (default:
            follow the primary and warn), ``"primary"`` (follow it silently, the paper's rule)
            or ``"raise"`` (``RuntimeError``).
        reduction: ``"sum"`` (default: the update has the primary's norm) or ``"mean"`` (``/m``).
    """

    host_sync = True
    sq_norm_ema: Tensor | None
    steps: Tensor

    supports_missing_tasks = False
    missing_tasks_note = (
        "task 0 is the primary objective and the others constraints, normalised by per-task "
        "EMAs of their gradient norms: the priority order is defined over every task"
    )

    def __init__(
        self,
        *,
        tau: float | Sequence[float] = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
        on_infeasible: OnInfeasible = "warn",
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        taus = np.asarray(tau.tolist() if isinstance(tau, Tensor) else tau, dtype=np.float64)
        if taus.ndim > 1 or taus.size == 0 or not np.all((taus >= 0) & (taus <= 1)):
            raise ValueError(
                f"PCD: tau must be in [0, 1] (a number or one per secondary), got {tau}"
            )
        if not 0 <= beta < 1:
            raise ValueError(f"PCD: beta must be in [0, 1), got {beta}")
        if not eps >= 0:
            raise ValueError(f"PCD: eps must be non-negative, got {eps}")
        if on_infeasible not in ("warn", "primary", "raise"):
            raise ValueError(
                f"PCD: on_infeasible must be 'warn', 'primary' or 'raise', got {on_infeasible!r}"
            )
        self.tau: float | list[float] = float(taus) if taus.ndim == 0 else taus.tolist()
        self.beta = float(beta)
        self.eps = float(eps)
        self.on_infeasible: OnInfeasible = on_infeasible
        self.homogeneity = 1 if self.eps == 0 else None
        self.add_state("sq_norm_ema", None)
        self.add_state("steps", torch.zeros((), dtype=torch.int64))

    def hparams(self) -> dict[str, object]:
        return {
            "tau": self.tau,
            "beta": self.beta,
            "eps": self.eps,
            "on_infeasible": self.on_infeasible,
            "reduction": self.reduction,
        }

    def _weights(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        if isinstance(self.tau, list) and len(self.tau) != m - 1:
            raise ValueError(f"PCD: tau has {len(self.tau)} entries for {m - 1} secondary tasks")
        g = gramian.detach().to(torch.float64)
        sq = g.diagonal().clamp_min(0)
        if self.sq_norm_ema is None:
            ema = torch.zeros(m, dtype=torch.float64, device=g.device)
        elif self.sq_norm_ema.shape != (m,):
            raise ValueError(f"PCD holds norms for {self.sq_norm_ema.shape[0]} tasks, got {m}")
        else:
            ema = self.sq_norm_ema.to(g.device)
        steps = self.steps + 1
        ema = self.beta * ema + (1 - self.beta) * sq
        vhat = ema / (1 - self.beta ** steps.to(torch.float64))
        den = (vhat + self.eps).sqrt()
        # a zero average: that gradient has always been zero; its scale does not matter
        scales = torch.where(den > 0, 1.0 / torch.where(den > 0, den, 1.0), 0.0)
        w, feasible = pcd_weights(g, scales, self.tau)
        if not feasible:
            msg = (
                "PCD: the secondary constraints have no common solution this step; the update "
                "follows the primary task"
            )
            if self.on_infeasible == "raise":
                raise RuntimeError(msg)
            if self.on_infeasible == "warn":
                warnings.warn(msg, PCDInfeasibleWarning, stacklevel=2)
        self.sq_norm_ema, self.steps = ema, steps
        return w * self._scale(m)
