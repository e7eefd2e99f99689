"""MGDA (Sener & Koltun, NeurIPS 2018, arXiv:1810.04650); MGDA-UB at a cut point.

The min-norm point of the convex hull of the task gradients:

    w* = argmin_{w ∈ Δ_m} ‖Jᵀ w‖² = argmin_{w ∈ Δ_m} wᵀ G w

solved on the Gramian ``G`` (``[m, m]``) by Frank–Wolfe (the paper's Algorithm 2) with the exact
line search, started from the best pair (the exact two-task solution); when the uniform point
already passes the certificate below it is returned as is, so identical task gradients (where every
``w`` is optimal) get equal weights, not the best pair's arbitrary vertex. The default solver adds
*away steps* (move weight off the worst vertex in use, ``argmax_{t: w_t>0} (G w)_t``, when that
direction is better), which converges linearly on the simplex where the paper's plain Frank–Wolfe
zig-zags at an O(1/k) rate, and stops on a certificate: with ``f = wᵀGw`` the Frank–Wolfe duality
gap ``gap = 2(f − min_t (G w)_t)`` bounds ``f − f*`` from above, and the solver stops when
``gap ≤ tol · (f − gap)``, i.e. ``f ≤ (1 + tol) f*`` (default ``tol = 1e-6``: the min-norm value
to 1e-6 relative), or when ``f`` is zero to rounding (``f ≤ 4·m·eps·max_t G_tt``: the origin is in
the hull). If ``max_iter`` (1000) is reached without the certificate it warns
(:class:`MGDASolverWarning`) and returns the last iterate.

How the default gets there fast: Wolfe's min-norm-point algorithm (the Frank–Wolfe vertex enters
the support, then one small linear solve moves to the exact minimiser on the support's affine
hull, dropping the vertices that leave the simplex), from ``m ≥ 16`` warm-started by a few
primal-dual active-set solves; each solve is one iteration of ``max_iter``. If rounding stalls
it, the away-step Frank–Wolfe above continues from its iterate with the remaining iterations.
The certificate is checked the same way whichever path ends the solve.

The reference code (and LibMTL, nash-mtl) runs plain Frank–Wolfe, clips every line search to
``[0.001, 0.999]`` and stops when an iteration changes ``w`` by less than 1e-5 (L1), after at
most 250 iterations; that rule stops far from the optimum (1–10% above ``f*`` on random
Jacobians). ``line_search="reference"`` reproduces it exactly (its constants, no certificate,
no warning).
At a cut point (``Balancer(at=module)``) the same
solver on the representation's Gramian is MGDA-UB.

Optional gradient normalisation before solving (``"l2"``: ``‖g_t‖``, ``"loss"``: ``L_t``,
``"loss+"``: ``L_t·‖g_t‖``) follows the original code: the weights are then applied to the
*raw* gradients, ``w_t / n_t``. Policy: the loss normalisations need ``L_t > 0`` for every task
(a non-positive loss has no meaning as a scale) and raise ``ValueError`` naming the task
otherwise; a zero gradient under ``"l2"``/``"loss+"`` is left unscaled (it is zero anyway).

Scale: the solution is a convex combination; with ``reduction="sum"`` (default) it is
multiplied by ``m`` so that MGDA on identical gradients returns ``Σ_t g_t``.

Host sync: the solver runs in float64 on the host (NumPy), one ``[m, m]`` copy per step.

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> MGDA(reduction="mean")(J)
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction
from mtlbal.step import Need, StepContext

__all__ = ["MGDA", "MGDASolverWarning", "mgda_weights", "min_norm_2"]

Normalization = Literal["none", "l2", "loss", "loss+"]

# the reference code's Frank–Wolfe constants (line_search="reference")
REFERENCE_MAX_ITER = 250
REFERENCE_TOL = 1e-5


class MGDASolverWarning(UserWarning):
    """The certified solver reached ``max_iter`` before its duality-gap certificate."""


def min_norm_2(v11: float, v12: float, v22: float, *, clip: float = 0.0) -> tuple[float, float]:
    """``argmin_{γ∈[0,1]} ‖γ a + (1−γ) b‖²`` from ``aᵀa, aᵀb, bᵀb``; returns ``(γ, cost)``.

    At the boundaries the paper's rule returns ``γ = 1`` / ``0``; the reference code (and its
    copies in LibMTL and nash-mtl) returns ``1 − clip`` / ``clip`` with ``clip = 0.001``.
    """
    if v12 >= v11:
        return 1.0 - clip, v11
    if v12 >= v22:
        return clip, v22
    gamma = -1.0 * (v12 - v22) / (v11 + v22 - 2.0 * v12)
    return gamma, v22 + gamma * (v12 - v22)


def _best_pair(g: np.ndarray, clip: float) -> np.ndarray:
    m = g.shape[0]
    # the best pair, all pairs at once (the same rule as min_norm_2, first minimum in (i, j)
    # order as the reference's double loop)
    ii, jj = np.triu_indices(m, k=1)
    a11, a12, a22 = g[ii, ii], g[ii, jj], g[jj, jj]
    inner = ~((a12 >= a11) | (a12 >= a22))
    safe = np.where(inner, a11 + a22 - 2.0 * a12, 1.0)
    gam = np.where(a12 >= a11, 1.0 - clip, np.where(a12 >= a22, clip, (a22 - a12) / safe))
    cost = np.where(a12 >= a11, a11, np.where(a12 >= a22, a22, a22 + gam * (a12 - a22)))
    k = int(np.argmin(cost))
    sol = np.zeros(m)
    sol[ii[k]], sol[jj[k]] = gam[k], 1.0 - gam[k]
    return sol


def _mgda_reference(g: np.ndarray, max_iter: int, tol: float, clip: float) -> np.ndarray:
    """The reference code's plain Frank–Wolfe: stops when the L1 change of ``w`` is < tol."""
    m = g.shape[0]
    if m == 1:
        return np.ones(1)
    sol = _best_pair(g, clip)
    if m == 2:
        return sol
    for _ in range(max_iter):
        grad = g @ sol
        t = int(np.argmin(grad))
        v11 = float(sol @ grad)
        v12 = float(grad[t])
        v22 = float(g[t, t])
        gamma, _ = min_norm_2(v11, v12, v22, clip=clip)
        new = gamma * sol
        new[t] += 1.0 - gamma
        change = np.abs(new - sol).sum()
        sol = new
        if change < tol:
            break
    return sol


