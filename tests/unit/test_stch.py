"""STCH: the gradient of m·μ·log Σ exp(λ(f − z*)/μ) from a 60-digit reference and a naive float64
one (Lin et al. 2024, arXiv:2402.19078), TorchJD 0.18's ``STCH``, the authors' multi-task code
(Xi-L/STCH @73898cc ``STCH_MTL/LibMTL/weighting/STCH.py``, identical to LibMTL @4336804's
``STCH``; re-implemented below) over a warm-up and beyond, the reference estimate, the domain."""

from __future__ import annotations

import copy

import pytest
import torch
from torchjd.scalarization import STCH as TorchJDSTCH

import mtlbal
from mtlbal.functional import stch_scalarization, stch_weights
from mtlbal.weighting import STCH

from ._loss_level_helpers import (
    F64,
    KINDS,
    MS,
    SEEDS,
    D,
    Net,
    grad_wrt_losses,
    losses_of,
    refuse_check,
    to_tensor,
)

MUS = (0.01, 0.1, 1.0)


def reference(
    L: torch.Tensor,
    z: torch.Tensor,
    lam: torch.Tensor,
    mu: float,
    transform: str,
    eps: float,
    k: float,
) -> torch.Tensor:
    """∂/∂L_t of k·μ·log Σ_s exp(λ_s (f_s − f(z_s)) / μ) = k·λ_t·p_t·f'(L_t), with
    p = softmax(λ(f − f(z))/μ), f = log(L/z + ε) (z* = 0) or L − z; 60-digit decimals (the
    largest exponent taken out of the softmax so that the decimals do not overflow)."""
    ls, zs, lams = ([D(v) for v in x.tolist()] for x in (L, z, lam))
    if transform == "log":
        f = [(x / zz + D(eps)).ln() for x, zz in zip(ls, zs)]
        df = [1 / (x + D(eps) * zz) for x, zz in zip(ls, zs)]
    else:
        f = [x - zz for x, zz in zip(ls, zs)]
        df = [D(1.0)] * len(ls)
    y = [lm * fx / D(mu) for lm, fx in zip(lams, f)]
    top = max(y)
    e = [(v - top).exp() for v in y]
    s = sum(e)
    return to_tensor([D(k) * lm * ex / s * d for lm, ex, d in zip(lams, e, df)])


def exponent_tol(y: torch.Tensor) -> float:
    """Relative tolerance of the softmax weights of float64 exponents ``y``: each exponent is
    rounded (relative error ≤ 3·2⁻⁵²: the shift, λ·, /μ), so a weight moves by at most twice
    the largest error among the exponents that do not underflow against the largest one
    (within 745 of it); one survivor alone gets exactly 1."""
    live = y[y >= y.max() - 745]
    if live.numel() == 1:
        return 1e-12
    return 1e-12 + 6 * float(live.abs().max()) * 2.0**-52


