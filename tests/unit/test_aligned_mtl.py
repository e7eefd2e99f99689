"""Aligned-MTL: float64 reference from the SVD of J, TorchJD parity, properties, Balancer paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlbal
from mtlbal.aggregation import AlignedMTL
from mtlbal.functional import aligned_mtl_balance, aligned_mtl_weights

EPS32 = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------- independent reference
def reference_update(J: np.ndarray, w: np.ndarray, mode: str = "min") -> np.ndarray:
    """Paper, Procrustes form: J = U Σ Vᵀ; Ĵ = σ U_R V_Rᵀ; d = Ĵᵀ w (numpy, float64)."""
    m = J.shape[0]
    U, S, Vt = np.linalg.svd(J, full_matrices=False)  # S descending
    lam = S**2
    keep = lam > lam.max() * m * EPS32
    if not keep.any():
        return J.T @ w  # B = I convention for an all-zero J (d = 0 anyway)
    lam_k = lam[keep]
    if mode == "min":
        sigma = np.sqrt(lam_k.min())
    elif mode == "median":
        sigma = np.sqrt(np.sort(lam_k)[(len(lam_k) - 1) // 2])  # lower median
    else:
        sigma = np.sqrt(lam_k.mean())
    J_hat = sigma * U[:, keep] @ Vt[keep]
    return J_hat.T @ w


def ours_update(J: np.ndarray, w: np.ndarray, mode: str = "min") -> np.ndarray:
    Jt = torch.from_numpy(J)
    agg = AlignedMTL(weights=torch.from_numpy(w), scale_mode=mode)  # type: ignore[arg-type]
    return agg(Jt).numpy()


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("m,n", [(1, 5), (2, 7), (3, 3), (4, 9), (6, 20)])
def test_matches_svd_reference(mode: str, m: int, n: int) -> None:
    rng = np.random.default_rng(m * 31 + n)
    J = rng.standard_normal((m, n)) * rng.uniform(0.1, 10, size=(m, 1))
    w = rng.uniform(0.2, 2.0, size=m)
    np.testing.assert_allclose(ours_update(J, w, mode), reference_update(J, w, mode), atol=1e-10)


def test_aligned_rows_are_orthogonal_with_equal_norms() -> None:
    rng = np.random.default_rng(0)
    J = rng.standard_normal((4, 10)) * np.array([[10.0], [1.0], [0.1], [3.0]])
    G = torch.from_numpy(J @ J.T)
    B = aligned_mtl_balance(G).numpy()
    J_hat = B @ J  # rows: the aligned gradients Σ_j B_tj g_j
    S = np.linalg.svd(J, compute_uv=False)
    np.testing.assert_allclose(J_hat @ J_hat.T, S.min() ** 2 * np.eye(4), atol=1e-10)


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
def test_rank_deficient_matches_reference(mode: str) -> None:
    rng = np.random.default_rng(1)
    base = rng.standard_normal((2, 8))
    J = np.stack([base[0], base[1], 2.0 * base[0] - base[1], -base[1]])  # rank 2, m = 4
    w = np.array([1.0, 0.5, 2.0, 1.0])
    d = ours_update(J, w, mode)
    assert np.isfinite(d).all()
    np.testing.assert_allclose(d, reference_update(J, w, mode), atol=1e-10)


def test_official_rank_threshold_uses_float32_eps() -> None:
    # singular values 1 and 1e-5: λ = 1e-10 < 1·2·eps32 → dropped by the official threshold
    # (TorchJD's float64 eps would keep it and scale everything by 1e-5)
    J = np.array([[1.0, 0.0], [0.0, 1e-5]])
    w = np.ones(2)
    d = ours_update(J, w)
    np.testing.assert_allclose(d, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(d, reference_update(J, w), atol=1e-12)


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
def test_all_zero_gramian_is_defined(mode: str) -> None:
    G = torch.zeros(3, 3)
    alpha = aligned_mtl_weights(G, torch.tensor([1.0, 2.0, 3.0]), mode)  # type: ignore[arg-type]
    assert torch.isfinite(alpha).all()
    torch.testing.assert_close(alpha, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    d = AlignedMTL(scale_mode=mode)(torch.zeros(3, 5))
    assert torch.equal(d, torch.zeros(5))


def test_single_task_gives_w() -> None:
    J = torch.tensor([[3.0, -4.0]], dtype=torch.float64)
    torch.testing.assert_close(
        AlignedMTL(weights=[0.7]).weights(J @ J.T), torch.tensor([0.7]).double()
    )


def test_reduction_mean_is_w_over_m() -> None:
    J = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G = J @ J.T
    torch.testing.assert_close(AlignedMTL(reduction="mean").weights(G), AlignedMTL().weights(G) / 3)


# ---------------------------------------------------------------- TorchJD parity
@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("m", [2, 3, 5])
def test_torchjd_parity(mode: str, m: int) -> None:
    import torchjd.aggregation as tj

    gen = torch.Generator().manual_seed(m)
    J = torch.randn(m, 11, dtype=torch.float64, generator=gen)
    # TorchJD's default preference vector is 1/m: our reduction="mean"
    torch.testing.assert_close(
        AlignedMTL(scale_mode=mode, reduction="mean")(J), tj.AlignedMTL(scale_mode=mode)(J)
    )
    # an explicit preference vector p is our weights=p with reduction="sum"
    p = torch.rand(m, dtype=torch.float64, generator=gen) + 0.1
    torch.testing.assert_close(
        AlignedMTL(weights=p, scale_mode=mode)(J),
        tj.AlignedMTL(pref_vector=p, scale_mode=mode)(J),
    )


# ---------------------------------------------------------------- properties
def _gramians(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    m = draw(st.integers(1, 5))
    n = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, dtype=torch.float64, generator=gen)
    w = torch.rand(m, dtype=torch.float64, generator=gen) + 0.1
    return J, w


jw = st.composite(_gramians)


@settings(max_examples=60, deadline=None)
@given(jw(), st.integers(0, 1000))
def test_permutation_equivariance(jw_: tuple[torch.Tensor, torch.Tensor], pseed: int) -> None:
    J, w = jw_
    m = J.shape[0]
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(pseed))
    a = aligned_mtl_weights(J @ J.T, w)
    Jp = J[perm]
    ap = aligned_mtl_weights(Jp @ Jp.T, w[perm])
    torch.testing.assert_close(ap, a[perm], atol=1e-9, rtol=1e-7)


@settings(max_examples=60, deadline=None)
@given(jw(), st.floats(1e-3, 1e3))
def test_positive_homogeneity_min_mode(jw_: tuple[torch.Tensor, torch.Tensor], s: float) -> None:
    J, w = jw_
    agg = AlignedMTL(weights=w, scale_mode="min")
    d = agg(J)
    ds = agg(s * J)
    torch.testing.assert_close(ds, s * d, atol=1e-9 * max(1.0, s), rtol=1e-7)


@settings(max_examples=60, deadline=None)
@given(jw())
def test_balance_eigenvalues_at_most_one_in_min_mode(
    jw_: tuple[torch.Tensor, torch.Tensor],
) -> None:
    J, _ = jw_
    B = aligned_mtl_balance(J @ J.T, "min")
    torch.testing.assert_close(B, B.T)
    assert torch.linalg.eigvalsh(B).max() <= 1.0 + 1e-9
    assert torch.linalg.eigvalsh(B).min() >= -1e-9


@settings(max_examples=30, deadline=None)
@given(st.floats(-5, 5).filter(lambda x: abs(x) > 1e-3), st.floats(0.1, 3.0), st.integers(1, 6))
def test_one_task_alpha_is_w(g: float, w: float, n: int) -> None:
    J = torch.full((1, n), g, dtype=torch.float64)
    alpha = aligned_mtl_weights(J @ J.T, torch.tensor([w], dtype=torch.float64))
    torch.testing.assert_close(alpha, torch.tensor([w], dtype=torch.float64))


# ---------------------------------------------------------------- errors
def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="scale_mode"):
        AlignedMTL(scale_mode="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        AlignedMTL(weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="2 task weights for 3 tasks"):
        AlignedMTL(weights=[1.0, 1.0]).weights(torch.eye(3))
    with pytest.raises(ValueError, match="square"):
        aligned_mtl_balance(torch.zeros(2, 3))


# ---------------------------------------------------------------- through the Balancer
class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList([torch.nn.Linear(5, 1) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [h(z).squeeze(-1) for h in self.heads]


def _losses(outs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    return [
        (outs[0] - y[:, 0]).pow(2).mean(),
        (outs[1] - y[:, 1]).abs().mean(),
        outs[2].exp().mean(),
    ]


def test_params_path_matches_reference() -> None:
    net = Net().double()
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    shared = list(net.trunk.parameters())
    # reference: per-task gradients by separate autograd calls
    _, outs = net(x)
    losses = _losses(outs, y)
    rows = []
    for loss in losses:
        gs = torch.autograd.grad(loss, shared, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    J = torch.stack(rows).numpy()
    d_ref = reference_update(J, np.ones(3))
    head_ref = torch.autograd.grad(sum(losses), list(net.heads[1].parameters()))

    b = mtlbal.Balancer(net.trunk, aggregator=AlignedMTL())
    _, outs = net(x)
    b.backward(_losses(outs, y))
    d = torch.cat([p.grad.reshape(-1) for p in shared]).numpy()  # type: ignore[union-attr]
    np.testing.assert_allclose(d, d_ref, atol=1e-10)
    for p, g in zip(net.heads[1].parameters(), head_ref):  # heads: raw gradient of Σ L_t
        torch.testing.assert_close(p.grad, g)


def test_cut_point_uses_per_sample_flattened_gramian() -> None:
    """Aligned-MTL-UB: the Gramian of the representation gradients with every sample kept."""
    net = Net().double()
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    # reference: Z_t = ∂L_t/∂z, [8, 5], flattened to 40 entries
    z = net.trunk(x)
    zd = z.detach().requires_grad_(True)
    losses = _losses([h(zd).squeeze(-1) for h in net.heads], y)
    Z = torch.stack([torch.autograd.grad(l_, zd, retain_graph=True)[0] for l_ in losses])
    flat = Z.reshape(3, -1)
    G_flat = flat @ flat.T
    summed = Z.sum(1)  # LibMTL's batch-summed form, [3, 5]
    G_sum = summed @ summed.T
    assert not torch.allclose(G_flat, G_sum, rtol=1e-3)
    d_ref = reference_update(flat.numpy(), np.ones(3))  # combined gradient at z, [40]
    cot = torch.from_numpy(d_ref).reshape(8, 5)
    trunk_ref = torch.autograd.grad(z, list(net.trunk.parameters()), cot)

    b = mtlbal.Balancer(net.trunk, aggregator=AlignedMTL(), at=net.trunk)
    _, outs = net(x)
    info = b.backward(_losses(outs, y))
    assert info.gramian is not None
    torch.testing.assert_close(info.gramian, G_flat)
    for p, g in zip(net.trunk.parameters(), trunk_ref):
        torch.testing.assert_close(p.grad, g)
    alpha = aligned_mtl_weights(G_flat)
    torch.testing.assert_close(info.grad_weights, alpha)


def test_float32_input_and_state_round_trip() -> None:
    agg = AlignedMTL(weights=[1.0, 2.0], scale_mode="median", reduction="mean")
    J = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    d = agg(J)
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
    fresh = AlignedMTL(weights=[1.0, 2.0], scale_mode="median", reduction="mean")
    fresh.load_state_dict(agg.state_dict())
    assert torch.equal(fresh(J), d)
    assert "median" in repr(agg)
