"""PCD: the paper's optimality conditions (Thm. 4.2) checked on explicit gradient vectors, the
two-objective closed form (Cor. 4.6) with the EMA normalisation over steps, parity with the
official code's working-set enumeration and with TorchJD 0.18; special cases; resume."""

from __future__ import annotations

import warnings
from itertools import combinations

import numpy as np
import pytest
import torch

from mtlbal.aggregation import PCD, PCDInfeasibleWarning
from mtlbal.functional import pcd_qp

from ._agg3_helpers import F64, KINDS, MS, jacobian
from ._methods_helpers import check_resume


def _ema_scales(history: list[np.ndarray], beta: float, eps: float) -> np.ndarray:
    # Def. 4.5: v ← β v + (1 − β)‖g‖², v̂ = v / (1 − β^t), s = 1/√(v̂ + ε)
    v = np.zeros(history[0].shape[0])
    for jac in history:
        v = beta * v + (1 - beta) * (jac**2).sum(1)
    vhat = v / (1 - beta ** len(history))
    return 1.0 / np.sqrt(vhat + eps)


# ---------------------------------------------------------------- the paper's equations
@pytest.mark.parametrize("m", [2, 3, 4, 6])
def test_kkt_conditions_on_explicit_vectors(m: int) -> None:
    # Def. 4.1 / Thm. 4.2: d̃ = g̃_0 + Σ μ_j g̃_j, μ ≥ 0, g̃_jᵀd̃ ≥ τ‖g̃_j‖², μ_j (g̃_jᵀd̃ − τ‖g̃_j‖²) = 0
    # characterise the unique minimiser of the strictly convex problem; Algorithm 1 returns
    # d = d̃ ‖g_0‖ / ‖d̃‖
    rng = np.random.default_rng(m)
    tau, beta, eps = 0.3, 0.9, 1e-8
    agg = PCD(tau=tau, beta=beta, eps=eps)
    history = []
    for _ in range(5):
        jac = rng.normal(size=(m, 7))
        jac[1:] -= 0.8 * jac[0]  # secondaries that conflict with the primary
        jac *= rng.uniform(0.1, 10.0, size=(m, 1))  # scales the normalisation must remove
        history.append(jac)
        s = _ema_scales(history, beta, eps)
        gt = jac * s[:, None]
        jt = torch.as_tensor(jac)
        w = agg.weights(jt @ jt.T).numpy()
        d = w @ jac
        np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(jac[0]), rtol=1e-10)
        # recover d̃ and μ: d = c d̃ with c = ‖g_0‖/‖d̃‖, w = c (1, μ) ⊙ s
        c = w[0] / s[0]
        mu = w[1:] / (c * s[1:])
        dt = d / c
        np.testing.assert_allclose(dt, gt[0] + mu @ gt[1:], rtol=1e-10, atol=1e-12)
        slack = gt[1:] @ dt - tau * (gt[1:] ** 2).sum(1)
        assert (mu >= 0).all()
        assert (slack >= -1e-10).all(), slack
        np.testing.assert_allclose(mu * slack, 0.0, atol=1e-10)


def test_two_objectives_closed_form_over_steps() -> None:
    # Cor. 4.6 (K = 2): d̃ = g̃_1 + max(0, (τ‖g̃_2‖² − g̃_1ᵀg̃_2)/‖g̃_2‖²) g̃_2
    rng = np.random.default_rng(0)
    tau, beta = 0.05, 0.99
    agg = PCD(tau=tau, beta=beta)
    history = []
    for _ in range(6):
        jac = rng.normal(size=(2, 5)) * np.array([[1.0], [30.0]])
        history.append(jac)
        s = _ema_scales(history, beta, 1e-8)
        g1, g2 = jac[0] * s[0], jac[1] * s[1]
        dt = g1 + max(0.0, (tau * g2 @ g2 - g1 @ g2) / (g2 @ g2)) * g2
        d_ref = dt * np.linalg.norm(jac[0]) / np.linalg.norm(dt)
        jt = torch.as_tensor(jac)
        np.testing.assert_allclose(agg(jt).numpy(), d_ref, rtol=1e-11, atol=1e-13)


