"""CAGrad — conflict-averse gradient descent (Liu et al., NeurIPS 2021, arXiv:2110.14048).

Maximise the worst task's improvement inside a ball around the mean gradient
``g_0 = (1/m) Σ_t g_t``: ``max_d min_t ⟨g_t, d⟩`` s.t. ``‖d − g_0‖ ≤ c‖g_0‖``. Its dual, solved
on the simplex as the reference code does (scipy SLSQP from the uniform ``w``, bounds
``[0, 1]``, ``Σw = 1``), is

    w* = argmin_{w ∈ Δ_m}  wᵀ G b + c‖g_0‖ · sqrt(wᵀ G w + 1e-8),     b = 1/m,

and the update is ``d = g_0 + λ g_w`` with ``g_w = Jᵀw*`` and ``λ = c‖g_0‖ / (‖g_w‖ + 1e-8)``,
followed by the rescale: ``rescale=1`` (default) ``d /= 1 + c²``, ``2``: ``d /= 1 + c``, ``0``:
none. ``c = 0`` is plain gradient descent on the mean. Default ``c = 0.4`` (nash-mtl, the
paper's NYUv2/Cityscapes setting; LibMTL uses 0.5). ``‖g_0‖² = mean(G)`` (the reference adds
1e-8 inside that square root as well).

Everything is computed on the Gramian ``G`` (``[m, m]``): ``d = Jᵀ(b + λ w*)/rescale``.
One deliberate difference from the reference: ``G`` is divided by ``trace(G)/m`` before the
solve. The minimiser is invariant to that scale, but SLSQP's stopping tolerance is absolute,
so without it small gradients (e.g. ``‖g‖ ~ 1e-4``, objective ~1e-8) stop the solver at the
starting point. The ``1e-8`` guards act on the normalised scale, which makes ``d`` exactly
positively homogeneous in ``J``.

Scale: the paper's ``d`` is on the mean scale. ``reduction="sum"`` (default) multiplies it by
``m`` (as nash-mtl does, so ``c = 0`` gives ``Σ_t g_t``); ``"mean"`` keeps the paper's scale.

Host sync: the solve runs in SciPy on the host (one ``[m, m]`` copy per step). A solver that
reports failure raises (``on_failure="raise"``) or warns and uses its last iterate projected
on the simplex (``"warn"``, default).

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> CAGrad(c=0.4, rescale=2, reduction="mean")(J)  # symmetric: d = (1 + c)·g_0 / (1 + c)
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction

__all__ = ["CAGrad", "CAGradSolverWarning", "cagrad_weights"]

OnFailure = Literal["raise", "warn"]
Solver = Literal["newton", "slsqp"]


class CAGradSolverWarning(UserWarning):
    """SLSQP reported a failure; the last iterate was used."""


def _project_simplex(y: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``y`` (``[m]``) onto ``{w ≥ 0, Σw = 1}`` (sort-based)."""
    u = np.sort(y)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, y.shape[0] + 1)
    rho = int(np.flatnonzero(u - css / k > 0)[-1])
    return np.maximum(y - css[rho] / (rho + 1), 0.0)


