"""The fast solver paths of issue 10 (speed) against independent float64 references:

* UPGrad's batched QP solve (all ``m`` projections at once) against quadprog, one QP per task;
* CAGrad's projected active-set Newton dual solver against an independent SciPy solve of the
  dual (objective values: the minimiser ``w`` is not unique for a singular Gramian);
* ConFIG's Gramian path against ``numpy.linalg.pinv`` of the unit rows;
* TrimmedMean's sort-free ``trim_number = 1`` path against a NumPy sort;

on full-rank, rank-deficient, zero and collinear inputs, and the failure paths.
"""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import quadprog
import torch

import mtlbal.aggregation.cagrad as cagrad_mod
import mtlbal.aggregation.upgrad as upgrad_mod
from mtlbal.aggregation import ConFIG, TrimmedMean
from mtlbal.aggregation.conflict_free import config_direction
from mtlbal.aggregation.trimmed_mean import trimmed_mean
from mtlbal.functional import cagrad_weights, upgrad_weights

KINDS = ["full", "deficient", "zero", "collinear", "zero_rows"]


def _jacobian(kind: str, m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = 3 * m + 5
    scales = rng.uniform(0.1, 3.0, (m, 1))
    if kind == "full":
        return rng.standard_normal((m, n)) * scales + 0.3 * rng.standard_normal(n)
    if kind == "deficient":  # rank 3
        return (rng.standard_normal((m, 3)) @ rng.standard_normal((3, n))) * scales
    if kind == "zero":
        return np.zeros((m, n))
    if kind == "collinear":  # ± multiples of one direction
        return np.outer(rng.uniform(-2.0, 2.0, m), rng.standard_normal(n))
    j = rng.standard_normal((m, n)) * scales  # some rows zero
    j[: m // 3] = 0.0
    return j


# ---------------------------------------------------------------- UPGrad: batched QP solve


def _upgrad_quadprog(jac: np.ndarray, reg_eps: float) -> np.ndarray:
    """Σ_i argmin_{v ≥ e_i} ½ vᵀ Ã v, Ã = G/tr(G) + reg·I, one quadprog QP per task."""
    m = jac.shape[0]
    g = jac @ jac.T
    tr = np.trace(g)
    a = (g / tr if tr > 0 else np.zeros((m, m))) + reg_eps * np.eye(m)
    total = np.zeros(m)
    for i in range(m):
        lo = np.zeros(m)
        lo[i] = 1.0
        total += quadprog.solve_qp(a, np.zeros(m), np.eye(m), lo, 0)[0]
    return total


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [2, 7, 24, 64])
def test_batched_upgrad_matches_quadprog(kind: str, m: int) -> None:
    for seed in range(2):
        jac = _jacobian(kind, m, seed)
        ref = _upgrad_quadprog(jac, 1e-4)
        got = upgrad_weights(torch.as_tensor(jac @ jac.T)).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-8 * np.abs(ref).max())


def test_batched_upgrad_exact_projection_full_rank() -> None:
    # reg_eps = 0, a non-singular Gramian: the exact projections
    jac = _jacobian("full", 12, 3)
    ref = _upgrad_quadprog(jac, 0.0)
    got = upgrad_weights(torch.as_tensor(jac @ jac.T), reg_eps=0.0).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-9)


def test_batched_upgrad_needs_no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    # the batched active-set iteration alone solves these: the per-problem solver is not called
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("fallback used")

    monkeypatch.setattr(upgrad_mod, "nonneg_qp", refuse)
    for kind in ("full", "deficient", "collinear"):
        jac = _jacobian(kind, 40, 1)
        got = upgrad_weights(torch.as_tensor(jac @ jac.T)).numpy()
        np.testing.assert_allclose(got, _upgrad_quadprog(jac, 1e-4), rtol=1e-7, atol=1e-9)


def test_batched_qp_falls_back_then_raises_on_an_unbounded_problem() -> None:
    # a not positive definite matrix: min −½x² − x over x ≥ 0 has no minimiser
    a = torch.tensor([[-1.0]], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="nonneg_qp"):
        upgrad_mod.batched_nonneg_qp(a, torch.tensor([[-1.0]], dtype=torch.float64))


