"""DualProj: the dual QP checked against the primal projection (scipy, in the parameter
space), TorchJD parity, properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from mtlbal.aggregation import DualProj
from mtlbal.functional import dualproj_weights


def primal_projection(jac: np.ndarray, target: np.ndarray) -> np.ndarray:
    res = minimize(
        lambda x: 0.5 * np.sum((x - target) ** 2),
        target,
        jac=lambda x: x - target,
        constraints=[{"type": "ineq", "fun": lambda x: jac @ x, "jac": lambda x: jac}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    )
    return res.x


def _jac(seed: int, m: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(m, 1, generator=gen, dtype=torch.float64) * 3 + 0.1
    return torch.randn(m, n, generator=gen, dtype=torch.float64) * scales


@pytest.mark.parametrize(("m", "n"), [(2, 3), (3, 6), (5, 8)])
def test_matches_primal_projection(m: int, n: int) -> None:
    for seed in range(5):
        jac = _jac(seed, m, n)
        d = DualProj(reg_eps=0.0)(jac).numpy()
        ref = primal_projection(jac.numpy(), jac.sum(0).numpy())
        np.testing.assert_allclose(d, ref, rtol=0, atol=1e-6 * np.linalg.norm(ref) + 1e-9)


def test_torchjd_parity() -> None:
    import torchjd.aggregation as tj

    for seed, (m, n) in enumerate([(2, 5), (3, 7), (5, 4), (8, 20)] * 3):
        jac = _jac(seed, m, n)
        theirs = tj.DualProj()(jac)
        torch.testing.assert_close(DualProj(reduction="mean")(jac), theirs, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(DualProj()(jac), m * theirs, rtol=1e-8, atol=1e-10)


def test_non_conflicting_sum_is_unchanged() -> None:
    jac = torch.tensor([[1.0, 0.3], [0.2, 1.0], [0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(DualProj(reg_eps=0.0)(jac), jac.sum(0))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        dualproj_weights(torch.ones(2, 3))
    with pytest.raises(ValueError, match="pref"):
        dualproj_weights(torch.eye(2), torch.ones(3))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(0, 4), st.integers(0, 10_000), st.floats(1e-5, 1e5))
def test_properties(m: int, extra: int, seed: int, s: float) -> None:
    jac = _jac(seed, m, m + extra)
    d = DualProj(reg_eps=0.0)(jac)
    assert (jac @ d >= -1e-9 * jac.norm() * d.norm()).all()
    torch.testing.assert_close(DualProj()(s * jac), s * DualProj()(jac), rtol=1e-7, atol=0)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(DualProj()(jac[perm]), DualProj()(jac), rtol=1e-7, atol=1e-9)
