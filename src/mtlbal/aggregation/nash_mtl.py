"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022,
arXiv:2202.01017).

The Nash bargaining solution: the update ``d = Jᵀα`` with ``α > 0`` solving

    α_i · (G α)_i = 1   for every task i,        i.e.  G α = 1/α   (G = J Jᵀ, [m, m]).

Solver. ``G α = 1/α`` is exactly the stationarity condition of the strictly convex function
``f(α) = ½ αᵀ G α − Σ_i log α_i`` on the positive orthant, so the solution is unique when it
exists and damped Newton's method on ``f`` (Hessian ``G + diag(1/α²)``, backtracking line search
that stays in ``α > 0``; full steps once the Newton decrement is below 0.25, where ``f`` —
self-concordant — converges quadratically) reaches it from any start. The reference code
reaches the same fixed point by a sequence of linearised convex programs (CCCP, cvxpy/ECOS, at
most 20 rounds, stopping at ``‖Gα − 1/α‖ < 1e-3``); this solver needs no dependency and stops
only when the *relative* residual ``max_i |α_i (G α)_i − 1| ≤ tol`` (1e-8), which it then checks.

Numerics, as the reference: the problem is solved for ``G̃ = G/‖G‖_F`` and mapped back,
``α = α̃ / sqrt(‖G‖_F)`` (if ``G̃α̃ = 1/α̃`` then ``Gα = 1/α``). The previous step's ``α`` is
the warm start (state, saved by ``state_dict``; initial ``α = 1`` as the reference).

Failure. A solution exists only if no non-zero ``v ≥ 0`` has ``G v = 0`` (e.g. it does not
for a zero task gradient, or for ``g_2 = −g_1``); then ``f`` is unbounded and Newton diverges.
When the residual check fails, ``on_failure="raise"`` (default) raises ``RuntimeError``;
``"warn"`` emits :class:`NashMTLSolverWarning` and uses the previous step's ``α`` (what the
reference does silently). ``num_failures`` counts these steps (state).

Scale: ``α`` is the paper's, not normalised; ``reduction="sum"`` (default) returns it as is
and ``"mean"`` divides it by ``m``. Nash-MTL does not reduce to equal weighting: ``m``
identical gradients ``g`` give ``α_i = 1/(√m‖g‖)``, ``d = √m · g/‖g‖``.

Homogeneity (AMP): ``α`` is homogeneous of degree −1 in ``J``, so ``d = Jᵀα`` is of degree 0:
multiplying every loss by ``s`` leaves the update unchanged. With a ``GradScaler`` the
per-task gradients carry the loss scale ``S`` but ``d`` does not, so the scaler's unscale step
would shrink the update by ``1/S``: unscale the losses (or gradients) before Nash-MTL, or do
not use a ``GradScaler`` with it (bf16 autocast needs none).