def test_batched_qp_cycling_budget_uses_the_exact_fallback() -> None:
    # max_iter=1 stops the batched iteration early: the unfinished problems are solved by
    # Lawson–Hanson, and the answer is still the QPs' solution
    jac = _jacobian("full", 16, 5)
    g = jac @ jac.T
    a = torch.as_tensor(g / np.trace(g) + 1e-4 * np.eye(16))
    x = upgrad_mod.batched_nonneg_qp(a, a.clone(), max_iter=1)
    w = (torch.ones(16, dtype=torch.float64) + x.sum(0)).numpy()
    np.testing.assert_allclose(w, _upgrad_quadprog(jac, 1e-4), rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------- CAGrad: Newton dual solver


def _cagrad_dual_reference(g: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """The CAGrad dual on the simplex (normalised Gramian) as a second-order cone program in
    cvxpy, written here independently of the code:
    min_w wᵀ a b + c‖g_0‖·‖(L w, 1e-4)‖ with a = LᵀL (= wᵀ a b + c‖g_0‖·sqrt(wᵀ a w + 1e-8))."""
    m = g.shape[0]
    a = g / (np.trace(g) / m)
    b = np.full(m, 1.0 / m)
    s = c * np.sqrt(b @ a @ b + 1e-8)
    lam, vec = np.linalg.eigh(a)
    root = np.sqrt(np.clip(lam, 0.0, None))[:, None] * vec.T  # a = rootᵀ root
    w = cp.Variable(m)
    z = cp.hstack([root @ w, np.array([1e-4])])
    prob = cp.Problem(cp.Minimize((a @ b) @ w + s * cp.norm(z)), [w >= 0, cp.sum(w) == 1])
    with warnings.catch_warnings():  # at these tolerances it may report "optimal_inaccurate"
        warnings.simplefilter("ignore")
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert prob.status in ("optimal", "optimal_inaccurate")
    ws = np.clip(np.asarray(w.value), 0.0, None)
    ws = ws / ws.sum()
    return ws, _cagrad_objective(g, c, ws)


def _cagrad_objective(g: np.ndarray, c: float, w: np.ndarray) -> float:
    m = g.shape[0]
    a = g / (np.trace(g) / m)
    b = np.full(m, 1.0 / m)
    s = c * np.sqrt(b @ a @ b + 1e-8)
    return float(w @ a @ b + s * np.sqrt(max(w @ a @ w, 0.0) + 1e-8))


@pytest.mark.parametrize("kind", ["full", "deficient", "collinear", "zero_rows"])
@pytest.mark.parametrize("m", [3, 10, 32])
@pytest.mark.parametrize("c", [0.4, 0.8])
def test_cagrad_newton_reaches_the_dual_minimum(kind: str, m: int, c: float) -> None:
    jac = _jacobian(kind, m, 7)
    g = jac @ jac.T
    w_ref, f_ref = _cagrad_dual_reference(g, c)
    a = g / (np.trace(g) / m)
    s = c * np.sqrt(np.full(m, 1.0 / m) @ a @ np.full(m, 1.0 / m) + 1e-8)
    w, converged, res = cagrad_mod._dual_newton(a, s, 1e-10, 200)
    assert converged and res <= 1e-10
    assert abs(w.sum() - 1.0) < 1e-12 and (w >= 0).all()
    f_new = _cagrad_objective(g, c, w)
    # the conic solver is accurate to ~1e-8: Newton's minimum is as low, or lower
    assert f_new <= f_ref + 1e-8 * max(1.0, abs(f_ref))
    # the direction J w is unique (strictly convex in z = J w): it matches the reference's
    z, z_ref = w @ jac, w_ref @ jac
    # (to the reference's accuracy, relative to the largest gradient)
    scale = float(np.linalg.norm(jac, axis=1).max())
    np.testing.assert_allclose(z, z_ref, rtol=0, atol=1e-5 * scale)


def test_cagrad_newton_needs_no_slsqp(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("SLSQP used")

    monkeypatch.setattr(cagrad_mod, "_dual_slsqp", refuse)
    for kind in ("full", "deficient", "collinear"):
        jac = _jacobian(kind, 48, 2)
        cagrad_weights(torch.as_tensor(jac @ jac.T), 0.4)


def test_cagrad_non_convergence_warns_or_raises() -> None:
    g = torch.as_tensor(_jacobian("full", 6, 0) @ _jacobian("full", 6, 0).T)
    with pytest.raises(RuntimeError, match="Newton solver did not converge"):
        cagrad_weights(g, max_iter=1, on_failure="raise")
    with pytest.warns(cagrad_mod.CAGradSolverWarning, match="Newton solver did not converge"):
        cagrad_weights(g, max_iter=1, on_failure="warn")


def test_cagrad_newton_and_slsqp_solvers_agree() -> None:
    for kind in ("full", "zero_rows"):
        jac = torch.as_tensor(_jacobian(kind, 8, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = cagrad_weights(jac @ jac.T, 0.4, solver="newton")
            b = cagrad_weights(jac @ jac.T, 0.4, solver="slsqp", ftol=1e-15, max_iter=1000)
        torch.testing.assert_close(a @ jac, b @ jac, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- ConFIG: Gramian path


def _config_reference(jac: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(jac, axis=1, keepdims=True)
    units = np.where(norms > 0, jac / np.where(norms > 0, norms, 1.0), 0.0)
    x = np.linalg.pinv(units) @ np.ones(jac.shape[0])
    u = x / np.linalg.norm(x)
    return (jac @ u).sum() * u


@pytest.mark.parametrize("m", [2, 5, 17, 64])
def test_config_gramian_path_matches_pinv(m: int) -> None:
    for seed in range(3):
        jac = _jacobian("full", m, seed)
        got = config_direction(torch.as_tensor(jac)).numpy()
        ref = _config_reference(jac)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9 * np.linalg.norm(ref))


def test_config_gramian_path_is_taken_and_svd_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    import mtlbal.aggregation.conflict_free as cf

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("SVD used")

    monkeypatch.setattr(cf, "_config_svd", refuse)
    jac = torch.as_tensor(_jacobian("full", 20, 0))
    ConFIG()(jac)


def test_config_ill_conditioned_goes_through_the_svd() -> None:
    # two nearly parallel gradients (cosine 1 − 1e-9): K's condition number ~1e9 > 1e6
    rng = np.random.default_rng(0)
    g1 = rng.standard_normal(30)
    jac = np.stack([g1, g1 + 4e-5 * rng.standard_normal(30), rng.standard_normal(30)])
    got = config_direction(torch.as_tensor(jac)).numpy()
    ref = _config_reference(jac)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.linalg.norm(ref))
    # rank-deficient (m > n) and zero rows: the SVD path, as before
    for kind in ("deficient", "zero_rows"):
        j = _jacobian(kind, 6, 1)
        d = config_direction(torch.as_tensor(j)).numpy()
        assert np.isfinite(d).all()


# ---------------------------------------------------------------- TrimmedMean: b = 1


def _trimmed_reference(jac: np.ndarray, b: int) -> np.ndarray:
    m = jac.shape[0]
    return np.sort(jac, axis=0)[b : m - b].mean(axis=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trimmed_mean_one_matches_sort(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    cases = [
        rng.standard_normal((5, 40)),
        rng.integers(-2, 3, (7, 200)).astype(float),  # many ties
        np.ones((4, 10)),  # constant columns
        np.concatenate([rng.standard_normal((6, 20)), np.full((1, 20), 1e30)]),  # a huge outlier
        np.concatenate([rng.standard_normal((6, 20)), np.full((2, 20), -1e30)]),  # two of them
        rng.standard_normal((3, 50)),  # m = 2b + 1: the median
    ]
    for jac in cases:
        got = trimmed_mean(torch.as_tensor(jac, dtype=dtype), 1).double().numpy()
        ref = _trimmed_reference(jac.astype(np.float32 if dtype == torch.float32 else float), 1)
        tol = 1e-6 if dtype == torch.float32 else 1e-13
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max()))
    # and through the aggregator, sum scale
    jac = rng.standard_normal((9, 30))
    got = TrimmedMean(1)(torch.as_tensor(jac)).numpy()
    np.testing.assert_allclose(got, 9 * _trimmed_reference(jac, 1), rtol=1e-12, atol=1e-12)
