"""FairGrad: the paper's equations in float64, parity with TorchJD 0.18 and with the official
solve (OptMN-Lab/fairgrad @ 2b8cba1e3d070583ee1d00f8fc0ccc9bc4695c50, methods/weight_methods.py,
``FairGrad.fairgrad``: ``scipy.optimize.least_squares`` on ``Gx − (1/x)^{1/α}`` from ``x = 1/m``,
bounds ``[0, ∞)``), failures, scale."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from mtlbal.aggregation import FairGrad, FairGradSolverWarning
from mtlbal.functional import fairgrad_weights

from ._jacobians import F64, KINDS, MS, jacobian
from ._methods_helpers import check_resume

ALPHAS = (0.5, 1.0, 2.0, 5.0)


def _residual(g: torch.Tensor, x: torch.Tensor, alpha: float) -> float:
    target = x ** (-1.0 / alpha)
    return float(((g @ x - target).abs() / target).max())


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("m", MS)
def test_solves_the_papers_system(m: int, alpha: float) -> None:
    # Eq. 4 of the paper: (G x)_i = x_i^{-1/α}, x > 0, d = Jᵀx
    jac = jacobian("full", m, seed=1)
    g = jac @ jac.T
    x, ok = fairgrad_weights(g, alpha)
    assert ok and bool((x > 0).all())
    assert _residual(g, x, alpha) < 1e-8
    torch.testing.assert_close(FairGrad(alpha=alpha)(jac), x @ jac, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_closed_forms(alpha: float) -> None:
    # orthogonal gradients: ‖g_i‖² x_i = x_i^{-1/α}  ⇒  x_i = ‖g_i‖^{-2α/(1+α)}
    norms = torch.tensor([0.5, 2.0, 3.0], dtype=F64)
    jac = torch.diag(norms)
    x = FairGrad(alpha=alpha).weights(jac @ jac.T)
    torch.testing.assert_close(x, norms ** (-2 * alpha / (1 + alpha)), rtol=1e-9, atol=0)
    # m identical gradients g: m‖g‖² x = x^{-1/α}  ⇒  x = (m‖g‖²)^{-α/(1+α)}
    g = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    ident = g.expand(4, 3)
    x = FairGrad(alpha=alpha).weights(ident @ ident.T)
    expect = (4 * float(g @ g)) ** (-alpha / (1 + alpha))
    torch.testing.assert_close(x, torch.full((4,), expect, dtype=F64), rtol=1e-9, atol=0)


def test_alpha_zero_is_equal_weighting() -> None:
    jac = jacobian("full", 4, seed=2)
    torch.testing.assert_close(FairGrad(alpha=0)(jac), jac.sum(0))
    torch.testing.assert_close(FairGrad(alpha=0, reduction="mean")(jac), jac.mean(0))
    # the α → 0 limit of the solutions is 1 as well
    x, ok = fairgrad_weights(jac @ jac.T, 0.02)
    assert ok and float((x - 1).abs().max()) < 0.2


def _official(g: np.ndarray, alpha: float) -> np.ndarray:
    m = g.shape[0]

    def objfn(x: np.ndarray) -> np.ndarray:
        return np.dot(g, x) - np.power(1 / x, 1 / alpha)

    return least_squares(objfn, np.ones(m) / m, bounds=(0, np.inf)).x


# where the system has a solution: every row on one side (a zero Jacobian: d = 0)
SOLVABLE = [(k, m) for k in KINDS for m in MS]


@pytest.mark.parametrize(("kind", "m"), SOLVABLE)
def test_parity_with_torchjd_and_the_official_solve(kind: str, m: int) -> None:
    import torchjd.aggregation as tj

    jac = jacobian(kind, m, seed=3, same_side=True)
    g = jac @ jac.T
    for alpha in (1.0, 2.0):
        ours = FairGrad(alpha=alpha)(jac)
        scale = max(1.0, float(ours.abs().max()))
        theirs = tj.FairGrad(alpha=alpha)(jac)
        official = torch.as_tensor(_official(g.numpy(), alpha)) @ jac
        # least_squares stops at its own tolerances (~1e-8 relative); ours at a 1e-8 residual
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 * scale)
        torch.testing.assert_close(ours, official, rtol=0, atol=1e-6 * scale)


def test_zero_task_gradients_get_weight_zero() -> None:
    jac = jacobian("full", 4, seed=4)
    jac[1] = 0
    x = FairGrad(alpha=2.0).weights(jac @ jac.T)
    assert float(x[1]) == 0.0
    # the others solve the system without task 1 (its x_1 would be +∞ but multiplies 0)
    keep = [0, 2, 3]
    sub = jac[keep]
    torch.testing.assert_close(x[keep], FairGrad(alpha=2.0).weights(sub @ sub.T))
    assert torch.equal(FairGrad(alpha=2.0)(torch.zeros(3, 5, dtype=F64)), torch.zeros(5, dtype=F64))


@pytest.mark.parametrize("kind", ["collinear", "cancel"])
def test_no_solution_raises_or_warns(kind: str) -> None:
    # a non-negative combination of the gradients vanishes: the system has no solution
    if kind == "collinear":
        jac = jacobian("collinear", 4, seed=5)  # alternating signs
    else:
        g = torch.tensor([1.0, 2.0, -1.0], dtype=F64)
        jac = torch.stack([g, -g, torch.tensor([0.0, 1.0, 2.0], dtype=F64)])
    with pytest.raises(RuntimeError, match="no solution"):
        FairGrad(alpha=2.0)(jac)
    with pytest.warns(FairGradSolverWarning, match="last Newton iterate"):
        d = FairGrad(alpha=2.0, on_failure="warn")(jac)
    assert torch.isfinite(d).all()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("c", [1e-4, 1e4])
def test_degree_of_homogeneity(alpha: float, c: float) -> None:
    jac = jacobian("full", 5, seed=6)
    agg = FairGrad(alpha=alpha)
    deg = agg.homogeneity
    assert deg == pytest.approx((1 - alpha) / (1 + alpha))
    torch.testing.assert_close(agg(c * jac), c**deg * agg(jac), rtol=1e-9, atol=0)


def test_reduction_and_validation() -> None:
    jac = jacobian("full", 3, seed=7)
    torch.testing.assert_close(
        FairGrad(alpha=2.0, reduction="mean")(jac), FairGrad(alpha=2.0)(jac) / 3
    )
    with pytest.raises(ValueError, match="alpha"):
        FairGrad(alpha=-1.0)
    with pytest.raises(ValueError, match="on_failure"):
        FairGrad(alpha=1.0, on_failure="ignore")  # type: ignore[arg-type]
    assert FairGrad(alpha=1.0).host_sync and not FairGrad(alpha=1.0).is_stateful


def test_trains_and_resumes_with_the_default_configuration() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_resume(lambda: {"aggregator": FairGrad(alpha=2.0)})
