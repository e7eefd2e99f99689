"""FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024,
arXiv:2402.15638).

α-fair resource allocation over the tasks' improvements: the update ``d = Jᵀx`` with ``x > 0``
solving (the paper's Eq. 4, Algorithm 1)

    (G x)_i = x_i^{−1/α}    for every task i        (G = J Jᵀ, [m, m]).

``α = 1`` is proportional fairness (Nash-MTL's ``G x = 1/x``); ``α → ∞`` approaches max–min
fairness (MGDA-like); ``α → 0`` gives ``x → 1``, equal weighting (the paper's "α = 0 is linear
scalarization").

Solver. The system is exactly the stationarity condition of the strictly convex function

    f(x) = ½ xᵀ G x − Σ_i h(x_i),   h(x) = x^{1−1/α}/(1−1/α)  (h = log x for α = 1)

on ``x > 0`` (Hessian ``G + diag(x^{−1/α−1}/α)`` is positive definite there), so the solution is
unique when it exists. It is found by damped Newton on ``f`` (backtracking line search that stays
in ``x > 0``) in float64 on the host, and accepted only when the relative residual
``max_i |(Gx)_i − x_i^{−1/α}| / x_i^{−1/α} ≤ tol`` (1e-8). The official code and TorchJD instead
call ``scipy.optimize.least_squares`` on the residual from ``x = 1/m`` and take whatever it
returns (``max_nfev = 100·m``), converged or not.

Scale. The problem is solved for ``Ĝ = G/s`` with ``s`` the mean squared task-gradient norm and
mapped back, ``x = x̂ · s^{−α/(1+α)}`` (exact). Hence ``d`` is positively homogeneous of degree
``(1−α)/(1+α)``: multiplying every loss by ``c`` multiplies the update by ``c^{(1−α)/(1+α)}``
(degree 0 for α = 1, −1/3 for α = 2). With a ``GradScaler`` the Balancer unscales ``J`` first.

Existence. A solution exists iff no non-zero ``v ≥ 0`` has ``G v = 0``, i.e. no non-negative
combination of the task gradients vanishes. A task whose gradient is exactly zero has no finite
``x_i`` but contributes nothing to ``d`` either: it is left out of the solve and reported with
weight 0 (``d`` is the limit of the problem's solutions). For the remaining tasks, gradients
that cancel (``g_2 = −g_1``, a Pareto-stationary point) leave the system without a solution:
then ``on_failure="raise"`` (default) raises ``RuntimeError`` and ``"warn"`` emits
:class:`FairGradSolverWarning` and uses the last Newton iterate (what the reference's
``least_squares`` returns silently in that case).

No warm start and no state: Newton from ``x̂ = 1`` converges in about 10–20 iterations, and the
answer does not depend on the start.

Scale convention: ``x`` is the paper's (``reduction="sum"``, default, as the official code and
TorchJD for ``α > 0``); ``"mean"`` divides it by ``m``. For ``α = 0`` the weights are ``1``
(``1/m`` under ``"mean"``); TorchJD's ``FairGrad(alpha=0)`` returns ``1/m``, i.e. ours with
``reduction="mean"``, which is not the limit of its own ``α > 0`` answers.

Host sync: the Newton iterations run in NumPy (one ``[m, m]`` copy per step).

Example:
    >>> import torch
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    >>> FairGrad(alpha=1.0).weights(J @ J.T)  # orthogonal, α = 1: x_i = 1/‖g_i‖
    tensor([0.5000, 2.0000], dtype=torch.float64)
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction

__all__ = ["FairGrad", "FairGradSolverWarning", "fairgrad_weights"]

OnFailure = Literal["raise", "warn"]


class FairGradSolverWarning(UserWarning):
    """The FairGrad system had no (found) solution; the last Newton iterate was used."""


def _h(x: np.ndarray, p: float) -> np.ndarray:
    # an antiderivative of x^{-p}
    if p == 1.0:
        return np.log(x)
    return np.power(x, 1.0 - p) / (1.0 - p)


def _newton(a: np.ndarray, p: float, tol: float, max_iter: int) -> tuple[np.ndarray, float]:
    """Damped Newton on ``½xᵀax − Σ h(x)``; returns the iterate and its relative residual."""

    def f(v: np.ndarray) -> float:
        return float(0.5 * v @ a @ v - _h(v, p).sum())

    def residual(v: np.ndarray) -> float:
        xp = np.power(v, -p)
        return float(np.max(np.abs(a @ v - xp) / xp))

    x = np.ones(a.shape[0])
    for _ in range(max_iter):
        res = residual(x)
        if not np.isfinite(res) or res <= tol:
            return x, res
        xp = np.power(x, -p)
        grad = a @ x - xp
        hess = a + np.diag(p * xp / x)
        # the Hessian is positive definite: a Cholesky solve, by torch (it follows
        # torch.set_num_threads; NumPy/SciPy's BLAS threads contend on a loaded machine:
        # 0.76 s for one 256 × 256 factorisation was measured)
        chol, info = torch.linalg.cholesky_ex(torch.from_numpy(hess))
        if int(info) != 0:
            return x, np.inf
        step = -torch.cholesky_solve(torch.from_numpy(grad)[:, None], chol)[:, 0].numpy()
        t = 1.0
        neg = step < 0
        if neg.any():  # stay strictly inside the orthant
            t = min(1.0, 0.99 * float(np.min(-x[neg] / step[neg])))
        fx, slope = f(x), float(grad @ step)
        # Armijo on the convex f; near the solution f's rounding (≈ eps·|f|) can hide a
        # decrease of order slope, so a step that lowers the residual is taken there as well
        while t > 1e-12:
            cand = x + t * step
            if f(cand) <= fx + 1e-4 * t * slope:
                break
            if -slope <= 1e-10 * (1.0 + abs(fx)) and residual(cand) < res:
                break
            t *= 0.5
        if t <= 1e-12:
            return x, res
        x = x + t * step
    return x, residual(x)


def fairgrad_weights(
    gramian: Tensor, alpha: float, *, tol: float = 1e-8, max_iter: int = 100
) -> tuple[Tensor, bool]:
    """Solve ``(Gx)_i = x_i^{−1/α}``, ``x > 0``; returns ``(x [m] float64, converged)``.

    Tasks with a zero gradient (``G_ii = 0``) get weight 0 and are left out of the solve.
    ``alpha = 0`` returns ones (the ``α → 0`` limit, equal weighting).
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square Gramian [m, m], got {tuple(gramian.shape)}")
    if alpha < 0:
        raise ValueError(f"alpha must be ≥ 0, got {alpha}")
    g = gramian.detach().to(torch.float64).cpu().numpy()
    g = 0.5 * (g + g.T)
    m = g.shape[0]
    if not np.isfinite(g).all():
        raise ValueError("FairGrad: the Gramian has non-finite entries")
    if alpha == 0:
        return torch.ones(m, dtype=torch.float64, device=gramian.device), True
    live = np.flatnonzero(np.diagonal(g) > 0)
    x = np.zeros(m)
    ok = True
    if live.size:
        sub = g[np.ix_(live, live)]
        s = float(np.mean(np.diagonal(sub)))
        xs, res = _newton(sub / s, 1.0 / alpha, tol, max_iter)
        ok = bool(res <= tol)
        x[live] = xs * s ** (-alpha / (1.0 + alpha))
    return torch.as_tensor(x, dtype=torch.float64, device=gramian.device), ok


