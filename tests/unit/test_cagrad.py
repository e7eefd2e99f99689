"""CAGrad: the dual solve checked against an independent primal solve (epigraph form in the
parameter space) and a 1-D bounded search for two tasks; scales, rescale modes, failures."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar

from mtlbal.aggregation import CAGrad
from mtlbal.functional import cagrad_weights


def primal_direction(jac: np.ndarray, c: float) -> np.ndarray:
    """max_d min_t ⟨g_t, d⟩ s.t. ‖d − g_0‖ ≤ r = c‖g_0‖, solved exactly from its KKT conditions.

    For an active set A (rows J_A, linearly independent) the optimum is d = g_0 + r J_Aᵀν with
    ν ≥ 0, ‖J_Aᵀν‖ = 1 and ⟨g_t, d⟩ = s on A: with K = J_A J_Aᵀ and v = J_A g_0 that is
    ν = K⁻¹(s1 − v)/r and a quadratic in s from νᵀKν = 1. Every A is enumerated and the point
    kept only if it satisfies the (sufficient, the problem being convex) KKT conditions: ν ≥ 0
    and ⟨g_t, d⟩ ≥ s for the other tasks. Independent of the code's dual solve on the simplex
    (and better converged than an iterative primal solve, which missed its own feasibility
    tolerance under OMP_NUM_THREADS=1)."""
    m, n = jac.shape
    g0 = jac.mean(0)
    r = c * float(np.linalg.norm(g0))
    scale = float(np.abs(jac @ g0).max()) + r * float(np.linalg.norm(jac, axis=1).max())
    found: list[tuple[float, np.ndarray]] = []
    for k in range(1, min(m, n) + 1):
        for sup in itertools.combinations(range(m), k):
            ja = jac[list(sup)]
            kk = ja @ ja.T
            if np.linalg.cond(kk) > 1e10:
                continue
            v = ja @ g0
            k1 = np.linalg.solve(kk, np.ones(k))
            kv = np.linalg.solve(kk, v)
            a, b, cc = float(k1.sum()), float(kv.sum()), float(v @ kv)
            disc = b * b - a * (cc - r * r)
            if disc < 0:
                continue
            for s in ((b + np.sqrt(disc)) / a, (b - np.sqrt(disc)) / a):
                nu = (s * k1 - kv) / r
                if (nu < 0).any():
                    continue
                d = g0 + r * (ja.T @ nu)
                if (jac @ d).min() < s - 1e-12 * scale:
                    continue
                found.append((float(s), d))
    assert found, "no KKT point"
    s_best, d = max(found, key=lambda x: x[0])
    # the optimum is unique: every KKT point found is the same one
    for s_other, d_other in found:
        assert abs(s_other - s_best) <= 1e-10 * scale
        np.testing.assert_allclose(d_other, d, rtol=0, atol=1e-9 * float(np.linalg.norm(d)))
    np.testing.assert_allclose(np.linalg.norm(d - g0), r, rtol=1e-12)
    return d


def _jac(seed: int, m: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(m, 1, generator=gen, dtype=torch.float64) * 3 + 0.2
    return torch.randn(m, n, generator=gen, dtype=torch.float64) * scales + 0.3


@pytest.mark.parametrize(("m", "n"), [(2, 4), (3, 6), (4, 8), (5, 5)])
@pytest.mark.parametrize("c", [0.2, 0.4, 0.8])
def test_matches_primal(m: int, n: int, c: float) -> None:
    for seed in range(3):
        jac = _jac(seed, m, n)
        d = CAGrad(c, rescale=0, reduction="mean")(jac).numpy()
        ref = primal_direction(jac.numpy(), c)
        np.testing.assert_allclose(d, ref, rtol=0, atol=2e-5 * np.linalg.norm(ref))


def test_two_tasks_against_bounded_search() -> None:
    for seed in range(5):
        jac = _jac(seed, 2, 3).numpy()
        g = jac @ jac.T
        b = np.full(2, 0.5)
        sphi = 0.4 * np.sqrt(b @ g @ b)

        def f(x: float, g: np.ndarray = g, b: np.ndarray = b, sphi: float = sphi) -> float:
            w = np.array([x, 1 - x])
            return float(w @ g @ b + sphi * np.sqrt(w @ g @ w))

        x = minimize_scalar(f, bounds=(0, 1), method="bounded", options={"xatol": 1e-12}).x
        w = np.array([x, 1 - x])
        d_ref = jac.mean(0) + sphi / np.linalg.norm(w @ jac) * (w @ jac)
        d = CAGrad(0.4, rescale=0, reduction="mean")(torch.as_tensor(jac)).numpy()
        np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-7)


def test_torchjd_parity() -> None:
    import torchjd.aggregation as tj

    for seed, (m, n) in enumerate([(2, 5), (3, 7), (5, 9)]):
        jac = _jac(seed, m, n)
        theirs = tj.CAGrad(c=0.4)(jac)  # mean scale, no rescale
        # both solvers are iterative (SLSQP here, an interior point there)
        torch.testing.assert_close(
            CAGrad(0.4, rescale=0, reduction="mean")(jac), theirs, rtol=0, atol=2e-4
        )


def test_rescale_and_reduction() -> None:
    jac = _jac(1, 3, 5)
    d0 = CAGrad(0.4, rescale=0, reduction="mean")(jac)
    torch.testing.assert_close(CAGrad(0.4, rescale=1, reduction="mean")(jac), d0 / 1.16)
    torch.testing.assert_close(CAGrad(0.4, rescale=2, reduction="mean")(jac), d0 / 1.4)
    torch.testing.assert_close(CAGrad(0.4, rescale=1)(jac), 3 * d0 / 1.16)


def test_c_zero_is_plain_sum() -> None:
    jac = _jac(2, 4, 6)
    torch.testing.assert_close(CAGrad(0.0)(jac), jac.sum(0))
    torch.testing.assert_close(CAGrad(0.0, reduction="mean")(jac), jac.mean(0))


def test_zero_gradients() -> None:
    torch.testing.assert_close(
        CAGrad()(torch.zeros(3, 4, dtype=torch.float64)), torch.zeros(4, dtype=torch.float64)
    )


def test_small_gradients_are_solved() -> None:
    # SLSQP's absolute tolerance would stop at uniform w on the raw scale; ours normalises.
    jac = _jac(4, 3, 5)
    torch.testing.assert_close(CAGrad()(jac * 1e-5), CAGrad()(jac) * 1e-5, rtol=1e-6, atol=0)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 5), st.integers(0, 10_000))
def test_property_worst_task_improvement(m: int, seed: int) -> None:
    # d maximises the worst improvement over the ball: no better than d by the primal's value,
    # and at least the mean gradient's worst improvement.
    jac = _jac(seed, m, m + 2)
    d = CAGrad(0.4, rescale=0, reduction="mean")(jac)
    g0 = jac.mean(0)
    assert float((d - g0).norm()) <= 0.4 * float(g0.norm()) * (1 + 1e-6)
    assert float((jac @ d).min()) >= float((jac @ g0).min()) - 1e-7 * float(jac.norm() ** 2)


def test_bad_input_and_failure() -> None:
    with pytest.raises(ValueError, match="rescale"):
        CAGrad(rescale=3)
    with pytest.raises(ValueError, match="c must"):
        CAGrad(-1.0)
    with pytest.raises(ValueError, match="non-finite"):
        cagrad_weights(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    jac = _jac(0, 4, 6)
    with pytest.raises(RuntimeError, match="SLSQP failed"):
        cagrad_weights(jac @ jac.T, max_iter=1, on_failure="raise")
    with pytest.warns(UserWarning, match="SLSQP failed"):
        cagrad_weights(jac @ jac.T, max_iter=1, on_failure="warn")
