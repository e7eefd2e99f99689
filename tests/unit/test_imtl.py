"""IMTL-G: the defining property (equal projections, Σα = 1) solved independently, TorchJD
parity, scale conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlbal.aggregation import IMTLG
from mtlbal.functional import imtlg_weights


def reference_alpha(jac: np.ndarray) -> np.ndarray:
    """Solve, in the n-dimensional space, the m equations: (u_1 − u_t)·(Jᵀα) = 0, Σα = 1."""
    m = jac.shape[0]
    u = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    rows = [(u[0] - u[t]) @ jac.T for t in range(1, m)] + [np.ones(m)]
    rhs = np.zeros(m)
    rhs[-1] = 1.0
    return np.linalg.solve(np.stack(rows), rhs)


def _jac(seed: int, m: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(m, 1, generator=gen, dtype=torch.float64) * 5 + 0.1
    return torch.randn(m, n, generator=gen, dtype=torch.float64) * scales


@pytest.mark.parametrize(("m", "n"), [(2, 3), (3, 8), (5, 5), (6, 40)])
def test_matches_independent_reference(m: int, n: int) -> None:
    for seed in range(5):
        jac = _jac(seed, m, n)
        alpha = imtlg_weights(jac @ jac.T)
        np.testing.assert_allclose(
            alpha.numpy(), reference_alpha(jac.numpy()), rtol=1e-8, atol=1e-10
        )


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(0, 5), st.integers(0, 10_000))
def test_property_equal_projections(m: int, extra: int, seed: int) -> None:
    jac = _jac(seed, m, m + extra)
    alpha = imtlg_weights(jac @ jac.T)
    assert abs(float(alpha.sum()) - 1.0) < 1e-9
    d = alpha @ jac
    proj = (jac @ d) / jac.norm(dim=1)
    torch.testing.assert_close(proj, proj[0].expand(m), rtol=1e-7, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(0, 10_000), st.floats(1e-5, 1e5))
def test_property_permutation_and_scale(m: int, seed: int, s: float) -> None:
    jac = _jac(seed, m, m + 2)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    a = imtlg_weights(jac @ jac.T)
    torch.testing.assert_close(
        imtlg_weights(jac[perm] @ jac[perm].T), a[perm], rtol=1e-6, atol=1e-9
    )
    torch.testing.assert_close(imtlg_weights(s * s * (jac @ jac.T)), a, rtol=1e-6, atol=1e-9)


def test_torchjd_parity() -> None:
    import torchjd.aggregation as tj

    for seed, (m, n) in enumerate([(2, 4), (3, 9), (5, 7)]):
        jac = _jac(seed, m, n)
        torch.testing.assert_close(
            IMTLG(reduction="mean")(jac), tj.IMTLG()(jac), rtol=1e-7, atol=1e-9
        )
        torch.testing.assert_close(IMTLG()(jac), m * tj.IMTLG()(jac), rtol=1e-7, atol=1e-9)


def test_scales_and_identical_gradients() -> None:
    g = torch.tensor([3.0, -1.0], dtype=torch.float64)
    jac = g.repeat(3, 1)
    torch.testing.assert_close(IMTLG()(jac), 3 * g)
    torch.testing.assert_close(IMTLG(reduction="mean")(jac), g)
    # two-task closed form: α ∝ (‖g_2‖, ‖g_1‖) for orthogonal gradients
    jac = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        imtlg_weights(jac @ jac.T), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    )


def test_single_task_and_bad_input() -> None:
    torch.testing.assert_close(imtlg_weights(torch.eye(1)), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        imtlg_weights(torch.ones(2, 3))


# ---- issue 8: collinear gradients get the documented minimum-norm answer ----


def _min_norm_reference(jac: np.ndarray, rtol: float) -> np.ndarray:
    """α of minimum Euclidean norm with Σα = 1 and ⟨Jᵀα, u_1 − u_t⟩ = 0 (t ≥ 2), written from
    the vectors: rows ``J(u_1 − u_t)/max‖g‖`` and a row of ones; singular values below
    ``rtol·σ_max`` are dropped."""
    m = jac.shape[0]
    u = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    rows = [jac @ (u[0] - u[t]) / np.linalg.norm(jac, axis=1).max() for t in range(1, m)]
    a = np.vstack([*rows, np.ones(m)])
    b = np.zeros(m)
    b[-1] = 1.0
    uu, s, vt = np.linalg.svd(a)
    keep = s > rtol * s[0]
    return vt[keep].T @ ((uu[:, keep].T @ b) / s[keep])


RTOL64 = float(np.sqrt(np.finfo(np.float64).eps))


@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("delta", [0.0, 1e-13, 1e-7])
def test_collinear_gradients_give_the_mean_direction(m: int, delta: float) -> None:
    """Positive multiples of one gradient (up to a perturbation δ whose effect on the system,
    O(δ²), is below the rank tolerance √eps):
    every α with Σα = 1 has equal projections; the documented answer is the minimum-norm α,
    i.e. α = 1/m — the update Σ_t g_t (sum scale) agrees with every task."""
    rng = np.random.default_rng(m)
    g = rng.normal(size=7)
    jac = np.outer(rng.uniform(0.5, 4.0, size=m), g) + delta * rng.normal(size=(m, 7))
    jt = torch.as_tensor(jac)
    alpha = IMTLG(reduction="mean").weights(jt @ jt.T).numpy()
    ref = _min_norm_reference(jac, RTOL64)
    np.testing.assert_allclose(ref, np.full(m, 1.0 / m), rtol=0, atol=1e-9)  # the reference
    np.testing.assert_allclose(alpha, ref, rtol=0, atol=1e-9)
    d = IMTLG()(jt).numpy()
    assert (jac @ d > 0).all()


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("delta", [1e-3, 1e-2])
def test_nearly_collinear_gradients_solve_exactly(m: int, delta: float) -> None:
    """Above the rank tolerance (δ² ≫ √eps) the system is solved exactly: equal projections
    onto every unit gradient, positive (the update agrees with every task), the reference's α."""
    rng = np.random.default_rng(10 + m)
    g = rng.normal(size=8)
    jac = np.outer(rng.uniform(0.5, 4.0, size=m), g) + delta * rng.normal(size=(m, 8))
    jt = torch.as_tensor(jac)
    alpha = IMTLG(reduction="mean").weights(jt @ jt.T).numpy()
    ref = _min_norm_reference(jac, RTOL64)
    np.testing.assert_allclose(alpha, ref, rtol=1e-6, atol=1e-9)
    d = jac.T @ alpha
    proj = jac @ d / np.linalg.norm(jac, axis=1)
    assert (proj > 0).all()
    np.testing.assert_allclose(proj, proj[0], rtol=1e-6)
