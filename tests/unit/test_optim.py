"""mtlbal.wrap: a drop-in optimizer."""

from __future__ import annotations

import copy
import gc
import io
import pickle
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import mtlbal
from conftest import Problem, make_problem
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
    with pytest.raises(TypeError, match="Optimizer"):
        mtlbal.wrap("sgd", mtlbal.Balancer(p.trunk))  # type: ignore[arg-type]


# ---------------------------------------------------------------- torch's optimizer hooks


def _wrapped(m: int = 2, **kw: object) -> tuple[Problem, mtlbal.BalancedOptimizer]:
    p = make_problem(m)
    return p, mtlbal.wrap(torch.optim.SGD(p.params(), lr=0.1), mtlbal.Balancer(p.trunk, **kw))


def test_step_pre_and_post_hooks_fire_on_the_wrapper() -> None:
    p, opt = _wrapped()
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre") if o is opt else None)
    opt.register_step_post_hook(lambda o, a, k: calls.append("post") if o is opt else None)
    seen: list[type] = []
    h = register_optimizer_step_post_hook(lambda o, a, k: seen.append(type(o)))
    try:
        opt.zero_grad()
        opt.backward(p.losses())
        opt.step()
    finally:
        h.remove()
    assert calls == ["pre", "post"]
    # the global hook sees the wrapper's step (and, nested in it, the wrapped optimizer's)
    assert mtlbal.BalancedOptimizer in seen


def test_state_dict_and_load_state_dict_hooks_fire_on_the_wrapper() -> None:
    _, opt = _wrapped()
    calls: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))

    def sd_post(o: object, sd: dict) -> dict:
        calls.append("sd-post")
        return {**sd, "extra": 1}

    opt.register_state_dict_post_hook(sd_post)

    def load_pre(o: object, sd: dict) -> dict:
        calls.append("load-pre")
        assert sd["extra"] == 1
        return {k: v for k, v in sd.items() if k != "extra"}

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1 and "mtlbal" in sd
    opt.load_state_dict(sd)
    assert calls == ["sd-pre", "sd-post", "load-pre", "load-post"]


def test_wrapping_twice_is_refused() -> None:
    p = make_problem(2)
    inner = torch.optim.SGD(p.params(), lr=0.1)
    opt = mtlbal.wrap(inner, mtlbal.Balancer(p.trunk))
    with pytest.raises(TypeError, match="already a BalancedOptimizer"):
        mtlbal.wrap(opt, mtlbal.Balancer(p.trunk))
    with pytest.raises(ValueError, match="already wrapped"):
        mtlbal.wrap(inner, mtlbal.Balancer(p.trunk))
    # a wrapper that is gone frees its optimizer
    del opt
    gc.collect()
    mtlbal.wrap(inner, mtlbal.Balancer(p.trunk))


# ---------------------------------------------------------------- GradScaler


def _uw_problem(
    inner_kw: dict[str, object] | None = None,
) -> tuple[Problem, UncertaintyWeighting, mtlbal.BalancedOptimizer]:
    p = make_problem(2)
    uw = UncertaintyWeighting(2, form="simple")
    bal = mtlbal.Balancer(p.trunk, weighting=uw)
    # SGD for the log-variances: a gradient left scaled would show as a step 2**16 too long
    opt = mtlbal.wrap(
        torch.optim.SGD(p.params(), lr=0.01, **(inner_kw or {})),
        bal,
        balancer_optimizer=torch.optim.SGD(bal.parameters(), lr=0.1),
    )
    return p, uw, opt


def test_scaler_unscales_strategy_parameters_before_they_are_stepped() -> None:
    p, uw, opt = _uw_problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt.zero_grad()
    info = opt.backward(p.losses(), scaler=scaler)
    # simple form: objective exp(-s)·L + s, so d/ds = 1 - exp(-s)·L = 1 - L at s = 0
    expected = 0.0 - 0.1 * (1.0 - info.losses)
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(uw.log_vars.detach(), expected)
    assert scaler.get_scale() == 2.0**16  # no overflow seen


