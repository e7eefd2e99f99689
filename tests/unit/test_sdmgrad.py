"""SDMGrad: the paper's inner projected SGD on explicit gradient vectors (float64, bisection
projection) as reference; TorchJD 0.18 parity on the same cross matrix; parity with the
official code's and LibMTL's computation (re-implemented with torch.optim.SGD, as they do);
the sample layout through the Balancer; resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtlbal
from mtlbal.aggregation import SDMGrad, stack_samples
from mtlbal.functional import sdmgrad_step

from ._agg3_helpers import (
    F64,
    KINDS,
    MS,
    Net,
    batches,
    check_resume_samples,
    jacobian,
    per_sample_jacobians,
    simplex_bisection,
)


# ---------------------------------------------------------------- paper reference
def _reference(
    js: list[np.ndarray], w: np.ndarray, lam: float, lr: float, mom: float, n_iter: int
) -> tuple[np.ndarray, np.ndarray]:
    # arXiv:2305.18409, Algorithm 1 with the §6.1 normalisation: S projected SGD steps on
    # ½‖∇L (w + λ w̃)‖² with the stochastic gradient ∇L_ξᵀ ∇L_ξ' (w + λ w̃), then
    # d = ∇L_ζ (w + λ w̃) / (1 + λ), all on explicit gradient vectors
    m = w.shape[0]
    samples = len(js)
    j1, j2 = (js[0], js[1]) if samples > 1 else (js[0], js[0])
    wt = np.full(m, 1.0 / m)
    scale = np.mean([np.sqrt(max(float(j1[t] @ j2[t]), 0.0)) for t in range(m)])
    v = np.zeros(m)
    for k in range(n_iter):
        u = w + lam * wt
        g = np.array([j1[i] @ sum(u[t] * j2[t] for t in range(m)) for i in range(m)])
        g = g / (scale**2 + 1e-8)
        v = g if k == 0 else mom * v + g
        w = simplex_bisection(w - lr * v)
    coef = (w + lam * wt) / (1 + lam)
    d = js[2].T @ coef if samples == 3 else sum(j.T @ coef for j in js) / samples
    return m * d, w


@pytest.mark.parametrize("samples", [1, 2, 3])
@pytest.mark.parametrize("m", [2, 4])
def test_matches_paper_algorithm(samples: int, m: int) -> None:
    rng = np.random.default_rng(20 * m + samples)
    agg = SDMGrad(lambda_=0.4, lr=2.0, momentum=0.3, n_iter=7, samples=samples)
    w = np.full(m, 1.0 / m)
    for _ in range(4):
        # mini-batch gradients: a common part plus sample noise (the normalisation divides by
        # the cross diagonal, which must not be near zero for a well-conditioned comparison)
        base = rng.normal(size=(m, 6))
        js = [base + 0.3 * rng.normal(size=(m, 6)) for _ in range(samples)]
        d_ref, w = _reference(js, w, 0.4, 2.0, 0.3, 7)
        big = torch.as_tensor(np.concatenate(js))
        d = agg.weights(big @ big.T) @ big
        np.testing.assert_allclose(d.numpy(), d_ref, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(agg.w.numpy(), w, rtol=0, atol=1e-11)


def test_lambda_limits() -> None:
    # λ = 0: a stochastic MGDA (orthogonal unit gradients: the uniform point is the min-norm);
    # large λ: the direction tends to the mean gradient
    jac = torch.tensor([[1.0, 0.0], [1.0, 3.0]], dtype=F64)
    d = SDMGrad(lambda_=1e6).weights(jac @ jac.T)
    torch.testing.assert_close(d, torch.ones(2, dtype=F64), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- TorchJD 0.18
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", MS)
def test_torchjd_parity(kind: str, m: int) -> None:
    import torchjd.aggregation as tj

    for seed in range(2):
        gen = torch.Generator().manual_seed(2000 * m + seed)
        theirs = tj.SDMGradWeighting()
        ours = SDMGrad(samples=2, reduction="mean")
        w = torch.full((m,), 1.0 / m, dtype=F64)
        for _ in range(3):
            j1 = jacobian(kind, m, 2 * m + 1, gen)
            j2 = jacobian(kind, m, 2 * m + 1, gen)
            cross = j1 @ j2.T  # the same cross matrix to both
            d_tj = theirs(cross)
            w, d = sdmgrad_step(cross, w)
            torch.testing.assert_close(d, d_tj, rtol=0, atol=1e-12)
            big = torch.cat([j1, j2])
            dw = ours.weights(big @ big.T)  # the class reads the cross block itself
            torch.testing.assert_close(dw, torch.cat([d_tj, d_tj]) / 2, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- official code and LibMTL
def _proj_official(v: np.ndarray, s: float = 1.0) -> np.ndarray:
    # euclidean_proj_simplex of OptMN-Lab/sdmgrad@d17a3d6 methods/weight_methods.py (and
    # LibMTL's copy), re-implemented (np.all for the removed np.alltrue)
    v = v.astype(np.float64)
    (n,) = v.shape
    if v.sum() == s and np.all(v >= 0):
        return v
    u = np.sort(v)[::-1]
    cssv = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, n + 1) > (cssv - s))[0][-1]
    theta = float(cssv[rho] - s) / (rho + 1)
    return (v - theta).clip(min=0)


def _official_step(
    grads: torch.Tensor, w: torch.Tensor, lamda: float, niter: int, lr: float, libmtl: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    # SDMGrad.sdmgrad (official, grads [3, m, n] = ζ, ξ, ξ') / LibMTL's SDMGrad.backward
    # (median-research-group/LibMTL@8bc7605): a new SGD(lr, momentum=0.5) per step on w,
    # w.grad = GG w + λ mean(GG, 1), a projection after every step; d = (Σ w g + λ ḡ)/(1 + λ)
    zeta, xi1, xi2 = grads
    gg = xi1 @ xi2.T
    if libmtl:
        diag = torch.diag(gg).clamp_min(0)
        gg = gg / (diag.sqrt().mean().pow(2) + 1e-8)
    else:
        gg = gg / torch.mean(torch.sqrt(torch.diag(gg) + 1e-4)).pow(2)
    gbar = gg.mean(1)
    w = w.clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=lr, momentum=0.5)
    for _ in range(niter):
        opt.zero_grad()
        w.grad = gg @ w.detach() + lamda * gbar
        opt.step()
        with torch.no_grad():
            w.copy_(torch.from_numpy(_proj_official(w.detach().numpy())))
    w = w.detach()
    d = ((zeta * w[:, None]).sum(0) + lamda * zeta.mean(0)) / (1 + lamda)
    return d, w


@pytest.mark.parametrize("libmtl", [False, True], ids=["official", "libmtl"])
@pytest.mark.parametrize("m", [2, 3, 6])
def test_official_and_libmtl_parity(m: int, libmtl: bool) -> None:
    gen = torch.Generator().manual_seed(m + 7 * libmtl)
    lamda, lr = 0.3, 5.0 if libmtl else 10.0
    w_ref = torch.full((m,), 1.0 / m, dtype=F64)
    w = w_ref.clone()
    for _ in range(4):
        # correlated samples: the official √(A_tt + 1e-4) is NaN when a cross diagonal entry is
        # below −1e-4 (LibMTL and ours clamp it at 0)
        base = torch.randn(m, 8, dtype=F64, generator=gen)
        grads = base + 0.3 * torch.randn(3, m, 8, dtype=F64, generator=gen)
        d_ref, w_ref = _official_step(grads, w_ref, lamda, 20, lr, libmtl)
        cross = grads[1] @ grads[2].T
        eps = 1e-8
        if not libmtl:
            # the official code normalises by (mean √(A_tt + 1e-4))² instead of
            # (mean √max(A_tt, 0))² + eps: the same division when eps is the difference
            s_off = torch.sqrt(torch.diag(cross) + 1e-4).mean() ** 2
            eps = float(s_off - torch.diag(cross).clamp_min(0).sqrt().mean() ** 2)
        agg = SDMGrad(lambda_=lamda, lr=lr, eps=eps, samples=3)
        agg.w = w
        # the Balancer's rows: ξ, ξ', ζ (ours reads the cross block of samples 0, 1 and
        # updates with sample 2)
        big = torch.cat([grads[1], grads[2], grads[0]])
        d = agg.weights(big @ big.T) @ big
        w = agg.w
        torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-12)
        # the official code multiplies by n_tasks "to match the sum loss", as our sum scale
        torch.testing.assert_close(d, m * d_ref, rtol=1e-11, atol=1e-12)


# ---------------------------------------------------------------- through the Balancer
def test_balancer_three_samples() -> None:
    m = 3
    net = Net(m)
    data = batches(m, 3, 3, seed=5)
    bal = mtlbal.Balancer(net.trunk, aggregator=SDMGrad(samples=3))
    w = torch.full((m,), 1.0 / m, dtype=F64)
    for step in data:
        js = per_sample_jacobians(net, step)
        w, coef = sdmgrad_step(js[0] @ js[1].T, w)
        net.zero_grad()
        bal.backward(stack_samples(*[net.losses(x, y) for x, y in step]))
        got = torch.cat([p.grad.flatten() for p in net.trunk.parameters()])
        torch.testing.assert_close(got, js[2].T @ (m * coef), rtol=1e-10, atol=1e-12)


def test_zero_matrix_with_eps_zero() -> None:
    agg = SDMGrad(eps=0.0)
    w = agg.weights(torch.zeros(3, 3, dtype=F64))
    torch.testing.assert_close(w, torch.ones(3, dtype=F64))


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match="lambda_ must be non-negative"):
        SDMGrad(lambda_=-0.1)
    with pytest.raises(ValueError, match="lr must be positive"):
        SDMGrad(lr=0.0)
    with pytest.raises(ValueError, match="momentum must be in"):
        SDMGrad(momentum=1.0)
    with pytest.raises(ValueError, match="n_iter must be a positive integer"):
        SDMGrad(n_iter=0)
    with pytest.raises(ValueError, match="pref has 2 entries for 3 tasks"):
        SDMGrad(pref=[0.5, 0.5]).weights(torch.eye(3, dtype=F64))


@pytest.mark.parametrize("samples", [1, 3])
def test_resume(samples: int) -> None:
    check_resume_samples(lambda: SDMGrad(samples=samples), 2, samples)
