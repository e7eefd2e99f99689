"""UPGrad: independent float64 reference (scipy's bounded least squares), TorchJD parity,
the non-conflicting / permutation / homogeneity properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import cholesky
from scipy.optimize import lsq_linear

from mtlbal.aggregation import UPGrad
from mtlbal.aggregation.upgrad import nonneg_qp
from mtlbal.functional import upgrad_weights


def reference_weights(jac: np.ndarray, reg_eps: float) -> np.ndarray:
    """Σ_i argmin_{v ≥ e_i} vᵀ(G/tr G + reg·I)v, each QP as a bounded least squares."""
    m = jac.shape[0]
    g = jac @ jac.T
    a = g / np.trace(g) + reg_eps * np.eye(m)
    r = cholesky(a + 1e-300 * np.eye(m))  # a = rᵀ r
    total = np.zeros(m)
    for i in range(m):
        lo = np.zeros(m)
        lo[i] = 1.0
        res = lsq_linear(r, np.zeros(m), bounds=(lo, np.full(m, np.inf)), tol=1e-14, method="bvls")
        total += res.x
    return total


def _jac(seed: int, m: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(m, 1, generator=gen, dtype=torch.float64) * 3 + 0.1
    return torch.randn(m, n, generator=gen, dtype=torch.float64) * scales


@pytest.mark.parametrize(("m", "n"), [(2, 5), (3, 10), (5, 4), (7, 30)])
@pytest.mark.parametrize("reg_eps", [1e-4, 0.0])
def test_matches_independent_reference(m: int, n: int, reg_eps: float) -> None:
    if reg_eps == 0.0 and m > n:
        pytest.skip("singular Gramian needs the regulariser")
    for seed in range(5):
        jac = _jac(seed, m, n)
        ref = reference_weights(jac.numpy(), reg_eps)
        got = upgrad_weights(jac @ jac.T, reg_eps=reg_eps).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-9)


def test_torchjd_parity_mean_and_sum() -> None:
    import torchjd.aggregation as tj

    for seed, (m, n) in enumerate([(2, 5), (3, 7), (5, 4), (8, 20), (10, 3)] * 4):
        jac = _jac(seed, m, n)
        theirs = tj.UPGrad()(jac)  # preference 1/m: the mean scale
        torch.testing.assert_close(UPGrad(reduction="mean")(jac), theirs, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(UPGrad()(jac), m * theirs, rtol=1e-8, atol=1e-10)


def test_torchjd_parity_pref() -> None:
    import torchjd.aggregation as tj

    jac = _jac(5, 4, 9)
    pref = torch.tensor([0.1, 0.5, 0.2, 0.2], dtype=torch.float64)
    theirs = tj.UPGrad(pref_vector=pref)(jac)
    torch.testing.assert_close(UPGrad(pref=pref)(jac), theirs, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(UPGrad(pref=pref, reduction="mean")(jac), theirs / 4)


def test_identical_gradients_give_the_sum() -> None:
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    jac = g.repeat(4, 1)
    torch.testing.assert_close(UPGrad(reg_eps=0.0)(jac), 4 * g)
    torch.testing.assert_close(UPGrad(reg_eps=0.0, reduction="mean")(jac), g)


def test_non_conflicting_pair_is_unchanged() -> None:
    jac = torch.tensor([[1.0, 0.2], [0.1, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(UPGrad(reg_eps=0.0)(jac), jac.sum(0))


def test_conflicting_pair_closed_form() -> None:
    # g1 = e1, g2 = (-1, 1): projecting g1 onto {x: g2·x ≥ 0} gives (½, ½); g2 onto
    # {x: g1·x ≥ 0} gives (0, 1); the sum is (½, 3/2).
    jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        UPGrad(reg_eps=0.0)(jac), torch.tensor([0.5, 1.5], dtype=torch.float64)
    )


def test_small_scale_is_not_truncated() -> None:
    # TorchJD's default norm_eps=1e-4 turns this into the plain mean; ours stays homogeneous.
    jac = _jac(3, 4, 6)
    big = UPGrad()(jac)
    tiny = UPGrad()(jac * 1e-5)
    torch.testing.assert_close(tiny, big * 1e-5, rtol=1e-8, atol=0)


def test_zero_gramian_gives_pref() -> None:
    w = upgrad_weights(torch.zeros(3, 3, dtype=torch.float64))
    torch.testing.assert_close(w, torch.ones(3, dtype=torch.float64))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        upgrad_weights(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        upgrad_weights(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="pref"):
        upgrad_weights(torch.eye(3), torch.ones(2))
    with pytest.raises(ValueError, match="reg_eps"):
        UPGrad(reg_eps=-1.0)


@pytest.mark.parametrize("method", ["auto", "lawson-hanson"])
def test_nonneg_qp_kkt_and_reference(method: str) -> None:
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 12, 30):
        for _ in range(5):
            b = rng.normal(size=(m, m + 2))
            a = b @ b.T + 1e-3 * np.eye(m)
            q = rng.normal(size=m)
            x = nonneg_qp(a, q, method=method)  # type: ignore[arg-type]
            grad = a @ x + q
            assert (x >= 0).all()
            assert (grad >= -1e-9).all()
            assert np.abs(x * grad).max() < 1e-9
            # independent: bounded least squares on the Cholesky factor
            r = cholesky(a)
            ref = lsq_linear(
                r, -np.linalg.solve(r.T, q), bounds=(0, np.inf), method="bvls", tol=1e-14
            ).x
            np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-8)


dims = st.tuples(st.integers(2, 6), st.integers(0, 4))


@settings(max_examples=40, deadline=None)
@given(dims, st.integers(0, 10_000))
def test_property_non_conflicting(mn: tuple[int, int], seed: int) -> None:
    m, extra = mn
    jac = _jac(seed, m, m + extra)  # full row rank a.s.
    d = UPGrad(reg_eps=0.0)(jac)
    assert (jac @ d >= -1e-9 * jac.norm() * d.norm()).all()
    # with the regulariser the KKT conditions give (G/tr G + εI) v_i ≥ 0, so
    # J d = G w ≥ −ε·tr(G)·w elementwise
    gram = jac @ jac.T
    w = upgrad_weights(gram)
    bound = -1e-4 * torch.trace(gram) * w - 1e-9 * torch.trace(gram) * w.abs().max()
    assert (gram @ w >= bound).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 8), st.integers(0, 10_000))
def test_property_permutation_equivariance(m: int, n: int, seed: int) -> None:
    jac = _jac(seed, m, n)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    w = upgrad_weights(jac @ jac.T)
    wp = upgrad_weights(jac[perm] @ jac[perm].T)
    torch.testing.assert_close(wp, w[perm], rtol=1e-7, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 8), st.integers(0, 10_000), st.floats(1e-6, 1e6))
def test_property_homogeneity(m: int, n: int, seed: int, s: float) -> None:
    jac = _jac(seed, m, n)
    torch.testing.assert_close(UPGrad()(s * jac), s * UPGrad()(jac), rtol=1e-7, atol=0)