def _affine_min(g: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The minimiser of ``xᵀ G_SS x`` subject to ``Σx = 1`` on the index set ``S``: the KKT
    system ``[G_SS 1; 1ᵀ 0][x; μ] = [0; 1]`` (least squares when it is singular)."""
    k = idx.size
    a = np.zeros((k + 1, k + 1))
    a[:k, :k] = g[np.ix_(idx, idx)]
    a[:k, k] = 1.0
    a[k, :k] = 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    try:
        x = np.linalg.solve(a, rhs)
        if np.isfinite(x).all() and np.allclose(a @ x, rhs, rtol=0, atol=1e-10):
            return x[:k]
    except np.linalg.LinAlgError:
        pass
    return np.linalg.lstsq(a, rhs, rcond=None)[0][:k]


def _minor_cycle(g: np.ndarray, sol: np.ndarray) -> np.ndarray:
    """Wolfe's minor cycle: move to the affine minimiser on the support; while it leaves the
    simplex, step to the boundary toward it and drop the vertices that reach 0. Never raises
    ``wᵀGw`` (the segment toward the affine minimiser descends)."""
    f0 = float(sol @ g @ sol)
    cur = sol.copy()
    for _ in range(g.shape[0]):
        idx = np.flatnonzero(cur > 0)
        x = _affine_min(g, idx)
        if not np.isfinite(x).all():
            return sol
        if (x >= 0).all():
            cur = np.zeros_like(cur)
            cur[idx] = x
            break
        w = cur[idx]
        neg = x < 0
        ratio = np.full(idx.size, np.inf)
        ratio[neg] = w[neg] / (w[neg] - x[neg])
        j = int(np.argmin(ratio))
        new = w + ratio[j] * (x - w)
        new[j] = 0.0  # the vertex that reaches the boundary first leaves the support
        new = np.clip(new, 0.0, None)
        cur = np.zeros_like(cur)
        cur[idx] = new / new.sum()
    return cur if float(cur @ g @ cur) <= f0 else sol


def _affine_min_sub(g: np.ndarray, idx: np.ndarray) -> np.ndarray | None:
    """The minimiser of ``xᵀ G_SS x`` subject to ``Σx = 1`` on ``S = idx``, or ``None`` when the
    vertices of ``S`` are affinely dependent to working precision.

    Solved in coordinates relative to the last vertex ``r`` of ``S`` (``x_r = 1 − Σ v``,
    ``H v = −b`` with ``H_ij = G_ij − G_ir − G_rj + G_rr``, ``b_i = G_ir − G_rr``): the Gram
    matrix of the *differences* of the gradients, which stays well conditioned when all the
    gradients share a large common component (where the bordered KKT matrix does not).
    """
    k = idx.size
    if k == 1:
        return np.ones(1)
    gs = g[np.ix_(idx, idx)]
    grr = gs[-1, -1]
    gor = gs[:-1, -1]
    h = gs[:-1, :-1] - gor[:, None] - gor[None, :] + grr
    b = gor - grr
    try:
        v = np.linalg.solve(h, -b)
    except np.linalg.LinAlgError:
        return None
    scale = float(np.abs(h).max()) * float(np.abs(v).max()) + float(np.abs(b).max())
    if not np.isfinite(v).all() or float(np.abs(h @ v + b).max()) > 1e-9 * scale:
        return None
    x = np.empty(k)
    x[:-1] = v
    x[-1] = 1.0 - float(v.sum())
    return x


# the block active-set warm start: from this many tasks on (below, Wolfe's major cycles from
# the best pair cost less than the solves it would add), at most this many solves
_PDAS_MIN_TASKS = 16
_PDAS_MAX_SOLVES = 12


def _pdas_start(g: np.ndarray, sol: np.ndarray, budget: int) -> tuple[np.ndarray, int]:
    """A feasible starting point from primal-dual active-set steps; returns ``(w, solves)``.

    Start with every vertex in ``S``; solve the affine problem on ``S``; the next ``S`` keeps
    the vertices with positive weight and adds those outside with ``(G x)_i < xᵀGx`` (a negative
    multiplier). Stops when ``S`` repeats or after ``budget`` solves, and returns the best
    point *in the simplex* it met (or ``sol``, the best pair, if that is better): the caller
    continues from it with Wolfe's cycles and certifies the result, so this is only a guess.
    """
    m = g.shape[0]
    best, f_best = sol, float(sol @ g @ sol)
    active = np.ones(m, dtype=bool)
    seen: set[bytes] = set()
    used = 0
    while used < budget:
        key = np.packbits(active).tobytes()
        if key in seen:
            break
        seen.add(key)
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        used += 1
        x = _affine_min_sub(g, idx)
        if x is None:
            break
        full = np.zeros(m)
        full[idx] = x
        grad = g @ full
        f = float(full @ grad)
        if (x >= 0).all() and f < f_best:
            best, f_best = full, f
        nxt = (full > 0) | (~active & (grad < f))
        if (nxt == active).all():
            break
        active = nxt
    return best, used


def _mgda_active_set(
    g: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, float, bool, int]:
    """Wolfe's min-norm-point algorithm on the Gramian; returns ``(w, gap, certified, iters)``.

    Major cycle: add the Frank–Wolfe vertex ``argmin_t (G w)_t`` to the support ``S``; minor
    cycle: move to the exact minimiser on the affine hull of ``S`` (one small linear solve);
    while it leaves the simplex, step to the boundary toward it and drop the vertex that reaches
    0. Finite (the support only changes to lower the objective), typically ``|S*|`` major cycles
    from the best pair. From ``m ≥ 16`` tasks it starts instead from :func:`_pdas_start` (a few
    block active-set solves, usually the optimum itself), which replaces up to ``m`` major
    cycles by a handful of solves; below that the major cycles are cheaper than the guess. Each
    linear solve counts as one iteration of ``max_iter``. Stops on the same certificate as
    :func:`_mgda_certified`; when rounding stalls it (the vertex to add is already in use, a
    solve is singular, or a cycle fails to descend) it returns ``certified=False`` with its
    iterate and the caller continues with the away-step solver.
    """
    m = g.shape[0]
    uniform = _certified_uniform(g, tol)
    if uniform is not None:
        return uniform[0], uniform[1], True, 0
    sol = _best_pair(g, 0.0)
    floor = 4.0 * m * np.finfo(np.float64).eps * max(float(np.max(np.diag(g))), 0.0)
    it = 0
    if m >= _PDAS_MIN_TASKS and max_iter > 0:
        sol, it = _pdas_start(g, sol, min(max_iter, _PDAS_MAX_SOLVES))
    while True:
        grad = g @ sol
        f = float(sol @ grad)
        t = int(np.argmin(grad))
        gap = 2.0 * (f - float(grad[t]))
        if gap <= tol * (f - gap) or f <= floor:
            return sol, gap, True, it
        if it >= max_iter or sol[t] > 0:
            return sol, gap, False, it
        idx = np.append(np.flatnonzero(sol > 0), t)
        cur = sol[idx]
        while it < max_iter:
            it += 1
            x = _affine_min_sub(g, idx)
            if x is None:
                break
            if (x > 0).all():
                cur = x
                break
            neg = x <= 0
            ratio = np.full(idx.size, np.inf)
            ratio[neg] = cur[neg] / (cur[neg] - x[neg])
            j = int(np.argmin(ratio))
            if ratio[j] <= 0.0 and idx[j] == t:
                break  # the new vertex would leave at once: no progress
            cur = cur + ratio[j] * (x - cur)
            keep = np.ones(idx.size, dtype=bool)
            keep[j] = False
            keep &= cur > 0
            idx, cur = idx[keep], cur[keep]
            cur = cur / cur.sum()
        new = np.zeros(m)
        new[idx] = np.clip(cur, 0.0, None)
        new /= new.sum()
        if not float(new @ g @ new) < f:
            return sol, gap, False, it  # no descent (rounding): hand over
        sol = new


def _certified_uniform(g: np.ndarray, tol: float) -> tuple[np.ndarray, float] | None:
    """The uniform point and its gap when it already passes the certificate, else ``None``.

    Tried first: where it is certified (identical task gradients, or identical after
    normalisation, where every ``w`` on the simplex is optimal) the weights are symmetric in the
    tasks instead of the best pair's arbitrary vertex."""
    m = g.shape[0]
    floor = 4.0 * m * np.finfo(np.float64).eps * max(float(np.max(np.diag(g))), 0.0)
    uni = np.full(m, 1.0 / m)
    grad_u = g @ uni
    f_u = float(uni @ grad_u)
    gap_u = 2.0 * (f_u - float(np.min(grad_u)))
    if gap_u <= tol * (f_u - gap_u) or f_u <= floor:
        return uni, gap_u
    return None


def _mgda_certified(
    g: np.ndarray, max_iter: int, tol: float, start: np.ndarray | None = None
) -> tuple[np.ndarray, float, bool]:
    """Away-step Frank–Wolfe with the exact line search; returns ``(w, gap, certified)``.

    After each step, Wolfe's minor cycle moves to the exact minimiser on the current support
    (dropping the vertices that leave it), which ends the zig-zag once the support is found
    (then it is Wolfe's min-norm-point algorithm with away steps). Stops when
    ``gap ≤ tol·(f − gap)`` (so ``f ≤ (1 + tol) f*``) or ``f`` is zero to rounding.
    """
    m = g.shape[0]
    if m == 1:
        return np.ones(1), 0.0, True
    floor = 4.0 * m * np.finfo(np.float64).eps * max(float(np.max(np.diag(g))), 0.0)
    uniform = _certified_uniform(g, tol)
    if uniform is not None:
        return uniform[0], uniform[1], True
    sol = _best_pair(g, 0.0) if start is None else start.copy()
    gap = np.inf
    for it in range(max_iter + 1):
        grad = g @ sol
        f = float(sol @ grad)
        if it > 0 and it % max(1, int(np.count_nonzero(sol)) // 8) == 0:
            sol = _minor_cycle(g, sol)
            grad = g @ sol
            f = float(sol @ grad)
        t = int(np.argmin(grad))
        gap = 2.0 * (f - float(grad[t]))
        if gap <= tol * (f - gap) or f <= floor:
            return sol, gap, True
        if it == max_iter:
            break
        in_use = sol > 0
        a = int(np.argmax(np.where(in_use, grad, -np.inf)))
        if f - float(grad[t]) >= float(grad[a]) - f or sol[a] >= 1.0:
            d = -sol.copy()
            d[t] += 1.0
            step_max, away = 1.0, False
        else:
            d = sol.copy()
            d[a] -= 1.0
            step_max, away = float(sol[a] / (1.0 - sol[a])), True
        curv = float(d @ g @ d)
        slope = -float(d @ grad)  # > 0: a descent direction
        step = min(step_max, slope / curv) if curv > 0 else step_max
        sol = sol + step * d
        if away and step == step_max:
            sol[a] = 0.0  # the vertex leaves the active set exactly
        np.clip(sol, 0.0, None, out=sol)
        sol /= sol.sum()
    return sol, gap, False


def mgda_weights(
    gramian: Tensor,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
    norms: Tensor | None = None,
    clip: float = 0.0,
) -> Tensor:
    """Convex MGDA weights ``[m]`` (on the simplex) for the Gramian ``[m, m]``.

    ``clip = 0`` (default): the certified away-step Frank–Wolfe; ``tol`` is the relative
    duality gap (the result has ``f ≤ (1 + tol) f*``) and reaching ``max_iter`` without it
    warns (:class:`MGDASolverWarning`). ``clip > 0`` (the reference code's 0.001): plain
    Frank–Wolfe with the line search clipped to ``[clip, 1 − clip]``, stopping when the L1
    change of ``w`` is below ``tol`` (the reference: ``tol = 1e-5``, ``max_iter = 250``).

    With ``norms`` (``[m]``, ``≥ 0``) the problem is solved for the normalised gradients
    ``g_t / n_t`` and the returned weights are ``w_t / n_t`` (apply them to the raw gradients);
    a zero norm leaves its task unscaled.
    """
    g = gramian.detach().to(torch.float64)
    n: Tensor | None = None
    if norms is not None:
        n = norms.detach().to(device=g.device, dtype=torch.float64)
        n = torch.where(n > 0, n, torch.ones_like(n))
        g = g / (n[:, None] * n[None, :])
    g_np = g.cpu().numpy()
    if clip > 0:
        sol = _mgda_reference(g_np, max_iter, tol, clip)
    else:
        sol, gap, ok, used = (
            _mgda_active_set(g_np, max_iter, tol)
            if g_np.shape[0] > 1
            else (np.ones(1), 0.0, True, 0)
        )
        if not ok and used < max_iter:
            sol, gap, ok = _mgda_certified(g_np, max_iter - used, tol, start=sol)
        if not ok:
            f = float(sol @ g_np @ sol)
            warnings.warn(
                f"MGDA: no duality-gap certificate after max_iter={max_iter} iterations "
                f"(‖d‖² = {f:.3e}, duality gap {gap:.3e}; needed gap ≤ tol·(‖d‖² − gap) with "
                f"tol={tol:.1e}); using the last iterate",
                MGDASolverWarning,
                stacklevel=3,
            )
    w = torch.as_tensor(sol, dtype=torch.float64, device=gramian.device)
    if n is not None:
        w = w / n
    return w


class MGDA(GramianAggregator):
    """Multiple-gradient descent: the min-norm element of the tasks' convex hull.

    Args:
        normalization: ``"none"`` (default, as LibMTL and nash-mtl), ``"l2"``, ``"loss"`` or
            ``"loss+"``; see the module docstring.
        max_iter: iteration budget of the certified solver (1000); reaching it without the
            certificate warns.
        tol: relative duality gap of the certified solver (1e-6: ``‖d‖²`` within 1e-6
            relative of the minimum).
        line_search: ``"paper"`` (default): exact line search, away steps, the duality-gap
            certificate; ``"reference"``: the reference code's solver with its own constants
            (steps clipped to ``[0.001, 0.999]``, L1 change < 1e-5, 250 iterations;
            ``max_iter`` and ``tol`` are then not used).
        reduction: ``"sum"`` (× m, default) or ``"mean"`` (the convex combination).
    """

    # stateless in m: a missing-task step is the method on the present tasks' Gramian
    supports_missing_tasks = True

    host_sync = True

    def __init__(
        self,
        *,
        normalization: Normalization = "none",
        max_iter: int = 1000,
        tol: float = 1e-6,
        line_search: Literal["paper", "reference"] = "paper",
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if line_search not in ("paper", "reference"):
            raise ValueError(f"line_search must be 'paper' or 'reference', got {line_search!r}")
        self.line_search = line_search
        if normalization not in ("none", "l2", "loss", "loss+"):
            raise ValueError(f"unknown normalization {normalization!r}")
        self.normalization: Normalization = normalization
        # the min-norm weights of c·G are those of G (the solver's stopping rules are relative):
        # d has degree 1; normalising by n_t and applying w_t/n_t lowers it by the degree of n_t
        # in the scale (‖g_t‖ and L_t: 1; L_t·‖g_t‖: 2)
        self.homogeneity = {"none": 1, "l2": 0, "loss": 0, "loss+": -1}[normalization]
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        if normalization in ("loss", "loss+"):
            self.needs = frozenset({Need.GRAMIAN, Need.LOSSES})

    def hparams(self) -> dict[str, object]:
        return {
            "normalization": self.normalization,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "line_search": self.line_search,
            "reduction": self.reduction,
        }

    def solve(self, gramian: Tensor, ctx: StepContext) -> Tensor:
        """Weights from a checked Gramian and the step's losses (``ctx.losses``, needed by the
        ``"loss"``/``"loss+"`` normalisations: declared as ``Need.LOSSES``)."""
        return self._solve(gramian, ctx.losses)

    def _weights(self, gramian: Tensor) -> Tensor:
        return self._solve(gramian, None)

    def _solve(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        m = gramian.shape[0]
        norms: Tensor | None = None
        if self.normalization != "none":
            gnorm = gramian.detach().to(torch.float64).diagonal().clamp_min(0).sqrt()
            if self.normalization == "l2":
                norms = gnorm
            else:
                if losses is None:
                    raise ValueError(
                        f"MGDA(normalization={self.normalization!r}) needs the losses: "
                        "use it through a Balancer, or call weights(G, losses=L)"
                    )
                loss = losses.detach().to(device=gnorm.device, dtype=torch.float64)
                loss = loss.reshape(-1)
                if loss.shape[0] != m:
                    raise ValueError(f"MGDA: {loss.shape[0]} losses for {m} tasks")
                bad = [(i, float(v)) for i, v in enumerate(loss.tolist()) if not v > 0]
                if bad:
                    i, v = bad[0]
                    raise ValueError(
                        f"MGDA(normalization={self.normalization!r}) divides by the losses and "
                        f"needs them > 0: task {i} has loss {v!r}"
                    )
                norms = loss if self.normalization == "loss" else loss * gnorm
        if self.line_search == "paper":
            w = mgda_weights(gramian, max_iter=self.max_iter, tol=self.tol, norms=norms)
        else:
            w = mgda_weights(
                gramian, max_iter=REFERENCE_MAX_ITER, tol=REFERENCE_TOL, norms=norms, clip=0.001
            )
        return w * (m * self._scale(m))