def _dual_newton(
    a: np.ndarray, s: float, tol: float, max_iter: int
) -> tuple[np.ndarray, bool, float]:
    """Minimise ``f(w) = wᵀ a b + s·sqrt(wᵀ a w + 1e-8)`` over the simplex (``b = 1/m``).

    A primal active-set Newton method: on the working face ``F`` (the coordinates allowed to be
    positive, all at the start) a regularised Newton step (``∇²f + μI`` with ``μ`` the face's
    stationarity, which keeps the step bounded along the flat directions of a singular ``a``
    and vanishes at the solution; ``Σd = 0`` kept by the KKT system) with a ratio test: a
    coordinate that reaches zero leaves ``F``; an Armijo search on the step. Once the face is
    solved, the coordinate outside ``F`` with the most negative multiplier ``g_i − λ`` joins it.
    Stops when the stationarity measure ``‖w − P_Δ(w − ∇f(w))‖∞`` (zero exactly at the
    minimiser: the problem is convex) is ``≤ tol``. Returns ``(w, converged, measure)``.
    """
    m = a.shape[0]
    h = a.mean(1)  # a b
    w = np.full(m, 1.0 / m)
    face = np.ones(m, dtype=bool)

    def value(w: np.ndarray) -> float:
        return float(w @ h + s * np.sqrt(max(float(w @ a @ w), 0.0) + 1e-8))

    f = value(w)
    res = np.inf
    for _ in range(max_iter):
        aw = a @ w
        r = float(np.sqrt(max(float(w @ aw), 0.0) + 1e-8))
        g = h + (s / r) * aw
        res = float(np.abs(w - _project_simplex(w - g)).max())
        if res <= tol:
            return w, True, res
        free = np.flatnonzero(face)
        lam = float(g[free].mean())
        face_res = float(np.abs(g[free] - lam).max()) if free.size > 1 else 0.0
        if face_res <= 0.1 * tol or free.size == 1:
            # the face is solved: release the coordinate with the most negative multiplier
            out = np.flatnonzero(~face)
            if out.size and float(g[out].min()) < lam:
                face[out[int(np.argmin(g[out]))]] = True
                free = np.flatnonzero(face)
            elif free.size == 1:
                return w, False, res
        k = free.size
        hess = (s / r) * (a[np.ix_(free, free)] - np.outer(aw[free], aw[free]) / (r * r))
        mu = max(face_res, 1e-12 * max(float(np.abs(np.diag(hess)).max()), 1e-300))
        kkt = np.zeros((k + 1, k + 1))
        kkt[:k, :k] = hess + mu * np.eye(k)
        kkt[:k, k] = kkt[k, :k] = 1.0
        # torch's solver: it follows torch.set_num_threads (NumPy's BLAS threads would contend)
        sol, info = torch.linalg.solve_ex(
            torch.from_numpy(kkt), torch.from_numpy(np.concatenate([-g[free], [0.0]]))
        )
        d_free = sol.numpy()[:k]
        if int(info) != 0:
            d_free = -(g[free] - g[free].mean())
        if not np.isfinite(d_free).all() or float(g[free] @ d_free) >= 0:
            d_free = -(g[free] - g[free].mean())  # the projected gradient on the face
        neg = d_free < 0
        ratios = np.where(neg, -w[free] / np.where(neg, d_free, -1.0), np.inf)
        block = int(np.argmin(ratios))
        alpha_max = float(ratios[block])
        alpha = min(1.0, alpha_max)
        slope = float(g[free] @ d_free)
        accepted = False
        for _ in range(60):
            cand = w.copy()
            cand[free] += alpha * d_free
            if alpha == alpha_max:
                cand[free[block]] = 0.0
            cand = np.maximum(cand, 0.0)
            fc = value(cand)
            # Armijo, up to the round-off of f
            if fc <= f + 1e-4 * alpha * slope + 1e-15 * abs(f):
                accepted = True
                break
            alpha *= 0.5
        if not accepted:
            return w, False, res
        if alpha == alpha_max:
            face[free[block]] = False
        w, f = cand / cand.sum(), value(cand / cand.sum())
    return w, False, res


def _dual_slsqp(
    a: np.ndarray, sqrt_phi: float, ftol: float, max_iter: int
) -> tuple[np.ndarray, bool, str]:
    """The reference's solve of the same dual: SciPy SLSQP from the uniform ``w``; returns
    ``(w, success, message)``."""
    m = a.shape[0]
    b = np.full(m, 1.0 / m)
    ab = a @ b

    def obj(w: np.ndarray) -> float:
        return float(w @ ab + sqrt_phi * np.sqrt(max(float(w @ a @ w), 0.0) + 1e-8))

    def jac(w: np.ndarray) -> np.ndarray:
        aw = a @ w
        return ab + sqrt_phi * aw / np.sqrt(max(float(w @ aw), 0.0) + 1e-8)

    res = minimize(
        obj,
        b.copy(),
        jac=jac,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * m,
        constraints=({"type": "eq", "fun": lambda w: 1.0 - w.sum(), "jac": lambda w: -np.ones(m)},),
        options={"ftol": ftol, "maxiter": max_iter},
    )
    w = np.asarray(res.x, dtype=np.float64)
    return w, bool(res.success) and bool(np.isfinite(w).all()), str(res.message)


