"""COSMOS and PBI: weights against the papers' scalarizations (float64, autograd through a
direct transcription), parity with TorchJD 0.18's ``torchjd.scalarization.COSMOS``/``PBI``
(value and gradient, random m from 2 to 16), the same update as TorchJD through the Balancer,
and the domain checks."""

from __future__ import annotations

import math

import pytest
import torch

import mtlbal
from mtlbal.functional import cosmos_weights, pbi_weights
from mtlbal.weighting import COSMOS, PBI
from mtlbal.weighting.base import LossContext

from ._methods_helpers import TinyNet, data

F64 = torch.float64
SEEDS = [0, 1, 2]
MS = [2, 3, 7, 16]


def _cases() -> list[tuple[int, int]]:
    return [(m, s) for m in MS for s in SEEDS]


def _draw(m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * m + seed)
    losses = torch.rand(m, generator=g, dtype=F64) * 5 + 0.05
    pref = torch.rand(m, generator=g, dtype=F64) + 0.01
    pref = pref / pref.sum()  # on the simplex, as the papers draw it
    ref = torch.rand(m, generator=g, dtype=F64) * 0.04  # below every loss
    return losses, pref, ref


# ---------------------------------------------------------------- references (papers)
def cosmos_reference(losses: torch.Tensor, r: torch.Tensor, lam: float) -> torch.Tensor:
    """Ruchte & Grabocka: Σ r_i L_i − λ · cos(r, L), written term by term."""
    dot = sum(r[i] * losses[i] for i in range(len(r)))
    nr = math.sqrt(sum(float(v) ** 2 for v in r))
    nl = torch.sqrt(sum(losses[i] ** 2 for i in range(len(r))))
    return dot - lam * dot / (nr * nl)


def pbi_reference(
    losses: torch.Tensor, p: torch.Tensor, theta: float, z: torch.Tensor | None
) -> torch.Tensor:
    """MOEA/D: d1 = (F − z*)ᵀλ/‖λ‖, d2 = ‖F − (z* + d1 λ/‖λ‖)‖, g = d1 + θ d2 (the TorchJD
    1e-12 under the root, so that d2 stays differentiable on the ray)."""
    norm = math.sqrt(sum(float(v) ** 2 for v in p))
    lam = [float(v) / norm for v in p]
    zs = [0.0] * len(lam) if z is None else [float(v) for v in z]
    d1 = sum((losses[i] - zs[i]) * lam[i] for i in range(len(lam)))
    sq = sum((losses[i] - (zs[i] + d1 * lam[i])) ** 2 for i in range(len(lam)))
    return d1 + theta * torch.sqrt(sq + 1e-12)


