"""MoDo: the paper's λ recursion on explicit gradient vectors (float64, bisection projection)
as reference; TorchJD 0.18 parity on the same cross matrix; parity with the official code's
and LibMTL's computation; the sample layout through the Balancer; resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtlbal
from mtlbal.aggregation import MoDo, stack_samples
from mtlbal.functional import modo_step

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
@pytest.mark.parametrize("samples", [1, 2, 3])
@pytest.mark.parametrize("m", [2, 4])
def test_matches_paper_recursion(samples: int, m: int) -> None:
    # Algorithm 1 of arXiv:2305.20057: λ ← Π_Δ(λ − γ(∇F_{z1}ᵀ∇F_{z2} λ + ρλ)), then
    # x ← x − α ∇F_{z3} λ, on explicit per-sample gradient vectors
    rng = np.random.default_rng(10 * m + samples)
    gamma, rho = 0.3, 0.05
    agg = MoDo(gamma=gamma, rho=rho, samples=samples)
    lam = np.full(m, 1.0 / m)
    for _ in range(5):
        js = [rng.normal(size=(m, 7)) for _ in range(samples)]
        j1, j2 = (js[0], js[1]) if samples > 1 else (js[0], js[0])
        grad = np.array([j1[i] @ (j2.T @ lam) for i in range(m)]) + rho * lam
        lam = simplex_bisection(lam - gamma * grad)
        # the third sample, or the mean of the one or two
        d_ref = m * (js[2].T @ lam if samples == 3 else sum(j.T @ lam for j in js) / samples)
        big = torch.as_tensor(np.concatenate(js))
        w = agg.weights(big @ big.T)
        np.testing.assert_allclose((w @ big).numpy(), d_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(agg.lam.numpy(), lam, rtol=0, atol=1e-12)


def test_identical_tasks_keep_uniform_weights() -> None:
    g = torch.randn(5, dtype=F64, generator=torch.Generator().manual_seed(0))
    jac = g.expand(3, 5).clone()
    agg = MoDo()
    for _ in range(3):
        torch.testing.assert_close(agg(jac), 3 * g, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- TorchJD 0.18
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", MS)
def test_torchjd_parity(kind: str, m: int) -> None:
    import torchjd.aggregation as tj

    for seed in range(2):
        gen = torch.Generator().manual_seed(1000 * m + seed)
        theirs = tj.MoDoWeighting(gamma=0.1, rho=0.1)
        ours = MoDo(gamma=0.1, rho=0.1, samples=2, reduction="mean")
        lam = torch.full((m,), 1.0 / m, dtype=F64)
        for _ in range(4):
            j1 = jacobian(kind, m, 2 * m + 1, gen)
            j2 = jacobian(kind, m, 2 * m + 1, gen)
            cross = j1 @ j2.T  # the same cross matrix to both
            lam_tj = theirs(cross)
            lam = modo_step(cross, lam, 0.1, 0.1)
            torch.testing.assert_close(lam, lam_tj, rtol=0, atol=1e-13)
            big = torch.cat([j1, j2])
            w = ours.weights(big @ big.T)  # the class reads the cross block itself
            torch.testing.assert_close(w, torch.cat([lam_tj, lam_tj]) / 2, rtol=0, atol=1e-13)


# ---------------------------------------------------------------- official code and LibMTL
def _projection_official(y: torch.Tensor) -> torch.Tensor:
    # the loop of heshandevaka/Trade-Off-MOL@3b0e50a, LibMTL/LibMTL/weighting/MoDo.py
    # (_projection2simplex), re-implemented
    m = len(y)
    sorted_y = torch.sort(y, descending=True)[0]
    tmpsum = 0.0
    tmax_f = (torch.sum(y) - 1.0) / m
    for i in range(m - 1):
        tmpsum += sorted_y[i]
        tmax = (tmpsum - 1) / (i + 1.0)
        if tmax > sorted_y[i + 1]:
            tmax_f = tmax
            break
    return torch.clamp(y - tmax_f, min=0.0)


@pytest.mark.parametrize("m", [2, 3, 6])
def test_official_and_libmtl_parity(m: int) -> None:
    # official (Trade-Off-MOL@3b0e50a, MoDo.backward): two samples, λ from grads[0] @
    # (grads[1]ᵀ λ), the model updated with (grads[0] + grads[1])ᵀ λ (a sum: "handle averaging
    # via lr"). LibMTL (median-research-group/LibMTL@7a2cbe2, MoDo.backward): three samples,
    # the same λ step, the update grads[2]ᵀ λ.
    gen = torch.Generator().manual_seed(m)
    gamma, rho = 0.1, 0.1
    lam_off = torch.full((m,), 1.0 / m, dtype=F64)
    two = MoDo(gamma=gamma, rho=rho, samples=2)
    three = MoDo(gamma=gamma, rho=rho, samples=3, reduction="mean")
    for _ in range(5):
        grads = torch.randn(3, m, 9, dtype=F64, generator=gen)
        lam_off = _projection_official(
            lam_off - gamma * (grads[0] @ (grads[1].T @ lam_off) + rho * lam_off)
        )
        d_official = (grads[0] + grads[1]).T @ lam_off
        d_libmtl = grads[2].T @ lam_off
        b2, b3 = grads[:2].reshape(2 * m, 9), grads.reshape(3 * m, 9)
        d2 = two.weights(b2 @ b2.T) @ b2
        d3 = three.weights(b3 @ b3.T) @ b3
        # ours (sum scale, mean of the two samples) = m/2 × the official sum
        torch.testing.assert_close(d2, m / 2 * d_official, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(d3, d_libmtl, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- through the Balancer
def test_balancer_three_samples_uses_the_cross_block_and_the_third_sample() -> None:
    m = 2
    net = Net(m)
    data = batches(m, 3, 3, seed=4)
    bal = mtlbal.Balancer(net.trunk, aggregator=MoDo(gamma=0.5, rho=0.0, samples=3))
    lam = torch.full((m,), 0.5, dtype=F64)
    for step in data:
        js = per_sample_jacobians(net, step)
        lam = torch.as_tensor(simplex_bisection((lam - 0.5 * (js[0] @ js[1].T @ lam)).numpy()))
        net.zero_grad()
        info = bal.backward(stack_samples(*[net.losses(x, y) for x, y in step]))
        got = torch.cat([p.grad.flatten() for p in net.trunk.parameters()])
        torch.testing.assert_close(got, js[2].T @ (m * lam), rtol=1e-10, atol=1e-12)
        assert info.tasks == ("t0@0", "t1@0", "t0@1", "t1@1", "t0@2", "t1@2")


def test_layout_is_checked() -> None:
    net = Net(2)
    (x, y), (x2, y2) = batches(2, 1, 2)[0]
    bal = mtlbal.Balancer(net.trunk, aggregator=MoDo(samples=2))
    a, b = net.losses(x, y), net.losses(x2, y2)
    with pytest.raises(ValueError, match="named 'task@s'"):
        bal.backward({**{f"x{k}": v for k, v in a.items()}, **{f"y{k}": v for k, v in b.items()}})
    bal2 = mtlbal.Balancer(net.trunk, aggregator=MoDo(samples=2))
    swapped = {"t0@0": a["t0"], "t1@0": a["t1"], "t1@1": b["t1"], "t0@1": b["t0"]}
    with pytest.raises(ValueError, match="expected task 't0@1' in position 2"):
        bal2.backward(swapped)
    with pytest.raises(ValueError, match="cannot be 3 samples"):
        MoDo(samples=3).weights(torch.eye(4, dtype=F64))
    with pytest.raises(ValueError, match="sample 1 has tasks"):
        stack_samples({"a": x.sum()}, {"b": x.sum()})


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match="gamma must be positive"):
        MoDo(gamma=0.0)
    with pytest.raises(ValueError, match="rho must be non-negative"):
        MoDo(rho=-1.0)
    with pytest.raises(ValueError, match="samples must be 1, 2 or 3"):
        MoDo(samples=4)
    agg = MoDo()
    agg.weights(torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="MoDo holds weights for 3 tasks, got 2"):
        agg.weights(torch.eye(2, dtype=F64))


@pytest.mark.parametrize("samples", [1, 3])
def test_resume(samples: int) -> None:
    check_resume_samples(lambda: MoDo(gamma=0.5, samples=samples), 2, samples)


def test_scale_acts_on_the_step_size() -> None:
    # no degree of homogeneity: gradients scaled by c are the step γc² (and ρ/c²) on λ
    gen = torch.Generator().manual_seed(9)
    c = 3.0
    a, b = MoDo(gamma=0.05, rho=0.2), MoDo(gamma=0.05 * c**2, rho=0.2 / c**2)
    for _ in range(4):
        jac = torch.randn(3, 5, dtype=F64, generator=gen)
        torch.testing.assert_close(a(c * jac), c * b(jac), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.lam, b.lam, rtol=0, atol=1e-14)
