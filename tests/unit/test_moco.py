"""MoCo: the paper's update in float64 (projection onto the simplex), parity with LibMTL
(median-research-group/LibMTL @ 8b8f1d030377b14d9c29017e11e2586944a23d9b,
LibMTL/weighting/MoCo.py) and with the authors' released code (heshandevaka/MoCo @
88ec9e2ed8e903bd7b786ec2495503bb9a828ef0, CAGrad/utils.py ``tracking``), state and resume."""

from __future__ import annotations

import copy

import pytest
import torch

from mtlbal.aggregation import MoCo
from mtlbal.functional import project_simplex

from ._jacobians import F64, KINDS, MS, jacobian
from ._methods_helpers import check_resume


def _simplex_projection_reference(v: torch.Tensor) -> torch.Tensor:
    # argmin_{λ ∈ Δ} ‖λ − v‖² by bisection on the threshold θ: Σ max(v − θ, 0) = 1
    lo, hi = float(v.min()) - 1.0, float(v.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((v - mid).clamp_min(0).sum()) > 1:
            lo = mid
        else:
            hi = mid
    return (v - (lo + hi) / 2).clamp_min(0)


def test_simplex_projection() -> None:
    gen = torch.Generator().manual_seed(0)
    for m in (1, 2, 5, 16):
        for scale in (0.1, 1.0, 10.0):
            v = scale * torch.randn(m, generator=gen, dtype=F64)
            torch.testing.assert_close(
                project_simplex(v), _simplex_projection_reference(v), rtol=0, atol=1e-12
            )


def _paper(jacs, losses, *, beta, bs, gamma, gs, rho, normalize, projection):
    """Algorithm 1 of the paper, written out: y ← y − β_k(y − h), λ ← P(λ − γ_k(YYᵀ + ρI)λ)."""
    m, n = jacs[0].shape
    y = torch.zeros(m, n, dtype=F64)
    lam = torch.full((m,), 1.0 / m, dtype=F64)
    out = []
    for k, (jac, loss) in enumerate(zip(jacs, losses), start=1):
        h = jac.clone()
        if normalize:
            for i in range(m):
                h[i] = jac[i] / (jac[i].norm() + 1e-8) * loss[i]
        y = y - beta / k**bs * (y - h)
        v = lam - gamma / k**gs * ((y @ y.T + rho * torch.eye(m, dtype=F64)) @ lam)
        lam = _simplex_projection_reference(v) if projection else torch.softmax(v, 0)
        out.append(m * (y.T @ lam))
    return out


def _steps(m: int, kind: str, seed: int, k: int = 4):
    gen = torch.Generator().manual_seed(seed)
    jacs = [jacobian(kind, m, seed=seed + i) for i in range(k)]
    losses = [torch.rand(m, generator=gen, dtype=F64) + 0.1 for _ in range(k)]
    return jacs, losses


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", MS)
def test_paper_equations(kind: str, m: int) -> None:
    jacs, losses = _steps(m, kind, seed=1)
    cfg = dict(beta=0.5, bs=0.5, gamma=0.1, gs=0.5, rho=0.05)
    for normalize, projection in [(True, False), (False, True)]:
        agg = MoCo(
            beta=0.5,
            gamma=0.1,
            rho=0.05,
            normalize="loss" if normalize else "none",
            simplex="projection" if projection else "softmax",
        )
        ref = _paper(jacs, losses, normalize=normalize, projection=projection, **cfg)
        for jac, loss, r in zip(jacs, losses, ref):
            torch.testing.assert_close(agg(jac, losses=loss), r, rtol=1e-10, atol=1e-12)


def _libmtl(jacs, losses, beta=0.5, bs=0.5, gamma=0.1, gs=0.5, rho=0.0):
    # LibMTL's backward: grads normalised to the loss, y and λ updates, new_grads = yᵀλ
    m, n = jacs[0].shape
    y = torch.zeros(m, n, dtype=F64)
    lambd = torch.ones(m, dtype=F64) / m
    out = []
    for step, (grads, loss) in enumerate(zip(jacs, losses), start=1):
        grads = grads.clone()
        for tn in range(m):
            grads[tn] = grads[tn] / (grads[tn].norm() + 1e-8) * loss[tn]
        y = y - (beta / step**bs) * (y - grads)
        lambd = torch.softmax(
            lambd - (gamma / step**gs) * (y @ y.t() + rho * torch.eye(m, dtype=F64)) @ lambd, -1
        )
        out.append(y.t() @ lambd)
    return out


def _authors(jacs, losses, beta, delta):
    # the released "tracking" with the "raw_loss" normalisation and sigma2 = sigma3 = 0 (the
    # run scripts' setting): columns are tasks, the result is multiplied by 2 (= m there)
    m, n = jacs[0].shape
    y = torch.zeros(n, m, dtype=F64)
    lambd = torch.ones(m, 1, dtype=F64) / m
    out = []
    for grads, loss in zip(jacs, losses):
        g = grads.T / (torch.linalg.norm(grads.T, dim=0) + 1e-8) * loss
        y = y - beta * (y - g)
        lambd = torch.softmax(lambd - delta * y.T @ (y @ lambd), 0)
        out.append((y @ lambd).reshape(-1) * m)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", MS)
def test_parity_with_libmtl_and_the_authors_code(kind: str, m: int) -> None:
    jacs, losses = _steps(m, kind, seed=2)
    agg = MoCo(reduction="mean")  # LibMTL's defaults and scale
    for jac, loss, r in zip(jacs, losses, _libmtl(jacs, losses)):
        torch.testing.assert_close(agg(jac, losses=loss), r, rtol=1e-10, atol=1e-12)
    agg = MoCo(beta=0.99, beta_sigma=0.0, gamma=0.1, gamma_sigma=0.0)
    for jac, loss, r in zip(jacs, losses, _authors(jacs, losses, 0.99, 0.1)):
        torch.testing.assert_close(agg(jac, losses=loss), r, rtol=1e-10, atol=1e-12)


def test_state_and_errors() -> None:
    agg = MoCo()
    jac = jacobian("full", 3, seed=3)
    agg(jac, losses=torch.ones(3, dtype=F64))
    sd = copy.deepcopy(agg.state_dict())
    assert sd["y"].shape == (3, 24) and sd["lam"].shape == (3,) and int(sd["steps"]) == 1
    with pytest.raises(ValueError, match="needs the losses"):
        MoCo()(jac)
    with pytest.raises(ValueError, match="must not change"):
        agg(jacobian("full", 3, n=10, seed=3), losses=torch.ones(3, dtype=F64))
    agg.reset()
    assert agg.y is None and int(agg.steps) == 0
    assert not MoCo.host_sync and MoCo.homogeneity is None


@pytest.mark.parametrize("simplex", ["softmax", "projection"])
def test_resume(simplex: str) -> None:
    check_resume(lambda: {"aggregator": MoCo(simplex=simplex)})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["MoCo", "DBMTL", "ExcessMTL"])
def test_declared_without_host_sync(name: str) -> None:
    # counted with the profiler as in tests/unit/test_host_syncs.py (.item(), bool(t), …)
    from torch.profiler import ProfilerActivity, profile

    import mtlbal.aggregation as A
    from mtlbal.step import StepContext

    agg = getattr(A, name)()
    assert agg.host_sync is False
    jac = jacobian("full", 3, seed=4).float()
    ctx = StepContext(losses=torch.rand(3))
    for _ in range(2):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            agg.aggregate_jacobian(jac, ctx)
        assert sum(e.name == "aten::_local_scalar_dense" for e in prof.events()) == 0
