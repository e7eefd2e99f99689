"""LDC-MTL: weights and router gradient against the paper's objective (float64, autograd through
a direct transcription of g + λ f), parity with the official trainers' computation
(OptMN-Lab/LDC-MTL @ 7c3946518689bf05be196c7bd51947b2cf885c9e: experiments/nyuv2/trainer.py
— ratio to the first losses —, experiments/quantum_chemistry/trainer.py — log of the ratio —,
experiments/celeba/trainer.py — raw losses —; the training step re-implemented here with the
router's weights as softmax of a logit vector), resume, the domain."""

from __future__ import annotations

import copy

import pytest
import torch

import mtlbal
from mtlbal.weighting import LDCMTL
from mtlbal.weighting.base import LossContext

from ._methods_helpers import TinyNet, data

F64 = torch.float64


def paper_objective(
    losses: torch.Tensor, logits: torch.Tensor, initial: torch.Tensor, lam: float, norm: str
) -> torch.Tensor:
    """g + λ f: g = Σ σ_t ℓ̃_t, f = Σ_{t<m} |σ_t ℓ̃_t − σ_{t+1} ℓ̃_{t+1}|, σ = softmax(θ)."""
    e = torch.exp(logits - logits.max())
    sigma = e / e.sum()
    m = losses.shape[0]
    if norm == "initial_ratio":
        tau = [float(initial[t]) / float(initial.min()) for t in range(m)]
        normed = [losses[t] / tau[t] for t in range(m)]
    elif norm == "log_initial":
        normed = [torch.log(losses[t] / float(initial[t])) for t in range(m)]
    else:
        normed = [losses[t] for t in range(m)]
    g = sum(sigma[t] * normed[t] for t in range(m))
    f = sum(abs(sigma[t] * normed[t] - sigma[t + 1] * normed[t + 1]) for t in range(m - 1))
    return g + lam * f


