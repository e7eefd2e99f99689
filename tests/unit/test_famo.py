"""FAMO: objectives and weights against the paper's formulas (float64 loop), the logit update
against an independent reference built on torch.optim.Adam and autograd through softmax, the
Balancer loop (backward, step, re-evaluate, update) and resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import mtlbal
from mtlbal.weighting import FAMO
from mtlbal.weighting.base import LossContext

from ._methods_helpers import TinyNet, check_resume, data


class ReferenceFAMO:
    """The paper's update written directly: Adam on an nn.Parameter, autograd VJP of softmax."""

    def __init__(self, m: int, lr: float, gamma: float) -> None:
        self.w = torch.nn.Parameter(torch.zeros(m, dtype=torch.float64))
        self.opt = torch.optim.Adam([self.w], lr=lr, weight_decay=gamma)
        self.prev: torch.Tensor | None = None

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        self.prev = losses
        z = F.softmax(self.w.detach(), -1)
        d = losses + 1e-8
        c = (z / d).sum()
        return z / d / c

    def update(self, new: torch.Tensor) -> None:
        assert self.prev is not None
        delta = (self.prev + 1e-8).log() - (new + 1e-8).log()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(F.softmax(self.w, -1), self.w, grad_outputs=delta)
        self.opt.zero_grad()
        self.w.grad = g
        self.opt.step()


def test_objectives_match_formula() -> None:
    losses = torch.tensor([0.3, 2.0, 5.0], dtype=torch.float64, requires_grad=True)
    famo = FAMO(3, reduction="mean")
    famo.logits = torch.tensor([0.2, -0.1, 0.5], dtype=torch.float64)
    out = famo.objectives(losses, LossContext())
    z = [math.exp(v) for v in (0.2, -0.1, 0.5)]
    z = [v / sum(z) for v in z]
    d = [v + 1e-8 for v in (0.3, 2.0, 5.0)]
    c = 1.0 / sum(zi / di for zi, di in zip(z, d))
    ref_obj = torch.tensor([c * zi * math.log(di) for zi, di in zip(z, d)], dtype=torch.float64)
    ref_w = torch.tensor([c * zi / di for zi, di in zip(z, d)], dtype=torch.float64)
    torch.testing.assert_close(out.objectives.detach(), ref_obj)
    torch.testing.assert_close(out.weights, ref_w)
    torch.testing.assert_close(out.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.objectives.sum(), losses)
    torch.testing.assert_close(grad, ref_w)  # the weights are ∂ℓ/∂L


def test_sum_scale() -> None:
    famo = FAMO(4)
    w = famo.objectives(torch.full((4,), 2.0), LossContext()).weights
    torch.testing.assert_close(w, torch.ones(4))


def test_update_matches_torch_adam_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    m = 3
    ours = FAMO(m, lr=0.025, weight_decay=1e-2)
    ours.logits = ours.logits.double()
    ours.exp_avg = ours.exp_avg.double()
    ours.exp_avg_sq = ours.exp_avg_sq.double()
    ref = ReferenceFAMO(m, 0.025, 1e-2)
    losses = torch.rand(m, generator=gen, dtype=torch.float64) + 0.5
    for _ in range(30):
        w_ours = ours.objectives(losses, LossContext()).weights
        w_ref = ref.weights(losses)
        torch.testing.assert_close(w_ours, m * w_ref)
        new = losses * (0.8 + 0.3 * torch.rand(m, generator=gen, dtype=torch.float64))
        ours.update(new)
        ref.update(new)
        torch.testing.assert_close(ours.logits, ref.w.detach(), rtol=1e-12, atol=1e-14)
        losses = new


def test_improving_task_loses_weight() -> None:
    famo = FAMO(2, weight_decay=0.0)
    famo.objectives(torch.tensor([1.0, 1.0]), LossContext())
    famo.update(torch.tensor([0.5, 0.99]))
    z = famo.task_weights()
    assert z[0] < 0.5 < z[1]