class FairGrad(GramianAggregator):
    """α-fair weights ``x`` with ``G x = x^{−1/α}``.

    Args:
        alpha: the fairness parameter ``α ≥ 0`` (1.0, the official and LibMTL default, which is
            Nash-MTL's proportional fairness; TorchJD requires it; the official scripts use 2.0
            for CelebA and QM9).
        tol: relative residual required of the solution (1e-8).
        max_iter: Newton iterations per solve (100).
        on_failure: ``"raise"`` (default) or ``"warn"`` (warn and use the last iterate).
        reduction: ``"sum"`` (the paper's ``x``, default) or ``"mean"`` (``x/m``).
    """

    host_sync = True
    homogeneity: float | None

    def __init__(
        self,
        alpha: float = 1.0,
        *,
        tol: float = 1e-8,
        max_iter: int = 100,
        on_failure: OnFailure = "raise",
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if not alpha >= 0:
            raise ValueError(f"alpha must be ≥ 0, got {alpha}")
        if on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be ≥ 1, got {max_iter}")
        self.alpha = alpha
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.on_failure: OnFailure = on_failure
        # x has degree −2α/(1+α) in J, so d = Jᵀx has degree (1−α)/(1+α)
        self.homogeneity = (1.0 - alpha) / (1.0 + alpha)

    def hparams(self) -> dict[str, object]:
        return {
            "alpha": self.alpha,
            "tol": self.tol,
            "max_iter": self.max_iter,
            "on_failure": self.on_failure,
            "reduction": self.reduction,
        }

    def _weights(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        x, ok = fairgrad_weights(gramian, float(self.alpha), tol=self.tol, max_iter=self.max_iter)
        if not ok:
            msg = (
                f"FairGrad: no solution of (Gx)_i = x_i^(-1/α) (α = {self.alpha}) was found; "
                "it has none when a non-negative combination of the task gradients vanishes "
                "(e.g. g_2 = -g_1, a Pareto-stationary point)"
            )
            if self.on_failure == "raise":
                raise RuntimeError(msg)
            warnings.warn(msg + "; using the last Newton iterate", FairGradSolverWarning, 2)
        return x * self._scale(m)
