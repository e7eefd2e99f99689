"""One battery over every registered strategy: finite output, float64, state round trip, resume,
repr. Each case runs a few optimisation steps on a small trunk + heads model."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch

import mtlbal
from conftest import Problem, assert_same, make_problem
from registry import REGISTRY, Entry, feed_validation

CASES = [(e, at) for e in REGISTRY for at in e.at]
IDS = [f"{e.name}@{at}" for e, at in CASES]
M = 3


def build(entry: Entry, at: str, p: Problem) -> tuple[mtlbal.Balancer, Any]:
    kwargs = entry.make(M)
    where = "params" if at == "params" else p.trunk
    bal = mtlbal.Balancer(p.trunk, at=where, **kwargs)
    opt = mtlbal.wrap(torch.optim.SGD(p.params(), lr=0.05, momentum=0.9), bal)
    return bal, opt


def run_steps(entry: Entry, p: Problem, opt: Any, start: int, stop: int) -> list[torch.Tensor]:
    weights = []
    for k in range(start, stop):
        opt.zero_grad()
        info = opt.backward(p.losses())
        opt.step()
        if entry.extras.get("update_after_step"):
            # FAMO-style: re-evaluate the same batch after the step and feed it back
            with torch.no_grad():
                opt.balancer.update(p.losses())
        feed_validation(entry, opt.balancer, p.losses, k)
        weights.append(info.weights.detach().clone())
        if entry.epoch_every and (k + 1) % entry.epoch_every == 0:
            opt.balancer.epoch_end()
    return weights


@pytest.mark.parametrize(("entry", "at"), CASES, ids=IDS)
def test_finite_and_fills_grads(entry: Entry, at: str) -> None:
    p = make_problem(M)
    bal, opt = build(entry, at, p)
    for _ in range(3):
        opt.zero_grad()
        info = opt.backward(p.losses())
        for prm in p.params():
            assert prm.grad is not None, "every parameter the losses reach gets a gradient"
            assert torch.isfinite(prm.grad).all()
        assert info.weights.shape == (M,)
        assert torch.isfinite(info.weights).all()
        opt.step()
    assert bal.step_count == 3


@pytest.mark.parametrize(("entry", "at"), CASES, ids=IDS)
def test_float64(entry: Entry, at: str) -> None:
    p = make_problem(M, dtype=torch.float64)
    _, opt = build(entry, at, p)
    opt.zero_grad()
    opt.backward(p.losses())
    for prm in p.params():
        assert prm.grad is not None and prm.grad.dtype == torch.float64
        assert torch.isfinite(prm.grad).all()


@pytest.mark.parametrize(("entry", "at"), CASES, ids=IDS)
def test_state_round_trip(entry: Entry, at: str) -> None:
    p = make_problem(M)
    bal, opt = build(entry, at, p)
    run_steps(entry, p, opt, 0, 4)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    p2 = make_problem(M)
    bal2, opt2 = build(entry, at, p2)
    opt2.load_state_dict(loaded)
    sd1, sd2 = bal.state_dict(), bal2.state_dict()
    assert sd1["step"] == sd2["step"] == 4
    assert sd1["tasks"] == sd2["tasks"]
    assert_same(sd1, sd2)


@pytest.mark.parametrize(("entry", "at"), CASES, ids=IDS)
def test_resume_equals_uninterrupted(entry: Entry, at: str) -> None:
    k, n = 4, 8
    # uninterrupted
    p = make_problem(M)
    _, opt = build(entry, at, p)
    w_full = run_steps(entry, p, opt, 0, n)
    final_full = [q.detach().clone() for q in p.params()]
    # interrupted at k: save model + optimizer (with the balancer), rebuild everything, continue
    p1 = make_problem(M)
    _, opt1 = build(entry, at, p1)
    w_a = run_steps(entry, p1, opt1, 0, k)
    model_state = copy.deepcopy([q.detach().clone() for q in p1.params()])
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    p2 = make_problem(M)
    with torch.no_grad():
        for q, v in zip(p2.params(), model_state):
            q.copy_(v)
    _, opt2 = build(entry, at, p2)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    w_b = run_steps(entry, p2, opt2, k, n)
    for a, b in zip(w_full, w_a + w_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(final_full, p2.params()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("entry", "at"), CASES, ids=IDS)
def test_repr(entry: Entry, at: str) -> None:
    p = make_problem(M)
    bal, opt = build(entry, at, p)
    text = repr(bal)
    assert "Balancer(" in text
    kwargs = entry.make(M)
    for v in kwargs.values():
        if isinstance(v, torch.nn.Module):
            assert type(v).__name__ in text
    assert "BalancedOptimizer" in repr(opt)