@pytest.mark.parametrize("m", [2, 3, 7, 16])
@pytest.mark.parametrize("norm", ["initial_ratio", "log_initial", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_and_router_gradient_match_the_paper(m: int, norm: str, seed: int) -> None:
    g = torch.Generator().manual_seed(100 * m + seed)
    lam = 0.3
    s = LDCMTL(m, lambda_=lam, normalization=norm, reduction="mean").double()
    with torch.no_grad():
        s.router_logits.copy_(torch.randn(m, generator=g, dtype=F64))
    initial = torch.rand(m, generator=g, dtype=F64) * 3 + 0.2
    s.objectives(initial, LossContext())  # the first step sets L⁰
    for _ in range(3):
        losses = torch.rand(m, generator=g, dtype=F64) * 3 + 0.2
        x = losses.clone().requires_grad_(True)
        theta = s.router_logits.detach().clone().requires_grad_(True)
        ref = paper_objective(x, theta, initial, lam, norm)
        ref_w, ref_theta = torch.autograd.grad(ref, [x, theta])
        x2 = losses.clone().requires_grad_(True)
        out = s.objectives(x2, LossContext())
        torch.testing.assert_close(out.weights, ref_w, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(
            out.objectives.sum().detach(), ref.detach(), rtol=1e-12, atol=1e-13
        )
        (gx,) = torch.autograd.grad(out.objectives.sum(), x2)
        torch.testing.assert_close(gx, ref_w, rtol=1e-12, atol=1e-13)
        assert out.aux is not None and float(out.aux.detach()) == 0.0
        (gt,) = torch.autograd.grad(out.aux, s.router_logits)
        torch.testing.assert_close(gt, ref_theta, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(s(losses), ref_w, rtol=1e-12, atol=1e-13)


def test_sum_scale_and_equal_losses() -> None:
    s = LDCMTL(4)
    torch.testing.assert_close(s(torch.full((4,), 0.7)), torch.ones(4))
    mean = LDCMTL(4, reduction="mean")
    losses = torch.tensor([1.0, 2.0, 0.5, 3.0])
    torch.testing.assert_close(s(losses), 4 * mean(losses))


# ---------------------------------------------------------------- the official trainers
class Router(torch.nn.Module):
    def __init__(self, m: int) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(m, dtype=F64))

    def forward(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)


def official_total(
    losses: torch.Tensor, weights: torch.Tensor, state: dict, lamb: float, variant: str
) -> torch.Tensor:
    """The training step's total_loss of each official trainer."""
    if variant == "nyuv2":
        if "ratios" not in state:  # epoch 0, batch 0
            initial = losses.detach().clone()
            state["ratios"] = initial / initial.min()
        ratios = state["ratios"]
        weighted_loss = weights @ (losses / ratios) / weights.sum()
        wl = weights * (losses / ratios)
    elif variant == "qm9":
        if "initial" not in state:
            state["initial"] = losses.detach().clone()
        logl = torch.log(losses / state["initial"])
        weighted_loss = weights @ logl / weights.sum().detach()
        wl = weights * logl
    else:  # celeba
        weighted_loss = weights @ losses / weights.sum().detach()
        wl = weights * losses
    loss_diff = torch.abs(wl[:-1] - wl[1:])
    return weighted_loss + lamb * torch.sum(loss_diff)


NORMS = {"nyuv2": "initial_ratio", "qm9": "log_initial", "celeba": "none"}


@pytest.mark.parametrize("variant", ["nyuv2", "qm9", "celeba"])
@pytest.mark.parametrize("m", [2, 3, 5])
def test_training_matches_the_official_trainer(variant: str, m: int) -> None:
    # both runs: Adam over the network and the router (one optimizer, as the trainers), float64
    lamb = 0.05
    a = TinyNet(m).double()
    b = copy.deepcopy(a)
    router = Router(m)
    state: dict = {}
    opt_b = torch.optim.Adam([*b.parameters(), *router.parameters()], lr=1e-2)
    weighting = LDCMTL(m, lambda_=lamb, normalization=NORMS[variant], reduction="mean").double()
    bal = mtlbal.Balancer(a.trunk, weighting=weighting)
    opt_a = mtlbal.wrap(
        torch.optim.Adam(a.parameters(), lr=1e-2),
        bal,
        balancer_optimizer=torch.optim.Adam(bal.parameters(), lr=1e-2),
    )
    for x, y in data(m, 6, seed=m):
        x, y = x.double(), y.double()
        opt_b.zero_grad()
        losses = torch.stack(list(b.losses(x, y).values()))
        official_total(losses, router(), state, lamb, variant).backward()
        opt_a.zero_grad()
        opt_a.backward(a.losses(x, y))
        # 1e-9: mtlbal normalises as (L / L⁰)·min L⁰ (exactly at the penalty's kink on the
        # first step), the official code as L / (L⁰ / min L⁰): the same number up to rounding,
        # which Adam's normalisation amplifies over the steps
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            weighting.router_logits.grad, router.logits.grad, rtol=1e-9, atol=1e-12
        )
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(weighting.router_logits.detach(), router.logits.detach())
    assert float(router.logits.detach().abs().max()) > 1e-3  # the router did move


# ---------------------------------------------------------------- state, domain
def test_resume_with_the_router_in_the_optimizer() -> None:
    m = 3
    batches = data(m, 8, seed=3)

    def run(
        k0: int, k1: int, net: TinyNet, state: dict | None
    ) -> tuple[list[torch.Tensor], dict, TinyNet]:
        bal = mtlbal.Balancer(net.trunk, weighting=LDCMTL(m, lambda_=0.2))
        opt = mtlbal.wrap(torch.optim.Adam(net.parameters(), lr=1e-2), bal)
        if state is not None:
            opt.load_state_dict(copy.deepcopy(state))
        out = []
        for x, y in batches[k0:k1]:
            opt.zero_grad()
            opt.backward(net.losses(x, y))
            out.append(bal.weighting.router_logits.grad.clone())
            opt.step()
        return out, copy.deepcopy(opt.state_dict()), net

    full, _, _ = run(0, 8, TinyNet(m), None)
    first, state, net = run(0, 5, TinyNet(m), None)
    saved = state["mtlbal"]["balancer"]["weighting"]
    assert set(saved) >= {"router_logits", "initial_losses"}
    fresh = TinyNet(m)
    fresh.load_state_dict(net.state_dict())
    rest, _, _ = run(5, 8, fresh, state)
    for u, v in zip(full, first + rest):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_state_dict_holds_the_router_and_the_first_losses() -> None:
    s = LDCMTL(3)
    s.objectives(torch.tensor([1.0, 2.0, 4.0]), LossContext())
    state = s.state_dict()
    assert set(state) >= {"router_logits", "initial_losses"}
    assert state["initial_losses"].tolist() == [1.0, 2.0, 4.0]
    s.objectives(torch.tensor([0.5, 0.5, 0.5]), LossContext())  # L⁰ is kept, not replaced
    assert s.initial_losses.tolist() == [1.0, 2.0, 4.0]
    s.reset()
    assert s.initial_losses is None and float(s.router_logits.detach().abs().sum()) == 0.0


@pytest.mark.parametrize(
    ("norm", "first", "later", "pattern"),
    [
        ("initial_ratio", 0.0, None, r"L⁰ > 0.*task\(s\) 'depth'"),
        ("log_initial", 1.0, 0.0, r"L > 0.*task\(s\) 'depth'"),
    ],
)
def test_outside_the_domain_is_refused_naming_the_task(
    norm: str, first: float, later: float | None, pattern: str
) -> None:
    s = LDCMTL(2, normalization=norm)
    lin = torch.nn.Linear(3, 2)
    bal = mtlbal.Balancer(lin, weighting=s)

    def losses(v: float) -> dict[str, torch.Tensor]:
        y = lin(torch.randn(4, 3))
        return {"seg": y[:, 0].pow(2).mean() + 1.0, "depth": 0.0 * y[:, 1].mean() + v}

    if later is not None:
        bal.backward(losses(first))
        for p in lin.parameters():
            p.grad = None
    with pytest.raises(ValueError, match=pattern):
        bal.backward(losses(first if later is None else later))
    assert all(p.grad is None for p in lin.parameters())
    if later is None:
        assert s.initial_losses is None  # the refused first step did not set L⁰


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match="lambda_"):
        LDCMTL(3, lambda_=-0.1)
    with pytest.raises(ValueError, match="normalization"):
        LDCMTL(3, normalization="ratio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction"):
        LDCMTL(3, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="3 tasks"):
        LDCMTL(3)(torch.ones(2))
