"""A step is a transaction: whatever refuses it, nothing a user can see has changed, and the
next step is the one that would have been taken without the refused one. Over the registry."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

import mtlbal
from conftest import Problem, assert_same, make_problem
from registry import REGISTRY, Entry, feed_validation

M = 3
CASES = [
    (e, at, eng)
    for e in REGISTRY
    for at in e.at
    for eng in (("auto", "dense") if at == "params" else ("auto",))
]
IDS = [f"{e.name}@{at}-{eng}" for e, at, eng in CASES]


def build(entry: Entry, at: str, engine: str, p: Problem) -> tuple[mtlbal.Balancer, Any]:
    where = "params" if at == "params" else p.trunk
    bal = mtlbal.Balancer(p.trunk, at=where, engine=engine, **entry.make(M))
    opt = mtlbal.wrap(torch.optim.SGD(p.params(), lr=0.05, momentum=0.9), bal)
    return bal, opt


def train(entry: Entry, p: Problem, opt: Any, steps: int, *, zero: bool = True) -> None:
    for k in range(steps):
        if zero:
            opt.zero_grad()
        opt.backward(p.losses())
        opt.step()
        if entry.extras.get("update_after_step"):
            with torch.no_grad():
                opt.balancer.update(p.losses())
        feed_validation(entry, opt.balancer, p.losses, k)
        if entry.epoch_every and (k + 1) % entry.epoch_every == 0:
            opt.balancer.epoch_end()


def world(p: Problem, bal: mtlbal.Balancer, opt: Any) -> dict[str, Any]:
    """Everything a user can see: gradients, parameters, strategy state, counters, generators."""
    gens = []
    for s in bal.strategies:
        for mod in s.modules():
            g = getattr(mod, "_generator", None)
            if isinstance(g, torch.Generator):
                gens.append(g.get_state())
    return {
        "grads": [None if q.grad is None else q.grad.clone() for q in p.params()],
        "params": [q.detach().clone() for q in p.params()],
        "strategy_params": [q.detach().clone() for q in bal.parameters()],
        "strategy_grads": [None if q.grad is None else q.grad.clone() for q in bal.parameters()],
        "balancer": copy.deepcopy(bal.state_dict()),
        "optimizer": copy.deepcopy(opt.state_dict()),
        "generators": gens,
        "step": bal.step_count,
        "tasks": bal.tasks,
    }


def _refuse_at_commit(bal: mtlbal.Balancer, monkeypatch: pytest.MonkeyPatch) -> None:
    # refused at the last moment before the commit: every stage that computes has run (the
    # weighting, the engine, the solver with its state updates, the generators)
    solve = bal._solve

    def boom(*args: Any, **kwargs: Any) -> None:
        solve(*args, **kwargs)
        raise RuntimeError("refused by the test")

    monkeypatch.setattr(bal, "_solve", boom)


def refuse_then_step(
    p: Any,
    q: Any,
    built: tuple[mtlbal.Balancer, Any],
    twin: tuple[mtlbal.Balancer, Any],
    world_of: Callable[[Any, mtlbal.Balancer, Any], dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``p`` and its twin ``q`` trained alike: a step of ``p`` refused at the last moment
    changes nothing a user can see, and the next step equals the twin's, which never saw it."""
    (bal, opt), (bal_q, opt_q) = built, twin
    # gradients already present: a refused step must not add to them either
    opt.backward(p.losses())
    opt_q.backward(q.losses())
    before = world_of(p, bal, opt)
    with monkeypatch.context() as mp:
        _refuse_at_commit(bal, mp)
        with pytest.raises(RuntimeError, match="refused by the test"):
            opt.backward(p.losses())
    assert_same(before, world_of(p, bal, opt), "world")
    info = opt.backward(p.losses())
    info_q = opt_q.backward(q.losses())
    torch.testing.assert_close(info.weights, info_q.weights, rtol=0, atol=0)
    for a, b in zip(p.params(), q.params()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    opt.step()
    opt_q.step()
    assert_same(world_of(q, bal_q, opt_q), world_of(p, bal, opt), "after the next step")


@pytest.mark.parametrize(("entry", "at", "engine"), CASES, ids=IDS)
def test_refused_step_changes_nothing_and_next_step_is_unaffected(
    entry: Entry, at: str, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    p, q = make_problem(M), make_problem(M)
    bal, opt = build(entry, at, engine, p)
    bal_q, opt_q = build(entry, at, engine, q)
    train(entry, p, opt, 3)
    train(entry, q, opt_q, 3)
    refuse_then_step(p, q, (bal, opt), (bal_q, opt_q), world, monkeypatch)


@pytest.mark.parametrize(("entry", "at", "engine"), CASES, ids=IDS)
def test_backward_twice_on_one_graph_is_refused_cleanly(entry: Entry, at: str, engine: str) -> None:
    p = make_problem(M)
    bal, opt = build(entry, at, engine, p)
    train(entry, p, opt, 2)
    opt.zero_grad()
    losses = p.losses()
    opt.backward(losses)
    before = world(p, bal, opt)
    with pytest.raises((RuntimeError, ValueError)):
        opt.backward(losses)
    assert_same(before, world(p, bal, opt), "world")


def _nan_grad_losses(p: Problem) -> dict[str, torch.Tensor]:
    # task1's loss is finite (0) but its gradient is NaN: d sqrt(u)/du at u = 0 times du/dz = 0
    losses = p.losses()
    z = p.trunk(p.x)
    losses["task1"] = losses["task1"] + torch.sqrt((z - z.detach()).pow(2).sum())
    return losses


def _forms_task_grads(entry: Entry) -> bool:
    p = make_problem(M)
    bal = mtlbal.Balancer(p.trunk, **entry.make(M))
    return bal._needs_grads


# per-task gradients at the parameters (below a cut point the representation's gradient is
# finite; without per-task gradients the one backward is a plain step's)
GRAD_CASES = [c for c in CASES if c[1] == "params" and _forms_task_grads(c[0])]


@pytest.mark.parametrize(
    ("entry", "at", "engine"), GRAD_CASES, ids=[f"{e.name}@{a}-{g}" for e, a, g in GRAD_CASES]
)
def test_nonfinite_task_gradient_behind_finite_loss(entry: Entry, at: str, engine: str) -> None:
    p = make_problem(M)
    bal, opt = build(entry, at, engine, p)
    train(entry, p, opt, 2)
    opt.zero_grad()
    before = world(p, bal, opt)
    with pytest.raises(ValueError, match=r"non-finite gradient of task.*'task1'"):
        opt.backward(_nan_grad_losses(p))
    assert_same(before, world(p, bal, opt), "world")


def test_nonfinite_task_gradient_skip_policy() -> None:
    p = make_problem(M)
    bal = mtlbal.Balancer(p.trunk, aggregator=mtlbal.aggregation.MGDA(), nonfinite="skip")
    info = bal.backward(_nan_grad_losses(p))
    assert info.skipped and bal.step_count == 0
    assert all(q.grad is None for q in p.params())


def test_refused_step_does_not_double_head_gradients() -> None:
    # the user loop that catches a refusal and goes on: the next step's head gradients are
    # those of one step, not two
    p, q = make_problem(M), make_problem(M)
    agg = mtlbal.aggregation.MGDA()
    bal = mtlbal.Balancer(p.trunk, aggregator=agg)
    ref = mtlbal.Balancer(q.trunk, aggregator=mtlbal.aggregation.MGDA())

    def failing(g: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise RuntimeError("solver failed")

    orig = agg.solve
    agg.solve = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="solver failed"):
        bal.backward(p.losses())
    agg.solve = orig  # type: ignore[method-assign]
    assert all(x.grad is None for x in p.params())
    bal.backward(p.losses())
    ref.backward(q.losses())
    for a, b in zip(p.params(), q.params()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_in_place_state_mutation_is_named() -> None:
    # the contract that makes the rollback exact is checked on every step
    p = make_problem(M)
    w = mtlbal.weighting.UncertaintyWeighting(M)
    bal = mtlbal.Balancer(p.trunk, weighting=w)
    orig = w.objectives

    def bad(losses: torch.Tensor, ctx: Any) -> Any:
        with torch.no_grad():
            w.log_vars.add_(1.0)
        return orig(losses, ctx)

    w.objectives = bad  # type: ignore[method-assign]
    with pytest.raises(
        RuntimeError, match="UncertaintyWeighting changed its parameter 'log_vars' in place"
    ):
        bal.backward(p.losses())
