"""mtlbal.wrap: a drop-in optimizer."""

from __future__ import annotations

import io

import torch

import mtlbal
from conftest import make_problem
from mtlbal.weighting import UncertaintyWeighting


def test_is_an_optimizer_sharing_param_groups_and_state() -> None:
    p = make_problem(2)
    inner = torch.optim.Adam(p.params(), lr=1e-2)
    opt = mtlbal.wrap(inner, mtlbal.Balancer(p.trunk))
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults


def test_lr_scheduler_drives_the_wrapped_optimizer() -> None:
    p = make_problem(2)
    inner = torch.optim.SGD(p.params(), lr=1.0)
    opt = mtlbal.wrap(inner, mtlbal.Balancer(p.trunk))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.zero_grad()
        opt.backward(p.losses())
        opt.step()
        sched.step()
    assert inner.param_groups[0]["lr"] == 0.125
    assert opt.lr_factor() == 8.0


def test_step_matches_plain_optimizer_with_equal_weights() -> None:
    p1, p2 = make_problem(2), make_problem(2)
    o1 = torch.optim.Adam(p1.params(), lr=1e-2)
    o2 = mtlbal.wrap(torch.optim.Adam(p2.params(), lr=1e-2), mtlbal.Balancer(p2.trunk))
    for _ in range(3):
        o1.zero_grad()
        sum(p1.losses().values()).backward()
        o1.step()
        o2.zero_grad()
        o2.backward(p2.losses())
        o2.step()
    for a, b in zip(p1.params(), p2.params()):
        assert torch.equal(a, b)


def test_wrapper_steps_strategy_parameters_it_does_not_own() -> None:
    p = make_problem(2)
    uw = UncertaintyWeighting(2)
    opt = mtlbal.wrap(torch.optim.SGD(p.params(), lr=0.1), mtlbal.Balancer(p.trunk, weighting=uw))
    assert opt.balancer_optimizer is not None
    before = uw.log_vars.detach().clone()
    opt.zero_grad()
    opt.backward(p.losses())
    assert uw.log_vars.grad is not None
    opt.step()
    assert not torch.equal(before, uw.log_vars.detach())
    opt.zero_grad()
    assert uw.log_vars.grad is None


def test_strategy_parameters_in_user_optimizer_are_not_stepped_twice() -> None:
    p = make_problem(2)
    uw = UncertaintyWeighting(2)
    bal = mtlbal.Balancer(p.trunk, weighting=uw)
    inner = torch.optim.SGD([*p.params(), *bal.parameters()], lr=0.1)
    opt = mtlbal.wrap(inner, bal)
    assert opt.balancer_optimizer is None
    opt.zero_grad()
    opt.backward(p.losses())
    expected = uw.log_vars.detach() - 0.1 * uw.log_vars.grad
    opt.step()
    torch.testing.assert_close(uw.log_vars.detach(), expected)


def test_state_dict_carries_balancer_and_inner_state() -> None:
    p = make_problem(2)
    uw = UncertaintyWeighting(2)
    opt = mtlbal.wrap(torch.optim.Adam(p.params(), lr=1e-2), mtlbal.Balancer(p.trunk, weighting=uw))
    for _ in range(2):
        opt.zero_grad()
        opt.backward(p.losses())
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=False)
    assert "mtlbal" in sd and sd["mtlbal"]["balancer"]["step"] == 2
    p2 = make_problem(2)
    uw2 = UncertaintyWeighting(2)
    inner2 = torch.optim.Adam(p2.params(), lr=1e-2)
    opt2 = mtlbal.wrap(inner2, mtlbal.Balancer(p2.trunk, weighting=uw2))
    opt2.load_state_dict(sd)
    assert opt2.balancer.step_count == 2
    torch.testing.assert_close(uw2.log_vars, uw.log_vars, rtol=0, atol=0)
    first = p.params()[0]
    first2 = p2.params()[0]
    torch.testing.assert_close(
        inner2.state[first2]["exp_avg"], opt.optimizer.state[first]["exp_avg"], rtol=0, atol=0
    )
    assert opt2.balancer_optimizer is not None and opt.balancer_optimizer is not None
    assert opt2.balancer_optimizer.state_dict()["state"].keys() == (
        opt.balancer_optimizer.state_dict()["state"].keys()
    )


def test_plain_optimizer_state_dict_loads_into_wrapper() -> None:
    p = make_problem(2)
    inner = torch.optim.SGD(p.params(), lr=0.1, momentum=0.9)
    opt = mtlbal.wrap(inner, mtlbal.Balancer(p.trunk))
    opt.load_state_dict(torch.optim.SGD(p.params(), lr=0.3, momentum=0.9).state_dict())
    assert inner.param_groups[0]["lr"] == 0.3


def test_wrap_rejects_non_optimizer() -> None:
    p = make_problem(2)
    import pytest

    with pytest.raises(TypeError, match="Optimizer"):
        mtlbal.wrap("sgd", mtlbal.Balancer(p.trunk))  # type: ignore[arg-type]