def _after(bal: mtlbal.Balancer, net: TinyNet, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    with torch.no_grad():
        bal.update(net.losses(*batch))


def test_balancer_loop_and_resume() -> None:
    check_resume(lambda: {"weighting": FAMO(3)}, after=_after)


def test_balancer_update_contract() -> None:
    net = TinyNet(2)
    bal = mtlbal.Balancer(net.trunk, weighting=FAMO(2))
    x, y = data(2, 1)[0]
    with pytest.raises(ValueError, match="previous backward"):
        bal.update(net.losses(x, y))
    bal.backward(net.losses(x, y))
    with torch.no_grad():
        new = net.losses(x, y)
    with pytest.raises(ValueError, match="got tasks"):
        bal.update({"b": new["t1"], "a": new["t0"]})
    with pytest.raises(ValueError, match="1 losses for 2"):
        bal.update([new["t0"]])
    with pytest.raises(ValueError, match="non-finite"):
        bal.update([new["t0"], torch.tensor(float("nan"))])
    before = bal.weighting.logits.clone()
    bal.update(new)  # unchanged parameters: δ = 0, only weight decay (ξ = 0) acts
    torch.testing.assert_close(bal.weighting.logits, before)
    assert int(bal.weighting.adam_step) == 1


def test_update_before_backward_and_bad_input() -> None:
    with pytest.raises(ValueError, match="previous backward"):
        FAMO(2).update(torch.ones(2))
    famo = FAMO(2)
    famo.objectives(torch.ones(2), LossContext())
    with pytest.raises(ValueError, match="2 tasks"):
        famo.update(torch.ones(3))
    with pytest.raises(ValueError, match="num_tasks"):
        FAMO(0)


# ---- issue 8: dtype of the state, and losses at or below their minimum ----


def test_state_follows_the_module_dtype_and_min_losses_keep_their_precision() -> None:
    mins = torch.tensor([0.1, 1.0 / 3.0], dtype=torch.float64)
    famo = FAMO(2, min_losses=mins).double()
    for name in ("logits", "exp_avg", "exp_avg_sq", "min_losses"):
        assert getattr(famo, name).dtype == torch.float64, name
    assert torch.equal(famo.min_losses, mins)  # not rounded through float32
    # losses 1e-9 above their minimum: D = L − L* + 1e-8, all in float64 (reference by hand)
    losses = mins + 1e-9
    out = famo.objectives(losses, LossContext())
    d = [float(losses[t]) - float(mins[t]) + 1e-8 for t in range(2)]
    c = 1.0 / sum(0.5 / x for x in d)
    ref = [2 * c * 0.5 / x for x in d]
    torch.testing.assert_close(
        out.weights, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=0
    )
    famo = famo.float()
    for name in ("logits", "exp_avg", "exp_avg_sq", "min_losses"):
        assert getattr(famo, name).dtype == torch.float32, name


@pytest.mark.parametrize("bad", [0.5, 0.2])
def test_loss_at_or_below_its_minimum_raises_naming_the_task(bad: float) -> None:
    famo = FAMO(2, min_losses=torch.tensor([0.0, 0.5]))
    # the step's domain: [m] flags (no host read); the Balancer refuses the step in its one
    # host sync, naming the task, and nothing changes
    out = famo.objectives(torch.tensor([1.0, bad]), LossContext(tasks=("seg", "depth")))
    assert out.domain is not None and out.domain[0].tolist() == [True, False]
    lin = torch.nn.Linear(3, 2)
    y = lin(torch.randn(4, 3))
    bal = mtlbal.Balancer(lin, weighting=famo)
    prev = famo.prev_losses
    with pytest.raises(ValueError, match=r"min_losses.*task\(s\) 'depth'"):
        bal.backward({"seg": y[:, 0].pow(2).mean() + 1.0, "depth": (0.0 * y[:, 1]).mean() + bad})
    assert all(p.grad is None for p in lin.parameters())
    assert famo.prev_losses is prev  # the refused step's losses were not kept
    famo.objectives(torch.tensor([1.0, 0.9]), LossContext())
    with pytest.raises(ValueError, match=r"task 1.*min_losses"):
        famo.update(torch.tensor([0.8, bad]))
    assert torch.isfinite(famo.logits).all() and famo.logits.abs().sum() == 0  # no step taken
