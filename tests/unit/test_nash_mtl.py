"""Nash-MTL: the defining equation α_i (Gα)_i = 1 checked on the Jacobian, an independent
root-finder (scipy's hybrid Powell) as reference, degree −1 homogeneity, warm start state,
failure handling (raise / warn, never a silent fallback), resume."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import fsolve

from mtlbal.aggregation import NashMTL
from mtlbal.aggregation.nash_mtl import NashMTLSolverWarning
from mtlbal.functional import nash_mtl_weights

from ._methods_helpers import check_resume


def _jac(seed: int, m: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(m, 1, generator=gen, dtype=torch.float64) * 5 + 0.1
    return torch.randn(m, n, generator=gen, dtype=torch.float64) * scales


@pytest.mark.parametrize(("m", "n"), [(2, 3), (3, 8), (5, 6), (8, 30)])
def test_defining_equation_and_fsolve(m: int, n: int) -> None:
    for seed in range(5):
        jac = _jac(seed, m, n)
        alpha, ok = nash_mtl_weights(jac @ jac.T)
        assert ok
        a = alpha.numpy()
        assert (a > 0).all()
        j = jac.numpy()
        d = j.T @ a
        np.testing.assert_allclose(a * (j @ d), np.ones(m), rtol=0, atol=1e-8)
        # independent: hybrid Powell on Gα − 1/α from the normalised all-ones start
        g = j @ j.T
        s = np.sqrt(np.linalg.norm(g))
        ref = fsolve(lambda x, g=g: g @ x - 1.0 / x, np.ones(m) / s, xtol=1e-13)
        np.testing.assert_allclose(a, ref, rtol=1e-7)


def test_orthogonal_closed_form_and_scales() -> None:
    jac = torch.diag(torch.tensor([2.0, 0.5, 4.0], dtype=torch.float64))
    expected = torch.tensor([0.5, 2.0, 0.25], dtype=torch.float64)
    torch.testing.assert_close(NashMTL().weights(jac @ jac.T), expected)
    torch.testing.assert_close(NashMTL(reduction="mean").weights(jac @ jac.T), expected / 3)
    # identical gradients: d = √m g/‖g‖
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    d = NashMTL()(g.repeat(4, 1))
    torch.testing.assert_close(d, 2.0 * g / 5.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(0, 10_000), st.floats(1e-4, 1e4))
def test_property_homogeneity_degree_zero(m: int, seed: int, s: float) -> None:
    jac = _jac(seed, m, m + 3)
    d = NashMTL()(jac)
    torch.testing.assert_close(NashMTL()(s * jac), d, rtol=1e-7, atol=1e-9)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    a, _ = nash_mtl_weights(jac @ jac.T)
    b, _ = nash_mtl_weights(jac[perm] @ jac[perm].T)
    torch.testing.assert_close(b, a[perm], rtol=1e-7, atol=0)


def test_warm_start_state() -> None:
    jac = _jac(1, 3, 5)
    nash = NashMTL()
    w1 = nash.weights(jac @ jac.T)
    assert nash.alpha is not None
    torch.testing.assert_close(nash.alpha, w1)
    # a warm start anywhere in the orthant gives the same unique solution
    far, ok = nash_mtl_weights(jac @ jac.T, torch.tensor([1e3, 1e-3, 5.0]))
    assert ok
    torch.testing.assert_close(far, w1)
    other = NashMTL()
    other.load_state_dict(nash.state_dict())
    torch.testing.assert_close(other.alpha, nash.alpha)


def test_update_every_reuses_alpha() -> None:
    nash = NashMTL(update_every=2)
    a, b, c = _jac(0, 2, 4), _jac(1, 2, 4), _jac(2, 2, 4)
    wa = nash.weights(a @ a.T)
    torch.testing.assert_close(nash.weights(b @ b.T), wa)
    torch.testing.assert_close(nash.weights(c @ c.T), nash_mtl_weights(c @ c.T)[0])


@pytest.mark.parametrize(
    "jac",
    [
        torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64),  # g2 = −g1
        torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64),  # a zero gradient
    ],
)
def test_unsolvable_raises_or_warns(jac: torch.Tensor) -> None:
    with pytest.raises(RuntimeError, match="no solution"):
        NashMTL()(jac)
    nash = NashMTL(on_failure="warn")
    good = _jac(0, 2, 2)
    w_good = nash.weights(good @ good.T)
    with pytest.warns(NashMTLSolverWarning, match="previous"):
        w = nash.weights(jac @ jac.T)
    torch.testing.assert_close(w, w_good)
    assert int(nash.num_failures) == 1


def test_max_norm_clip() -> None:
    jac = torch.diag(torch.tensor([0.1, 0.2], dtype=torch.float64))  # ‖d‖ = √2 unclipped
    d = NashMTL(max_norm=1.0)(jac)
    torch.testing.assert_close(d.norm(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(d, NashMTL()(jac) / 2**0.5)
    torch.testing.assert_close(NashMTL(max_norm=5.0)(jac), NashMTL()(jac))


def test_torchjd_parity() -> None:
    import torchjd.aggregation as tj

    for seed, (m, n) in enumerate([(2, 5), (3, 7), (5, 9)]):
        jac = _jac(seed, m, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cvxpy's DPP notice
            theirs = tj.NashMTL(n_tasks=m, max_norm=0.0)(jac)
        # their CCCP stops at ‖Gα − 1/α‖ < 1e-3; ours solves to 1e-8
        torch.testing.assert_close(NashMTL()(jac), theirs, rtol=1e-3, atol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = tj.NashMTL(n_tasks=m)(jac)  # their default max_norm = 1.0
        torch.testing.assert_close(NashMTL(max_norm=1.0)(jac), theirs, rtol=1e-3, atol=0)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="on_failure"):
        NashMTL(on_failure="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-finite"):
        nash_mtl_weights(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]))
    nash = NashMTL()
    nash.weights(torch.eye(2))
    with pytest.raises(ValueError, match="holds α for 2 tasks"):
        nash.weights(torch.eye(3))


def test_resume() -> None:
    check_resume(lambda: {"aggregator": NashMTL()})