def test_secondary_scale_is_irrelevant() -> None:
    # the normalisation makes τ scale-free: a secondary multiplied by the same constant at every
    # step leaves the update unchanged (exactly with eps = 0)
    gen = torch.Generator().manual_seed(3)
    a, b = PCD(tau=0.2, eps=0.0), PCD(tau=0.2, eps=0.0)
    for _ in range(4):
        jac = torch.randn(3, 6, dtype=F64, generator=gen)
        jac2 = jac * torch.tensor([[1.0], [1e3], [1e-3]], dtype=F64)
        torch.testing.assert_close(a(jac), b(jac2), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the official code
def _official_solve(gram: np.ndarray, tau: float, tol: float = 1e-9) -> np.ndarray:
    # the working-set enumeration of DaraVaram/priority-constrained-descent@8000bb8 pcd/qp.py
    # (solve_qp, App. B.2), re-implemented
    k = gram.shape[0]
    w = np.zeros(k)
    w[0] = 1.0
    gs = gram[1:, 1:]
    b = tau * np.diag(gs) - gram[1:, 0]
    if np.all(b <= 0):
        return w
    atol = tol * max(float(np.max(np.diag(gram))), np.finfo(np.float64).tiny)
    cand = [j for j in range(k - 1) if gs[j, j] > 0]
    for size in range(1, len(cand) + 1):
        for sub in combinations(cand, size):
            a = list(sub)
            ga = gs[np.ix_(a, a)]
            if len(a) > 1:
                dd = np.sqrt(np.diag(ga))
                if np.linalg.eigvalsh(ga / np.outer(dd, dd))[0] <= tol:
                    continue
            mu = np.linalg.solve(ga, b[a])
            if np.any(mu < -tol):
                continue
            mu = np.maximum(mu, 0.0)
            if np.all(gs[:, a] @ mu - b >= -atol):
                w[1 + np.asarray(a)] = mu
                return w
    return w  # infeasible: e_0


def _official_step(jac: np.ndarray, norm: dict, tau: float) -> np.ndarray:
    # PCD.apply_gradients of pcd/optim.py with EMANormalizer (pcd/normalize.py), same commit
    gram = jac @ jac.T
    norm["t"] += 1
    norm["v"] = 0.999 * norm["v"] + 0.001 * np.diag(gram)
    s = 1.0 / np.sqrt(norm["v"] / (1 - 0.999 ** norm["t"]) + 1e-8)
    if gram[0, 0] == 0:
        return np.zeros(jac.shape[1])
    coef = _official_solve(gram * np.outer(s, s), tau) * s
    d = coef @ jac
    nd = np.linalg.norm(d)
    return d * np.sqrt(gram[0, 0]) / nd if nd > 0 else d


@pytest.mark.parametrize("m", [2, 3, 5, 7])
def test_official_parity(m: int) -> None:
    rng = np.random.default_rng(100 + m)
    norm = {"t": 0, "v": np.zeros(m)}
    agg = PCD(tau=0.1, on_infeasible="primary")
    for _ in range(5):
        jac = rng.normal(size=(m, 2 * m))
        jac[1:] -= 0.5 * jac[0]
        d_ref = _official_step(jac, norm, 0.1)
        np.testing.assert_allclose(agg(torch.as_tensor(jac)).numpy(), d_ref, rtol=1e-9, atol=1e-11)


def test_qp_matches_enumeration_on_many_problems() -> None:
    rng = np.random.default_rng(7)
    for trial in range(60):
        m = int(rng.integers(2, 7))
        jac = rng.normal(size=(m, int(rng.integers(2, 9))))
        tau = float(rng.uniform(0, 1))
        g = jac @ jac.T
        w, feasible = pcd_qp(g, tau)
        ref = _official_solve(g, tau)
        if feasible:  # directions: the multipliers are unique only for independent rows
            np.testing.assert_allclose(w @ jac, ref @ jac, rtol=1e-8, atol=1e-9, err_msg=str(trial))


# ---------------------------------------------------------------- TorchJD 0.18
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", MS)
def test_torchjd_parity(kind: str, m: int) -> None:
    import torchjd.aggregation as tj

    for seed in range(2):
        gen = torch.Generator().manual_seed(3000 * m + seed)
        theirs = tj.PCDWeighting(tau=0.02, beta=0.999, eps=1e-8)
        ours = PCD(on_infeasible="primary")
        for _ in range(3):
            jac = jacobian(kind, m, 2 * m + 1, gen)
            g = jac @ jac.T
            w_tj, w = theirs(g), ours.weights(g)
            d_tj, d = w_tj @ jac, w @ jac
            # the update (the weights are not unique when the rows are dependent)
            torch.testing.assert_close(
                d, d_tj, rtol=1e-9, atol=1e-12 * max(1.0, float(jac.abs().max()))
            )
            if kind == "full" and m <= 2 * m + 1:
                torch.testing.assert_close(w, w_tj, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours.sq_norm_ema, theirs._sq_norm_ema, rtol=1e-14, atol=0)


# ---------------------------------------------------------------- special cases
def test_infeasible_constraints_follow_the_primary() -> None:
    jac = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=F64)
    with pytest.warns(PCDInfeasibleWarning):
        d = PCD(tau=0.1)(jac)
    torch.testing.assert_close(d, jac[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(PCD(tau=0.1, on_infeasible="primary")(jac), jac[0])
    with pytest.raises(RuntimeError, match="no common solution"):
        PCD(tau=0.1, on_infeasible="raise")(jac)


def test_zero_primary_gives_zero_and_still_updates_the_average() -> None:
    agg = PCD()
    jac = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=F64)
    torch.testing.assert_close(agg(jac), torch.zeros(2, dtype=F64))
    torch.testing.assert_close(agg.sq_norm_ema, torch.tensor([0.0, 5e-3], dtype=F64))
    assert int(agg.steps) == 1


def test_cancelling_direction_gives_zero() -> None:
    # τ = 0 and g_1 = −g_0: the closest direction keeping g_1 from getting worse is 0
    jac = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=F64)
    torch.testing.assert_close(PCD(tau=0.0)(jac), torch.zeros(2, dtype=F64))


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match=r"tau must be in \[0, 1\]"):
        PCD(tau=1.5)
    with pytest.raises(ValueError, match="beta must be in"):
        PCD(beta=1.0)
    with pytest.raises(ValueError, match="on_infeasible"):
        PCD(on_infeasible="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tau has 2 entries for 1 secondary tasks"):
        PCD(tau=[0.1, 0.2]).weights(torch.eye(2, dtype=F64))
    agg = PCD()
    agg.weights(torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="PCD holds norms for 3 tasks, got 2"):
        agg.weights(torch.eye(2, dtype=F64))


def test_per_secondary_tau() -> None:
    # one τ per secondary; on the first step with eps = 0, v̂ = ‖g‖², so s = 1/‖g‖
    jac = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-2.0, 0.0, 1.0]], dtype=F64)
    taus = torch.tensor([0.0, 0.5], dtype=F64)
    w = PCD(tau=[0.0, 0.5], eps=0.0).weights(jac @ jac.T)
    s = 1.0 / jac.norm(dim=1)
    c = w[0] / s[0]  # w = c (1, μ) ⊙ s
    dt = (w / c) @ jac  # d̃ in raw rows: Σ (1, μ)_i s_i g_i
    progress = (jac[1:] * s[1:, None]) @ dt
    assert bool((progress >= taus - 1e-12).all()), progress
    assert abs(float(progress[1]) - 0.5) < 1e-12  # the binding constraint holds with equality


def test_resume() -> None:
    check_resume(lambda: {"aggregator": PCD(tau=0.3, beta=0.9)})