Reference training recipe: the nash-mtl trainers back-propagate ``Σ α_i L_i`` (heads weighted
by ``α``; here the Balancer's head policy applies) and clip the shared gradient norm to 1.0.
``max_norm`` (default 0: off) does that clip on the update itself, ``‖Jᵀw‖ ≤ max_norm``
(TorchJD's ``NashMTL`` does it with ``max_norm=1.0`` by default). ``update_every`` (1) reuses
``α`` for that many steps, as the reference's ``update_weights_every``.

Missing tasks (a step without some tasks' gradients, ``P`` the present ones): the step solves
the bargaining problem of ``P`` (``G`` is ``[m', m']``), warm-started from the entries ``P`` of
the previous ``α``; only those entries are updated, the absent tasks' ``α`` are left as they are.
A task not seen yet has ``α = NaN`` in the state (no warm start: a warm start with a NaN entry
starts from the reference's ``α = 1``). ``update_every`` reuses ``α_P`` only when every entry
is known.

Host sync: the Newton iterations run in NumPy on the host.

Example:
    >>> import torch
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    >>> NashMTL().weights(J @ J.T)  # orthogonal: α_i = 1/‖g_i‖
    tensor([0.5000, 2.0000], dtype=torch.float64)
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction
from mtlbal.step import StepContext

__all__ = ["NashMTL", "NashMTLSolverWarning", "nash_mtl_weights"]

OnFailure = Literal["raise", "warn"]


class NashMTLSolverWarning(UserWarning):
    """The Nash-MTL system had no (found) solution; the previous α was used."""


def _newton(a: np.ndarray, x: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, float]:
    """Damped Newton on ``½xᵀax − Σ log x``; returns the iterate and its relative residual."""

    def f(v: np.ndarray) -> float:
        return float(0.5 * v @ a @ v - np.log(v).sum())

    res = np.inf
    for _ in range(max_iter):
        ax = a @ x
        res = float(np.abs(x * ax - 1.0).max())
        if not np.isfinite(res) or res <= tol:
            break
        grad = ax - 1.0 / x
        hess = a + np.diag(1.0 / (x * x))
        try:
            step = -np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            return x, np.inf
        t = 1.0
        neg = step < 0
        if neg.any():  # stay strictly inside the orthant
            t = min(1.0, 0.99 * float(np.min(-x[neg] / step[neg])))
        fx, slope = f(x), float(grad @ step)
        # f is self-concordant: with Newton decrement sqrt(−slope) < 0.25 the full step is
        # in the quadratic-convergence region (and f's rounding would defeat a line search)
        if -slope >= 0.0625:
            while t > 1e-12 and f(x + t * step) > fx + 0.25 * t * slope:
                t *= 0.5
        if t <= 1e-12:
            break
        x = x + t * step
    else:
        ax = a @ x
        res = float(np.abs(x * ax - 1.0).max())
    return x, res


def nash_mtl_weights(
    gramian: Tensor,
    init: Tensor | None = None,
    *,
    tol: float = 1e-8,
    max_iter: int = 100,
) -> tuple[Tensor, bool]:
    """Solve ``α_i (Gα)_i = 1``, ``α > 0``; returns ``(α [m] float64, converged)``.

    ``init`` is a warm start in the unnormalised scale (e.g. the previous step's ``α``).
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square Gramian [m, m], got {tuple(gramian.shape)}")
    g = gramian.detach().to(torch.float64).cpu().numpy()
    g = 0.5 * (g + g.T)
    m = g.shape[0]
    if not np.isfinite(g).all():
        raise ValueError("NashMTL: the Gramian has non-finite entries")
    fro = float(np.linalg.norm(g))
    if fro == 0.0:
        return torch.full((m,), float("nan"), dtype=torch.float64, device=gramian.device), False
    a = g / fro
    x0 = np.ones(m)
    if init is not None:
        w = init.detach().to(torch.float64).cpu().numpy().reshape(-1) * np.sqrt(fro)
        if w.shape[0] == m and np.isfinite(w).all() and (w > 0).all():
            x0 = w
    x, res = _newton(a, x0, tol, max_iter)
    if res > tol and init is not None:  # a far-off warm start: retry from the reference's start
        x, res = _newton(a, np.ones(m), tol, max_iter)
    alpha = torch.as_tensor(x / np.sqrt(fro), dtype=torch.float64, device=gramian.device)
    return alpha, bool(res <= tol)


class NashMTL(GramianAggregator):
    """Nash bargaining weights ``α`` with ``G α = 1/α``.

    Args:
        tol: relative residual ``max_i |α_i (Gα)_i − 1|`` required (1e-8).
        max_iter: Newton iterations per solve.
        update_every: solve every that many steps and reuse ``α`` in between (1).
        max_norm: if ``> 0``, scale the weights so that ``‖Jᵀw‖ ≤ max_norm`` (0: off).
        on_failure: ``"raise"`` (default) or ``"warn"`` (warn and use the previous ``α``).
        reduction: ``"sum"`` (the paper's ``α``, default) or ``"mean"`` (``α/m``).
    """

    host_sync = True
    supports_missing_tasks = True
    # α has degree −1 (Gα = 1/α), so d = Jᵀα has degree 0; the max_norm clip is on ‖d‖, which
    # is scale-free as well
    homogeneity = 0
    alpha: Tensor | None
    num_failures: Tensor
    calls: Tensor

    def __init__(
        self,
        *,
        tol: float = 1e-8,
        max_iter: int = 100,
        update_every: int = 1,
        max_norm: float = 0.0,
        on_failure: OnFailure = "raise",
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}")
        if update_every < 1:
            raise ValueError(f"update_every must be ≥ 1, got {update_every}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.update_every = int(update_every)
        if max_norm < 0:
            raise ValueError(f"max_norm must be ≥ 0, got {max_norm}")
        self.max_norm = float(max_norm)
        self.on_failure: OnFailure = on_failure
        self.add_state("alpha", None)
        self.add_state("num_failures", torch.zeros((), dtype=torch.int64))
        self.add_state("calls", torch.zeros((), dtype=torch.int64))

    def hparams(self) -> dict[str, object]:
        return {
            "tol": self.tol,
            "max_iter": self.max_iter,
            "update_every": self.update_every,
            "max_norm": self.max_norm,
            "on_failure": self.on_failure,
            "reduction": self.reduction,
        }

    def _weights(self, gramian: Tensor) -> Tensor:
        return self.solve(gramian, StepContext())

    def solve(self, gramian: Tensor, ctx: StepContext) -> Tensor:
        m = gramian.shape[0]
        full = ctx.num_all_tasks(m)
        held = self.alpha
        if held is not None and held.shape[0] != full:
            raise ValueError(f"NashMTL holds α for {held.shape[0]} tasks, got {full}")
        prev = held
        if held is not None and ctx.present is not None:
            prev = held[torch.tensor(ctx.present, device=held.device)]
        calls = int(self.calls)
        self.calls = self.calls + 1
        # reused only when every entry is known (NaN: a task not seen yet)
        reuse = prev is not None and calls % self.update_every != 0
        if reuse and prev is not None and bool(torch.isfinite(prev).all()):
            return self._clip(prev.to(gramian.device) * self._scale(m), gramian)
        alpha, ok = nash_mtl_weights(gramian, prev, tol=self.tol, max_iter=self.max_iter)
        if not ok:
            msg = (
                "NashMTL: no solution of α·(Gα) = 1 was found (a zero task gradient, or tasks "
                "whose gradients cancel, make it unsolvable)"
            )
            if self.on_failure == "raise":
                raise RuntimeError(msg)
            self.num_failures = self.num_failures + 1
            warnings.warn(msg + "; using the previous α", NashMTLSolverWarning, stacklevel=2)
            ones = torch.ones(m, dtype=torch.float64, device=gramian.device)
            alpha = (
                torch.where(prev.isnan(), ones, prev.to(device=gramian.device, dtype=torch.float64))
                if prev is not None
                else ones
            )
        if ctx.present is None:
            self.alpha = alpha.detach().clone()
        else:  # the present tasks' entries only (NaN for tasks not seen yet)
            base = (
                torch.full((full,), float("nan"), dtype=torch.float64, device=alpha.device)
                if held is None
                else held.to(device=alpha.device, dtype=torch.float64)
            )
            idx = torch.tensor(ctx.present, device=alpha.device)
            self.alpha = base.index_put((idx,), alpha.detach())
        return self._clip(alpha * self._scale(m), gramian)

    def _clip(self, w: Tensor, gramian: Tensor) -> Tensor:
        if self.max_norm <= 0:
            return w
        g = gramian.detach().to(torch.float64)
        norm = float((w @ g @ w).clamp_min(0).sqrt())
        return w * (self.max_norm / norm) if norm > self.max_norm else w
