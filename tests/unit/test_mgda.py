"""MGDA: float64 reference (an independent QP solve), closed form for two tasks, properties."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import mtlbal
from mtlbal.aggregation import MGDA
from mtlbal.aggregation.mgda import MGDASolverWarning
from mtlbal.functional import mgda_weights


def _random_jacobian(seed: int, m: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64)


def _qp_reference(G: np.ndarray) -> np.ndarray:
    m = G.shape[0]
    res = minimize(
        lambda w: w @ G @ w,
        np.full(m, 1.0 / m),
        jac=lambda w: 2 * G @ w,
        bounds=[(0.0, 1.0)] * m,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    assert res.success
    return np.asarray(res.x)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("m", [3, 5, 8])
def test_min_norm_matches_independent_qp(seed: int, m: int) -> None:
    # n ≥ m, the regime of deep nets (n ≫ m): Frank–Wolfe reaches the QP optimum
    J = _random_jacobian(seed, m, 3 * m)
    G = J @ J.T
    w = mgda_weights(G, max_iter=20000, tol=1e-14)
    ref = _qp_reference(G.numpy())
    obj = float(w @ G @ w)
    obj_ref = float(ref @ G.numpy() @ ref)
    assert obj <= obj_ref * (1 + 1e-4) + 1e-10
    assert abs(float(w.sum()) - 1) < 1e-12 and (w >= 0).all()


@pytest.mark.parametrize("seed", range(6))
def test_frank_wolfe_gap_certifies_suboptimality_when_hull_is_degenerate(seed: int) -> None:
    # n < m: the optimum lies on a face and Frank–Wolfe converges at its O(1/k) rate; its duality
    # gap 2(wᵀGw − min_t (Gw)_t) bounds the distance to the QP optimum (computed independently)
    J = _random_jacobian(seed, 8, 4)
    G = J @ J.T
    w = mgda_weights(G, max_iter=250)
    ref = _qp_reference(G.numpy())
    obj, obj_ref = float(w @ G @ w), float(ref @ G.numpy() @ ref)
    gap = 2 * (obj - float((G @ w).min()))
    assert obj_ref - 1e-9 <= obj <= obj_ref + gap + 1e-9


def test_default_tolerance_is_close_to_optimum() -> None:
    for seed in range(5):
        J = _random_jacobian(seed, 6, 30)
        G = J @ J.T
        obj = float((lambda w: w @ G @ w)(mgda_weights(G)))
        ref = _qp_reference(G.numpy())
        assert obj <= float(ref @ G.numpy() @ ref) * 1.01 + 1e-9


def test_two_tasks_closed_form() -> None:
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([0.5, 1.0], dtype=torch.float64)
    J = torch.stack([g1, g2])
    gamma = float((g2 - g1) @ g2 / (g1 - g2).pow(2).sum())
    w = mgda_weights(J @ J.T)
    torch.testing.assert_close(w, torch.tensor([gamma, 1 - gamma], dtype=torch.float64))
    # boundary: ⟨g1, g2⟩ ≥ ‖g1‖², the min-norm point is g1 itself (paper: γ = 1); the
    # reference code clips to 0.999 / 0.001
    J = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.1])]).double()
    torch.testing.assert_close(mgda_weights(J @ J.T), torch.tensor([1.0, 0.0]).double())
    torch.testing.assert_close(
        mgda_weights(J @ J.T, clip=0.001), torch.tensor([0.999, 0.001], dtype=torch.float64)
    )
    torch.testing.assert_close(
        MGDA(line_search="reference", reduction="mean").weights(J @ J.T),
        torch.tensor([0.999, 0.001], dtype=torch.float64),
    )


def test_scale_convention() -> None:
    J = _random_jacobian(0, 4, 10)
    d_sum = MGDA()(J)
    d_mean = MGDA(reduction="mean")(J)
    torch.testing.assert_close(d_sum, 4 * d_mean)
    # identical gradients: "sum" returns Σ_t g_t
    same = J[:1].repeat(3, 1)
    torch.testing.assert_close(MGDA()(same), 3 * J[0], rtol=1e-3, atol=1e-6)


def test_normalisations_apply_to_raw_gradients() -> None:
    J = _random_jacobian(1, 3, 10)
    n = J.norm(dim=1)
    G = J @ J.T
    w = MGDA(normalization="l2", reduction="mean").weights(G)
    Gn = G / (n[:, None] * n[None, :])
    torch.testing.assert_close(w, mgda_weights(Gn) / n)
    agg = MGDA(normalization="loss", reduction="mean")
    with pytest.raises(ValueError, match="losses"):
        agg.weights(G)
    L = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        agg.weights(G, losses=L), mgda_weights(G / (L[:, None] * L[None, :])) / L
    )


def test_parity_with_torchjd() -> None:
    import torchjd.aggregation as tja

    for seed in range(4):
        J = _random_jacobian(seed, 4, 20)
        G = J @ J.T
        ours = mgda_weights(G, max_iter=5000, tol=1e-12)
        theirs = tja.MGDAWeighting(epsilon=1e-9, max_iters=10000)(G)
        # both minimise wᵀGw on the simplex (TorchJD: convex weights, as our "mean")
        torch.testing.assert_close(
            (ours @ G @ ours), (theirs @ G @ theirs).to(torch.float64), rtol=1e-3, atol=1e-9
        )


def test_mgda_ub_at_cut_uses_representation_gramian() -> None:
    from conftest import make_problem

    p = make_problem(3, dtype=torch.float64)
    bal = mtlbal.Balancer(p.trunk, at=p.trunk, aggregator=MGDA())
    info = bal.backward(p.losses())
    # reference: per-task gradients of the trunk output, flattened over the batch
    z = p.trunk(p.x).detach().requires_grad_(True)
    rows = []
    for h, y, t in zip(p.heads, p.ys, range(3)):
        loss = (t + 1.0) * (h(z) - y).pow(2).mean()
        rows.append(torch.autograd.grad(loss, z)[0].flatten())
    Z = torch.stack(rows)
    torch.testing.assert_close(info.gramian, Z @ Z.T)
    torch.testing.assert_close(info.grad_weights, 3 * mgda_weights(Z @ Z.T))


# ---------------------------------------------------------------- properties
gram_seeds = st.integers(min_value=0, max_value=10_000)


@settings(max_examples=40, deadline=None)
@given(seed=gram_seeds, m=st.integers(2, 7), n=st.integers(2, 12))
def test_permutation_equivariance(seed: int, m: int, n: int) -> None:
    J = _random_jacobian(seed, m, n)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    w = mgda_weights(J @ J.T)
    wp = mgda_weights(J[perm] @ J[perm].T)
    torch.testing.assert_close(wp, w[perm], rtol=1e-6, atol=1e-8)


@settings(max_examples=40, deadline=None)
@given(seed=gram_seeds, m=st.integers(2, 7), scale=st.floats(1e-3, 1e3))
def test_positive_homogeneity(seed: int, m: int, scale: float) -> None:
    J = _random_jacobian(seed, m, 9)
    d = MGDA()(J)
    torch.testing.assert_close(MGDA()(scale * J), scale * d, rtol=1e-6, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(seed=gram_seeds, m=st.integers(2, 6))
def test_descent_for_every_task_when_tasks_agree_somewhere(seed: int, m: int) -> None:
    # with more dimensions than tasks, 0 is (almost surely) outside the hull: the min-norm
    # direction d satisfies ⟨d, g_t⟩ ≥ ‖d‖² > 0 for every task (KKT of the simplex QP)
    J = _random_jacobian(seed, m, 3 * m)
    G = J @ J.T
    w = mgda_weights(G, max_iter=20000, tol=1e-14)
    d = w @ J
    dots = J @ d
    assert (dots >= d.dot(d) * (1 - 1e-3) - 1e-9).all()


# ---- issue 8: a certified solver (duality-gap stopping rule) against an exact reference ----


def _exact_min_norm(G: np.ndarray) -> float:
    """min_{w ∈ Δ} wᵀGw by enumerating supports S: on S solve the KKT system
    [G_SS 1; 1ᵀ 0][w; μ] = [0; 1] and keep the w ≥ 0 with (Gw)_i ≥ wᵀGw for every i (the
    optimality conditions of this convex QP). Exact up to rounding, independent of the code."""
    m = G.shape[0]
    scale = float(np.abs(G).max())
    best = np.inf
    for k in range(1, m + 1):
        for sup in itertools.combinations(range(m), k):
            idx = list(sup)
            a = np.zeros((k + 1, k + 1))
            a[:k, :k] = G[np.ix_(idx, idx)]
            a[:k, k] = 1.0
            a[k, :k] = 1.0
            rhs = np.zeros(k + 1)
            rhs[k] = 1.0
            if np.linalg.cond(a) > 1e12:
                continue
            sol = np.linalg.solve(a, rhs)
            w = np.zeros(m)
            w[idx] = sol[:k]
            if (w < -1e-12).any():
                continue
            f = float(w @ G @ w)
            if ((G @ w) >= f - 1e-12 * scale).all():
                best = min(best, f)
    assert np.isfinite(best)
    return best


def _cases() -> list[tuple[str, int]]:
    return [
        (kind, seed) for kind in ("4x5", "10x23", "9x21", "rank3", "collinear") for seed in range(4)
    ]


def _case_jacobian(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "rank3":  # 7 tasks in a 3-D subspace of R^12, hull away from the origin
        q, _ = np.linalg.qr(rng.normal(size=(12, 3)))
        return (rng.normal(size=(7, 3)) + np.array([2.5, 0.0, 0.0])) @ q.T
    if kind == "collinear":  # positive multiples of one gradient, plus one other task
        g = rng.normal(size=9)
        jac = np.outer(rng.uniform(0.2, 3.0, size=5), g)
        return np.vstack([jac, rng.normal(size=9) + 0.5 * g])
    m, n = (int(x) for x in kind.split("x"))
    return rng.normal(size=(m, n))


@pytest.mark.parametrize(("kind", "seed"), _cases())
def test_default_returns_min_norm_point_to_1e6(kind: str, seed: int) -> None:
    jac = _case_jacobian(kind, seed)
    G = jac @ jac.T
    f_star = _exact_min_norm(G)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default certifies, it must not warn
        w = MGDA(reduction="mean").weights(torch.as_tensor(G))
    assert abs(float(w.sum()) - 1) < 1e-12 and (w >= 0).all()
    f = float(w.numpy() @ G @ w.numpy())
    assert f_star > 0
    assert f_star * (1 - 1e-12) <= f <= f_star * (1 + 1e-6)


def test_origin_in_hull_gives_zero_direction() -> None:
    jac = torch.tensor([[1.0, 0.5], [-1.0, 0.2], [0.0, -1.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = MGDA(reduction="mean")(jac)
    assert float(d.norm()) <= 1e-6 * float(jac.norm(dim=1).max())


def test_max_iter_without_certificate_warns() -> None:
    jac = _case_jacobian("10x23", 0)
    G = torch.as_tensor(jac @ jac.T)
    with pytest.warns(MGDASolverWarning, match="duality gap"):
        MGDA(max_iter=2).weights(G)


@pytest.mark.parametrize("normalization", ["loss", "loss+"])
@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_loss_normalisation_refuses_non_positive_losses(normalization: str, bad: float) -> None:
    jac = _case_jacobian("4x5", 0)
    G = torch.as_tensor(jac @ jac.T)
    agg = MGDA(normalization=normalization)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"task 2.*loss"):
        agg.weights(G, losses=torch.tensor([1.0, 2.0, bad, 0.5], dtype=G.dtype))