def cagrad_weights(
    gramian: Tensor,
    c: float = 0.4,
    rescale: int = 1,
    *,
    ftol: float = 1e-12,
    max_iter: int = 200,
    on_failure: OnFailure = "warn",
    solver: Solver = "newton",
    tol: float = 1e-10,
) -> Tensor:
    """CAGrad weights (``[m]``, float64, mean scale): the update is ``Jᵀ w``.

    Args:
        gramian: ``G`` ``[m, m]``.
        c: radius scale of the ball around ``g_0``.
        rescale: 0, 1 (``/(1+c²)``) or 2 (``/(1+c)``).
        ftol: SLSQP's stopping tolerance (on the normalised objective; ``solver="slsqp"``).
        max_iter: the solver's iteration budget.
        on_failure: ``"raise"`` or ``"warn"`` when the solver does not converge.
        solver: ``"newton"`` (default: projected Newton on the simplex, stopped on the
            stationarity measure ``‖w − P_Δ(w − ∇f)‖∞ ≤ tol``) or ``"slsqp"`` (the reference's).
        tol: the Newton solver's stationarity tolerance (on the normalised objective).
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square Gramian [m, m], got {tuple(gramian.shape)}")
    if rescale not in (0, 1, 2):
        raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
    if c < 0:
        raise ValueError(f"c must be ≥ 0, got {c}")
    if solver not in ("newton", "slsqp"):
        raise ValueError(f"solver must be 'newton' or 'slsqp', got {solver!r}")
    m = gramian.shape[0]
    g = gramian.detach().to(torch.float64).cpu().numpy()
    g = 0.5 * (g + g.T)
    if not np.isfinite(g).all():
        raise ValueError("CAGrad: the Gramian has non-finite entries")
    b = np.full(m, 1.0 / m)
    tr = float(np.trace(g))
    if tr <= 0.0:  # every gradient is zero: d = 0 whatever w
        w_out = b.copy()
    else:
        a = g / (tr / m)
        sqrt_phi = c * float(np.sqrt(max(float(b @ a @ b), 0.0) + 1e-8))
        if sqrt_phi == 0.0:  # c = 0: λ = 0, the update is g_0 whatever w
            w = b.copy()
        else:
            msg = ""
            if solver == "newton":
                w, converged, res = _dual_newton(a, sqrt_phi, tol, max_iter)
                if not converged:
                    # the nearly non-smooth case (0 in the hull of the gradients, large c):
                    # the reference's solver takes over, its own success test decides
                    msg = (
                        f"the Newton solver did not converge (stationarity {res:.3e} > "
                        f"tol={tol:.1e} after max_iter={max_iter}) and "
                    )
            if solver == "slsqp" or msg:
                w_sq, ok, why = _dual_slsqp(a, sqrt_phi, ftol, max_iter)
                if ok or not msg:
                    w = w_sq
                if not ok:
                    msg = f"CAGrad: {msg}SLSQP failed ({why})"
                    if on_failure == "raise" or not np.isfinite(w).all():
                        raise RuntimeError(msg)
                    warnings.warn(
                        msg + "; using its last iterate", CAGradSolverWarning, stacklevel=3
                    )
        w = np.clip(w, 0.0, None)
        w = w / w.sum() if w.sum() > 0 else b.copy()
        gw_norm = float(np.sqrt(max(float(w @ a @ w), 0.0)))
        lmbda = sqrt_phi / (gw_norm + 1e-8)
        w_out = b + lmbda * w
    if rescale == 1:
        w_out = w_out / (1.0 + c * c)
    elif rescale == 2:
        w_out = w_out / (1.0 + c)
    return torch.as_tensor(w_out, dtype=torch.float64, device=gramian.device)


class CAGrad(GramianAggregator):
    """Conflict-averse gradient descent.

    Args:
        c: radius scale (0.4 default).
        rescale: 1 (default, ``/(1+c²)``), 2 (``/(1+c)``) or 0.
        ftol: SLSQP tolerance on the normalised objective (1e-12; SciPy's default 1e-6 is what
            the reference uses, it stops earlier).
        max_iter: the solver's iteration budget.
        on_failure: ``"warn"`` (default) or ``"raise"`` when the solver does not converge.
        solver: ``"newton"`` (default; projected Newton on the simplex, exact up to ``tol``) or
            ``"slsqp"`` (SciPy SLSQP, as the reference code).
        tol: the Newton solver's stationarity tolerance ``‖w − P_Δ(w − ∇f)‖∞`` (1e-10).
        reduction: ``"sum"`` (``m·d``, default) or ``"mean"`` (the paper's scale).
    """

    # stateless in m: a missing-task step is the method on the present tasks' Gramian
    supports_missing_tasks = True

    host_sync = True
    # the dual is solved on G/(trace(G)/m) and every guard acts on that scale: d has degree 1
    homogeneity = 1

    def __init__(
        self,
        c: float = 0.4,
        *,
        rescale: int = 1,
        ftol: float = 1e-12,
        max_iter: int = 200,
        on_failure: OnFailure = "warn",
        solver: Solver = "newton",
        tol: float = 1e-10,
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if c < 0:
            raise ValueError(f"c must be ≥ 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        if on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}")
        self.c = float(c)
        self.rescale = int(rescale)
        self.ftol = float(ftol)
        self.max_iter = int(max_iter)
        if solver not in ("newton", "slsqp"):
            raise ValueError(f"solver must be 'newton' or 'slsqp', got {solver!r}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        self.on_failure: OnFailure = on_failure
        self.solver: Solver = solver
        self.tol = float(tol)

    def hparams(self) -> dict[str, object]:
        return {
            "c": self.c,
            "rescale": self.rescale,
            "ftol": self.ftol,
            "max_iter": self.max_iter,
            "on_failure": self.on_failure,
            "solver": self.solver,
            "tol": self.tol,
            "reduction": self.reduction,
        }

    def _weights(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        w = cagrad_weights(
            gramian,
            self.c,
            self.rescale,
            ftol=self.ftol,
            max_iter=self.max_iter,
            on_failure=self.on_failure,
            solver=self.solver,
            tol=self.tol,
        )
        return w * (m * self._scale(m))