def _value_and_grad(fn, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = losses.clone().requires_grad_(True)
    v = fn(x)
    (g,) = torch.autograd.grad(v, x)
    return v.detach(), g


@pytest.mark.parametrize(("m", "seed"), _cases())
def test_cosmos_matches_the_paper(m: int, seed: int) -> None:
    losses, r, _ = _draw(m, seed)
    for lam in (0.0, 0.7, 8.0):
        ref_v, ref_w = _value_and_grad(lambda x, lam=lam: cosmos_reference(x, r, lam), losses)
        s = COSMOS(lambda_=lam, preference=r)
        x = losses.clone().requires_grad_(True)
        out = s.objectives(x, LossContext())
        torch.testing.assert_close(out.weights, ref_w, rtol=1e-12, atol=1e-13)
        # the objectives sum to S and their gradient is w
        torch.testing.assert_close(out.objectives.sum().detach(), ref_v, rtol=1e-12, atol=1e-13)
        (g,) = torch.autograd.grad(out.objectives.sum(), x)
        torch.testing.assert_close(g, ref_w, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(s(losses), ref_w, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("m", "seed"), _cases())
def test_pbi_matches_the_paper(m: int, seed: int) -> None:
    losses, p, z = _draw(m, seed)
    for theta, ref in ((0.0, None), (5.0, None), (5.0, z), (20.0, z)):
        ref_v, ref_w = _value_and_grad(
            lambda x, theta=theta, ref=ref: pbi_reference(x, p, theta, ref), losses
        )
        s = PBI(theta=theta, preference=p, reference=ref)
        x = losses.clone().requires_grad_(True)
        out = s.objectives(x, LossContext())
        torch.testing.assert_close(out.weights, ref_w, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(out.objectives.sum().detach(), ref_v, rtol=1e-12, atol=1e-12)
        (g,) = torch.autograd.grad(out.objectives.sum(), x)
        torch.testing.assert_close(g, ref_w, rtol=1e-11, atol=1e-12)


# ---------------------------------------------------------------- TorchJD parity
torchjd_scalarization = pytest.importorskip("torchjd.scalarization")


@pytest.mark.parametrize(("m", "seed"), _cases())
def test_cosmos_parity_with_torchjd(m: int, seed: int) -> None:
    losses, r, _ = _draw(m, seed)
    for lam in (0.01, 1.0, 8.0):
        jd = torchjd_scalarization.COSMOS(lam, r)
        ref_v, ref_w = _value_and_grad(jd, losses)
        value, w = cosmos_weights(losses, r, lam)
        torch.testing.assert_close(value, ref_v, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(COSMOS(lam, r)(losses), ref_w, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("m", "seed"), _cases())
def test_pbi_parity_with_torchjd(m: int, seed: int) -> None:
    losses, p, z = _draw(m, seed)
    for theta, ref in ((0.0, None), (5.0, None), (5.0, z)):
        jd = torchjd_scalarization.PBI(theta, p, ref)
        ref_v, ref_w = _value_and_grad(jd, losses)
        value, w = pbi_weights(losses, p, theta, ref)
        torch.testing.assert_close(value, ref_v, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w, ref_w, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(PBI(theta, p, ref)(losses), ref_w, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("which", ["cosmos", "pbi"])
def test_balancer_update_equals_torchjd_backward(which: str) -> None:
    # the whole update of a small net: the Balancer with the strategy == TorchJD's scalarizer
    # followed by a plain backward, for a few SGD steps (float64)
    m = 3
    pref = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    if which == "cosmos":
        ours, theirs = COSMOS(2.0, pref), torchjd_scalarization.COSMOS(2.0, pref)
    else:
        ours, theirs = PBI(5.0, pref), torchjd_scalarization.PBI(5.0, pref)
    a, b = TinyNet(m).double(), TinyNet(m).double()
    bal = mtlbal.Balancer(a.trunk, weighting=ours)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.02)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.02)
    for x, y in data(m, 4):
        x, y = x.double(), y.double()
        opt_a.zero_grad()
        opt_b.zero_grad()
        bal.backward(a.losses(x, y))
        theirs(torch.stack(list(b.losses(x, y).values()))).backward()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-12)
        opt_a.step()
        opt_b.step()


# ---------------------------------------------------------------- properties and pitfalls
def test_on_the_preference_ray() -> None:
    # equal losses with the default preferences: COSMOS gives r = 1/m, PBI ŵ = 1/√m
    losses = torch.full((4,), 1.3, dtype=F64)
    torch.testing.assert_close(COSMOS(3.0)(losses), torch.full_like(losses, 0.25))
    torch.testing.assert_close(PBI()(losses), torch.full_like(losses, 0.5), rtol=0, atol=1e-9)


def test_pbi_float32_on_the_ray_is_accurate() -> None:
    # in float32, f − d₁ŵ is round-off (~1e-7 ‖f‖), not small against the 1e-6 floor of d₂:
    # computed in float32 the weights on the ray are off by ~50% (so are TorchJD's float32
    # gradients there); the class computes them in float64 and returns float32
    p = torch.tensor([1.0, 2.0, 3.0])
    losses = 0.5 * p  # exactly on the ray in float32
    w32 = PBI(5.0, p)(losses)
    assert w32.dtype == torch.float32
    unit = p.double() / p.double().norm()
    torch.testing.assert_close(w32.double(), unit, rtol=0, atol=1e-7)
    naive = pbi_weights(losses, p, 5.0)[1]  # the kernel run in float32: the pitfall
    assert float((naive.double() - unit).abs().max()) > 0.05


def test_cosmos_all_zero_losses_are_refused_naming_the_tasks() -> None:
    lin = torch.nn.Linear(3, 2)
    y = lin(torch.randn(4, 3))
    bal = mtlbal.Balancer(lin, weighting=COSMOS(1.0))
    with pytest.raises(ValueError, match=r"cos\(r, L\).*'a' .*'b'"):
        bal.backward({"a": 0.0 * y[:, 0].sum(), "b": 0.0 * y[:, 1].sum()})
    assert all(p.grad is None for p in lin.parameters())
    out = COSMOS(1.0).objectives(torch.tensor([0.0, 2.0]), LossContext())
    assert out.domain is not None and bool(out.domain[0].all())  # one non-zero loss is enough


def test_pbi_loss_below_the_reference_is_refused_naming_the_task() -> None:
    lin = torch.nn.Linear(3, 2)
    y = lin(torch.randn(4, 3))
    bal = mtlbal.Balancer(lin, weighting=PBI(5.0, reference=[0.0, 0.5]))
    with pytest.raises(ValueError, match=r"reference point z\*.*'depth'"):
        bal.backward({"seg": y[:, 0].pow(2).mean() + 1.0, "depth": 0.0 * y[:, 1].mean() + 0.2})
    assert all(p.grad is None for p in lin.parameters())
    with pytest.raises(ValueError, match=r"z\*.*'b'"):  # no reference: the losses must be ≥ 0
        y = lin(torch.randn(4, 3))
        mtlbal.Balancer(lin, weighting=PBI()).backward(
            {"a": y[:, 0].pow(2).mean(), "b": y[:, 1].mean() * 0.0 - 1.0}
        )


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match="lambda_"):
        COSMOS(-1.0)
    with pytest.raises(ValueError, match="theta"):
        PBI(-0.5)
    with pytest.raises(ValueError, match="≥ 0"):
        COSMOS(1.0, [0.5, -0.1])
    with pytest.raises(ValueError, match="not all 0"):
        PBI(1.0, [0.0, 0.0])
    with pytest.raises(ValueError, match="3 entries for 2 tasks"):
        COSMOS(1.0, [0.2, 0.3, 0.5], num_tasks=2)
    with pytest.raises(ValueError, match="reference has 3 entries for 2"):
        PBI(1.0, [1.0, 1.0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="preference of 3 entries, got 2"):
        COSMOS(1.0, [0.2, 0.3, 0.5])(torch.ones(2))
    with pytest.raises(ValueError, match="built for 3 tasks"):
        PBI(num_tasks=3)(torch.ones(2))