def test_scaler_with_a_fused_inner_optimizer_unscales_the_model_gradients() -> None:
    # fused SGD unscales inside its own step when the scaler hands it grad_scale; the wrapper
    # must not borrow that flag from it (its step does not pass grad_scale on)
    p, _, opt = _uw_problem({"fused": True})
    ref = make_problem(2)
    ref_bal = mtlbal.Balancer(ref.trunk, weighting=UncertaintyWeighting(2, form="simple"))
    ref_opt = torch.optim.SGD(ref.params(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt.zero_grad()
    opt.backward(p.losses(), scaler=scaler)
    scaler.step(opt)
    scaler.update()
    ref_bal.backward(ref.losses())
    ref_opt.step()
    for a, b in zip(p.params(), ref.params()):
        torch.testing.assert_close(a, b)


def test_overflowing_strategy_gradient_skips_the_whole_step() -> None:
    p, uw, opt = _uw_problem({"momentum": 0.9})
    opt.balancer_optimizer = torch.optim.Adam(opt.balancer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    params0 = [q.detach().clone() for q in p.params()]
    s0 = uw.log_vars.detach().clone()
    opt.zero_grad()
    opt.backward(p.losses(), scaler=scaler)
    assert uw.log_vars.grad is not None
    uw.log_vars.grad[0] = float("inf")
    assert scaler.step(opt) is None
    scaler.update()
    assert scaler.get_scale() < 2.0**16  # the overflow reached update()
    assert torch.equal(uw.log_vars.detach(), s0)
    assert opt.balancer_optimizer.state_dict()["state"] == {}
    for a, b in zip(p.params(), params0):
        assert torch.equal(a, b)
    assert opt.optimizer.state_dict()["state"] == {}


def test_overflowing_model_gradient_leaves_strategy_parameters_untouched() -> None:
    p, uw, opt = _uw_problem()
    opt.balancer_optimizer = torch.optim.Adam(opt.balancer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    s0 = uw.log_vars.detach().clone()
    opt.zero_grad()
    opt.backward(p.losses(), scaler=scaler)
    first = p.params()[0]
    first.grad[0, 0] = float("nan")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**16
    assert torch.equal(uw.log_vars.detach(), s0)
    assert opt.balancer_optimizer.state_dict()["state"] == {}
    assert opt.balancer.step_count == 1  # backward counted; no after_step-driven change


def test_zero_grad_clears_strategy_gradients_and_scheduler_keeps_working_with_scaler() -> None:
    p, uw, opt = _uw_problem()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for _ in range(2):
        opt.zero_grad()
        assert uw.log_vars.grad is None
        opt.backward(p.losses(), scaler=scaler)
        scaler.step(opt)
        scaler.update()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0025
    assert opt.balancer_optimizer is not None
    assert opt.balancer_optimizer.param_groups[0]["lr"] == 0.1  # not scheduled


def test_deepcopy_and_pickle_keep_a_working_wrapper() -> None:
    p = make_problem(2)
    uw = UncertaintyWeighting(2)
    opt = mtlbal.wrap(torch.optim.Adam(p.params(), lr=1e-2), mtlbal.Balancer(p.trunk, weighting=uw))
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # patches opt.step on the instance
    opt.register_step_pre_hook(lambda o, a, k: None)
    opt.zero_grad()
    opt.backward(p.losses())
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert isinstance(clone, mtlbal.BalancedOptimizer)
        assert clone.optimizer is not opt.optimizer
        torch.testing.assert_close(clone.balancer.weighting.log_vars, uw.log_vars)
        calls: list[object] = []
        clone.register_step_post_hook(lambda o, a, k, calls=calls: calls.append(o))
        clone.step()
        assert calls == [clone]
        with pytest.raises(ValueError, match="already wrapped"):
            mtlbal.wrap(clone.optimizer, clone.balancer)


class _TrainerSideWrapper:
    """What a trainer hands to ``training_step`` (written after Lightning's LightningOptimizer):
    an object whose ``__dict__`` is a shallow copy of the optimizer's and whose class derives
    from a trainer class and the optimizer's class; its ``step`` goes to the real optimizer."""

    @classmethod
    def around(cls, optimizer: torch.optim.Optimizer) -> _TrainerSideWrapper:
        obj = cls.__new__(cls)
        obj.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k != "step"}
        obj._optimizer = optimizer
        obj.__class__ = type("Trainer" + type(optimizer).__name__, (cls, type(optimizer)), {})
        return obj

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def step(self, closure: object = None) -> object:
        return self._optimizer.step()


def test_trainer_side_wrapper_sees_the_same_optimizer_and_scaler() -> None:
    p, uw, opt = _uw_problem()
    outer = _TrainerSideWrapper.around(opt)
    assert isinstance(outer, torch.optim.Optimizer) and isinstance(outer, mtlbal.BalancedOptimizer)
    assert outer.param_groups is opt.optimizer.param_groups
    assert outer.balancer is opt.balancer
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    calls: list[str] = []
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    # manual optimization: backward through the trainer's object, the precision plugin steps
    # the optimizer it was given
    outer.zero_grad()
    info = outer.backward(p.losses(), scaler=scaler)
    expected = -0.1 * (1.0 - info.losses)
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(uw.log_vars.detach(), expected)
    assert calls == ["post"]
    # and through the trainer object's own step
    outer.zero_grad()
    outer.backward(p.losses())
    outer.step()
    assert calls == ["post", "post"]


def test_load_state_dict_is_all_or_nothing() -> None:
    # either part refused leaves both parts as they were: a bad balancer state must not leave
    # the optimizer loaded (it was loaded first), a bad optimizer state must not leave the
    # balancer loaded
    def make() -> tuple[Problem, Any]:
        p = make_problem(2)
        bal = mtlbal.Balancer(p.trunk, weighting=UncertaintyWeighting(2))
        return p, mtlbal.wrap(torch.optim.SGD(p.params(), lr=0.1, momentum=0.9), bal)

    p, opt = make()
    for _ in range(2):
        opt.zero_grad()
        opt.backward(p.losses())
        opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = 0.5

    _, fresh = make()
    bad_balancer = copy.deepcopy(saved)
    bad_balancer["mtlbal"]["balancer"]["weighting"]["log_vars"] = torch.zeros(3)
    with pytest.raises(ValueError, match="log_vars"):
        fresh.load_state_dict(bad_balancer)
    assert fresh.param_groups[0]["lr"] == 0.1 and len(fresh.optimizer.state) == 0

    bad_optimizer = copy.deepcopy(saved)
    bad_optimizer["param_groups"] = [*saved["param_groups"], saved["param_groups"][0]]
    with pytest.raises(ValueError):
        fresh.load_state_dict(bad_optimizer)
    assert fresh.balancer.step_count == 0
    assert torch.equal(fresh.balancer.weighting.log_vars, torch.zeros(2))

    fresh.load_state_dict(saved)  # the good one loads, both parts
    assert fresh.balancer.step_count == 2 and fresh.param_groups[0]["lr"] == 0.5