def inputs(kind: str, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    L = losses_of(kind, m, seed)
    g = torch.Generator().manual_seed(seed + 7)
    z = L * torch.exp(torch.randn(m, generator=g, dtype=F64))  # a reference of the same scale
    lam = torch.rand(m, generator=g, dtype=F64) + 0.1
    return L, z, lam


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", (2, 5, 16))
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_gradient_is_the_papers(kind: str, m: int, seed: int) -> None:
    L, z, lam = inputs(kind, m, seed)
    for mu in MUS:
        for transform in ("log", "none"):
            for pref in (None, lam):
                for reduction, k in (("sum", float(m)), ("mean", 1.0)):
                    stch = STCH(
                        m,
                        mu=mu,
                        pref=None if pref is None else pref.tolist(),
                        reference=z.tolist(),
                        transform=transform,  # type: ignore[arg-type]
                        reduction=reduction,  # type: ignore[arg-type]
                    )
                    lam_ = torch.ones(m, dtype=F64) if pref is None else pref
                    ref = reference(L, z, lam_, mu, transform, 1e-20, k)
                    g, w = grad_wrt_losses(stch, L)
                    f = torch.log(L / z + 1e-20) if transform == "log" else L - z
                    tol = exponent_tol(lam_ * f / mu)
                    torch.testing.assert_close(g, ref, rtol=tol, atol=1e-300)
                    torch.testing.assert_close(w, ref, rtol=tol, atol=1e-300)


@pytest.mark.parametrize("m", MS)
def test_naive_float64_formula(m: int) -> None:
    # moderate values: autograd of the formula as written, no max factored out
    for seed in SEEDS:
        L, z, lam = inputs("moderate", m, seed)
        for mu in (0.5, 1.0):
            x = L.clone().requires_grad_(True)
            f = torch.log(x / z + 1e-20)
            total = m * mu * torch.log(torch.exp(lam * f / mu).sum())
            (ref,) = torch.autograd.grad(total, x)
            stch = STCH(mu=mu, pref=lam.tolist(), reference=z.tolist())
            g, _ = grad_wrt_losses(stch, L)
            torch.testing.assert_close(g, ref, rtol=1e-12, atol=0)
            val = stch_scalarization(f.detach(), mu, lam)
            torch.testing.assert_close(m * val, total.detach(), rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", MS)
def test_parity_with_torchjd(kind: str, m: int) -> None:
    for seed in SEEDS:
        L, z, lam = inputs(kind, m, seed)
        for mu in MUS:
            for weights in (None, lam):
                x = L.clone().requires_grad_(True)
                theirs = TorchJDSTCH(mu, weights=weights, reference=z)(x)
                (gt,) = torch.autograd.grad(theirs, x)
                pref = [1.0 / m] * m if weights is None else weights.tolist()
                ours = STCH(
                    mu=mu, pref=pref, reference=z.tolist(), transform="none", reduction="mean"
                )
                go, _ = grad_wrt_losses(ours, L)
                lam_ = torch.tensor(pref, dtype=F64)
                tol = exponent_tol(lam_ * (L - z) / mu)  # both round λ(L − z)/μ
                torch.testing.assert_close(go, gt, rtol=tol, atol=1e-300)
                val = stch_scalarization(L - z, mu, lam_)
                torch.testing.assert_close(val, theirs.detach(), rtol=1e-13, atol=0)


class OfficialSTCH:
    """The authors' STCH_MTL weighting (Xi-L/STCH @73898cc), re-implemented from reading it:
    log-loss sum before and during the warm-up epoch (accumulating the raw losses in the
    latter), then m·μ·logsumexp of log(L/nadir + 1e-20) with the max subtracted."""

    def __init__(self, m: int, mu: float, warmup_epoch: int) -> None:
        self.m, self.mu, self.warmup_epoch = m, mu, warmup_epoch
        self.epoch = 0
        self.nadir: torch.Tensor | None = None
        self.average_loss: torch.Tensor | float = 0.0
        self.count = 0

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        if self.epoch < self.warmup_epoch:
            return torch.log(losses + 1e-20).sum()
        if self.epoch == self.warmup_epoch:
            self.average_loss = self.average_loss + losses.detach()
            self.count += 1
            return torch.log(losses + 1e-20).sum()
        if self.nadir is None:
            self.nadir = self.average_loss / self.count  # type: ignore[assignment]
        f = torch.log(losses / self.nadir + 1e-20)
        reg = f - torch.max(f.data).detach()
        return self.mu * torch.log(torch.sum(torch.exp(reg / self.mu))) * self.m


@pytest.mark.parametrize("mu", [0.1, 1.0])
def test_training_matches_the_authors_code(mu: float) -> None:
    m, steps_per_epoch, epochs, warmup = 3, 3, 4, 1
    ours_net, their_net = Net(m), Net(m)
    their_net.load_state_dict(ours_net.state_dict())
    stch = STCH(m, mu=mu, warmup_epoch=warmup).double()
    bal = mtlbal.Balancer(ours_net.trunk, weighting=stch)
    opt_o = torch.optim.SGD(ours_net.parameters(), lr=0.02)
    opt_t = torch.optim.SGD(their_net.parameters(), lr=0.02)
    official = OfficialSTCH(m, mu, warmup)
    for epoch in range(epochs):
        official.epoch = epoch
        for _ in range(steps_per_epoch):
            ours_net.zero()
            bal.backward(ours_net.losses())
            their_net.zero()
            official.total(torch.stack(their_net.loss_list())).backward()
            for a, b in zip(ours_net.parameters(), their_net.parameters()):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)
            opt_o.step()
            opt_t.step()
        bal.epoch_end()
    assert official.nadir is not None and stch.reference is not None
    torch.testing.assert_close(stch.reference, official.nadir, rtol=1e-15, atol=0)


def test_warm_up_bookkeeping_and_state() -> None:
    stch = STCH(2, warmup_epoch=1)
    L = torch.tensor([0.5, 2.0], dtype=F64)
    assert stch.warming_up
    torch.testing.assert_close(stch(L), 1 / (L + 1e-20))  # warm-up: Σ log L
    stch.observe(L)  # epoch 0: not the warm-up epoch, not accumulated
    stch.epoch_end()
    assert stch.epoch_sum is None
    stch.observe(torch.tensor([1.0, 3.0], dtype=F64))
    stch.observe(torch.tensor([3.0, 5.0], dtype=F64))
    saved = copy.deepcopy(stch.state_dict())
    stch.epoch_end()
    assert not stch.warming_up
    torch.testing.assert_close(stch.reference, torch.tensor([2.0, 4.0], dtype=F64))
    stch.observe(torch.tensor([100.0, 100.0], dtype=F64))  # after: nothing accumulated
    assert stch.epoch_sum is None
    # resume mid warm-up epoch: the same reference
    other = STCH(2, warmup_epoch=1)
    other.load_state_dict(saved)
    other.epoch_end()
    torch.testing.assert_close(other.reference, stch.reference)
    other.reset()
    assert other.warming_up and other.epoch == 0
    # a given reference: no warm-up, no epochs needed, reset keeps it
    fixed = STCH(reference=[1.0, 2.0])
    assert not fixed.warming_up and mtlbal.Need.EPOCHS not in fixed.needs
    fixed.reset()
    torch.testing.assert_close(fixed.reference, torch.tensor([1.0, 2.0], dtype=F64))


def test_switch_is_continuous_and_warm_up_of_transform_none() -> None:
    # balanced normalised losses: p = 1/m, so the first STCH weights equal the warm-up's
    z = torch.tensor([0.5, 2.0, 8.0], dtype=F64)
    stch = STCH(mu=0.3, reference=z.tolist())
    torch.testing.assert_close(stch(3 * z), 1 / (3 * z + 1e-20 * z))
    torch.testing.assert_close(STCH(3, transform="none")(z), torch.ones(3, dtype=F64))
    torch.testing.assert_close(
        STCH(3, transform="none", reduction="mean")(z), torch.full((3,), 1 / 3, dtype=F64)
    )


def test_small_mu_does_not_overflow() -> None:
    stch = STCH(mu=1e-4, reference=[1.0, 1.0], transform="none", reduction="mean")
    w = stch(torch.tensor([1e30, 1.0], dtype=torch.float32))
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(
        stch_weights(torch.tensor([1e4, 0.0]), 1e-3), torch.tensor([1.0, 0.0])
    )


def test_outside_the_domain_is_refused_naming_the_task() -> None:
    refuse_check(lambda: STCH(2), -1.0, "STCH's warm-up takes log")
    refuse_check(lambda: STCH(reference=[1.0, 1.0]), -1.0, "STCH takes log")


def test_reference_estimate_must_be_positive() -> None:
    stch = STCH(2, warmup_epoch=0)
    stch.observe(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="task 0"):
        stch.epoch_end()
    with pytest.raises(ValueError, match="without any step"):
        STCH(2, warmup_epoch=0).epoch_end()


def test_bad_arguments() -> None:
    for kw in (
        {"mu": 0.0},
        {"mu": float("inf")},
        {"transform": "exp"},
        {"reduction": "max"},
        {"warmup_epoch": -1},
        {"eps": -1.0},
        {"pref": [1.0, -1.0]},
        {"reference": [1.0, 0.0]},
        {"reference": [1.0, float("nan")]},
        {"num_tasks": 3, "pref": [1.0, 1.0]},
    ):
        with pytest.raises(ValueError):
            STCH(**kw)  # type: ignore[arg-type]
    STCH(reference=[1.0, -1.0], transform="none")  # a shift may be negative
    with pytest.raises(ValueError, match="built for 3 tasks"):
        STCH(3)(torch.ones(2))
    with pytest.raises(ValueError, match="reference for 2 tasks"):
        STCH(reference=[1.0, 1.0])(torch.ones(3))
