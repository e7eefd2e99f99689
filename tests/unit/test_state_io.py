"""Checked state loading (strategies and the Balancer) and copying/pickling a Balancer mid-step.

Every refusal must leave the target bitwise unchanged: parameters, buffers, declared state
(set or unset), generator state, extra state, the step counter and the task names.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import mtlbal
from conftest import Problem, assert_same, make_problem
from mtlbal import aggregation as A
from mtlbal import transforms as T
from mtlbal import weighting as W
from mtlbal._stateful import Stateful
from registry import REGISTRY, Entry

M = 3


# ---------------------------------------------------------------------------- helpers
def trained(
    m: int = M, steps: int = 3, seed: int = 0, at: str = "params", **kwargs: Any
) -> tuple[mtlbal.Balancer, Problem, Any]:
    """A Balancer (and its problem, wrapped optimizer) after ``steps`` steps."""
    p = make_problem(m, seed=seed)
    where: Any = "params" if at == "params" else p.trunk
    bal = mtlbal.Balancer(p.trunk, at=where, **kwargs)
    opt = mtlbal.wrap(torch.optim.SGD(p.params(), lr=0.05), bal)
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(p.losses())
        opt.step()
    return bal, p, opt


def everything(obj: Stateful | mtlbal.Balancer) -> Any:
    """All the state of a strategy or a Balancer, copied (for bitwise comparison)."""
    if isinstance(obj, mtlbal.Balancer):
        return {
            "step": obj.step_count,
            "tasks": obj.tasks,
            "strategies": [everything(s) for s in obj.strategies],  # type: ignore[arg-type]
        }
    return copy.deepcopy(
        {
            "params": {n: p.detach() for n, p in obj.named_parameters()},
            "buffers": {n: b for n, b in obj.named_buffers()},
            "unset": sorted(n for n in obj._state_defaults if getattr(obj, n) is None),
            "generator": None if obj._generator is None else obj._generator.get_state(),
            "extra": obj.get_extra_state(),
        }
    )


def refused(target: Stateful | mtlbal.Balancer, state: Any, match: str, **kw: Any) -> None:
    """Loading ``state`` into ``target`` raises ValueError matching ``match``; nothing changes."""
    before = everything(target)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state, **kw)
    assert_same(before, everything(target))


# ---------------------------------------------------------------------------- strategies
def test_strategy_state_records_class_and_configuration() -> None:
    uw = W.UncertaintyWeighting(M, form="simple")
    extra = uw.state_dict()["_extra_state"]
    assert extra["_strategy"] == "UncertaintyWeighting"
    assert extra["_config"] == {
        "num_tasks": M,
        "form": "simple",
        "task_types": None,
        "init_log_var": 0.0,
        "min_log_var": -10.0,
    }
    # num_tasks is recorded even where hparams() leaves it out
    assert W.DWA(M).state_dict()["_extra_state"]["_config"]["num_tasks"] == M


def test_refuses_the_state_of_another_strategy() -> None:
    bal, _, _ = trained(weighting=W.GradNorm(M))
    uw = trained(weighting=W.UncertaintyWeighting(M))[0].weighting
    refused(
        bal.weighting, uw.state_dict(), r"GradNorm: the state was saved by UncertaintyWeighting"
    )


def test_refuses_another_task_count() -> None:
    saved = trained(weighting=W.UncertaintyWeighting(M))[0].weighting.state_dict()
    target = trained(2, weighting=W.UncertaintyWeighting(2))[0].weighting
    refused(
        target,
        saved,
        r"UncertaintyWeighting: parameter 'log_vars' has shape \(3,\), expected \(2,\)",
    )
    refused(target, saved, r"num_tasks=3 saved, 2 here")


def test_refuses_a_lazy_state_inconsistent_with_the_task_count() -> None:
    # GradNorm's initial losses are set at the first step: a fresh one adopts the saved shape,
    # which must still have num_tasks entries
    saved = trained(weighting=W.GradNorm(M))[0].weighting.state_dict()
    saved["initial_losses"] = torch.ones(M + 1)
    refused(W.GradNorm(M), saved, r"GradNorm: state 'initial_losses' has shape \(4,\), expected 3")


def test_refuses_a_set_lazy_state_of_another_shape() -> None:
    # GradVac does not know its task count; its targets, once set, keep their shape
    saved = trained(2, aggregator=A.GradVac(seed=0))[0].aggregator
    target = trained(aggregator=A.GradVac(seed=0))[0].aggregator
    assert saved is not None and target is not None
    refused(
        target,
        saved.state_dict(),
        r"GradVac: state 'targets' has shape \(2, 2\), expected \(3, 3\)",
    )


def test_refuses_a_truncated_state() -> None:
    famo = trained(weighting=W.FAMO(M))[0].weighting
    saved = famo.state_dict()
    del saved["logits"]
    target = trained(seed=1, weighting=W.FAMO(M))[0].weighting
    refused(target, saved, r"FAMO: missing state 'logits'")
    refused(target, {}, r"missing state '_extra_state'")


def test_refuses_unexpected_keys() -> None:
    saved = trained(weighting=W.UncertaintyWeighting(M))[0].weighting.state_dict()
    saved["bogus"] = torch.zeros(1)
    refused(W.UncertaintyWeighting(M), saved, r"UncertaintyWeighting: unexpected state 'bogus'")


def test_refuses_a_wrong_dtype_category() -> None:
    saved = trained(weighting=W.FAMO(M))[0].weighting.state_dict()
    saved["logits"] = torch.zeros(M, dtype=torch.int64)
    refused(
        W.FAMO(M),
        saved,
        r"FAMO: state 'logits' has dtype torch.int64 \(integer\), expected a floating tensor",
    )
    nash = A.NashMTL()
    bad = nash.state_dict()
    bad["calls"] = torch.zeros((), dtype=torch.float32)
    refused(nash, bad, r"NashMTL: state 'calls' .* \(floating\), expected a integer tensor")
    uw = W.UncertaintyWeighting(M)
    bad = uw.state_dict()
    bad["log_vars"] = torch.zeros(M, dtype=torch.bool)
    refused(uw, bad, r"parameter 'log_vars' has dtype torch.bool \(bool\)")


def test_a_different_seed_is_not_a_different_configuration() -> None:
    # the saved generator state is restored whatever the seed (which only matters at reset)
    saved = trained(aggregator=A.PCGrad(seed=1))[0].state_dict()
    target = trained(aggregator=A.PCGrad(seed=2))[0]
    target.load_state_dict(saved)
    assert target.aggregator is not None
    assert torch.equal(
        target.aggregator._generator.get_state(),  # type: ignore[union-attr]
        saved["aggregator"]["_extra_state"]["_generator"],
    )


def test_refuses_another_configuration() -> None:
    saved = trained(weighting=W.UncertaintyWeighting(M, form="simple"))[0].weighting.state_dict()
    refused(
        W.UncertaintyWeighting(M),
        saved,
        r"UncertaintyWeighting: the configuration differs: form='simple' saved, 'kendall' here",
    )


def test_refuses_a_non_mapping() -> None:
    refused(
        W.UncertaintyWeighting(M), [1, 2], r"UncertaintyWeighting: a state_dict must be a mapping"
    )
    refused(W.UncertaintyWeighting(M), {"_extra_state": 3}, r"'_extra_state' must be a mapping")


def test_refuses_an_invalid_generator_state() -> None:
    pc = trained(aggregator=A.PCGrad(seed=1))[0].aggregator
    assert pc is not None
    saved = pc.state_dict()
    saved["_extra_state"]["_generator"] = saved["_extra_state"]["_generator"][:10]
    refused(pc, saved, r"PCGrad: state '_extra_state' has an invalid generator state")
    del saved["_extra_state"]["_generator"]
    refused(pc, saved, r"PCGrad: state '_extra_state' has no generator state")
    # a state with a generator for a strategy without one
    refused(
        W.Equal(),
        {"_extra_state": {**W.Equal().get_extra_state(), "_generator": 1}},
        "no generator",
    )


def test_refuses_incomplete_extra_state() -> None:
    igb = trained(weighting=W.IGB(M, base_epoch=0))[0].weighting
    saved = igb.state_dict()
    del saved["_extra_state"]["epoch"]
    refused(igb, saved, r"IGB: state '_extra_state' lacks the entry 'epoch'")
    # even with strict=False: a strategy's extra state cannot be loaded in part
    refused(igb, saved, r"lacks the entry 'epoch'", strict=False)


def test_refuses_a_state_without_a_strategy_record() -> None:
    saved = W.UncertaintyWeighting(M).state_dict()
    del saved["_extra_state"]["_strategy"]
    refused(W.UncertaintyWeighting(M), saved, r"does not record which strategy saved it")


def test_reports_every_problem_at_once() -> None:
    saved = W.FAMO(M).state_dict()
    saved["logits"] = torch.zeros(M + 1)
    saved["exp_avg"] = torch.zeros(M, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"2 problems") as err:
        W.FAMO(M).load_state_dict(saved)
    assert "'logits' has shape (4,)" in str(err.value)
    assert "'exp_avg' has dtype torch.int32" in str(err.value)


def test_strategy_non_strict_loads_what_matches_and_reports_the_rest() -> None:
    source = trained(weighting=W.FAMO(M))[0].weighting
    saved = source.state_dict()
    del saved["logits"]
    saved["bogus"] = torch.zeros(1)
    target = W.FAMO(M)
    logits = target.logits.clone()
    keys = target.load_state_dict(saved, strict=False)
    assert keys.missing_keys == ["logits"] and keys.unexpected_keys == ["bogus"]
    assert torch.equal(target.logits, logits)  # left as it was
    assert torch.equal(target.exp_avg, source.exp_avg)  # loaded
    # another configuration is tolerated, shapes are not
    simple = W.UncertaintyWeighting(M, form="simple").state_dict()
    W.UncertaintyWeighting(M).load_state_dict(simple, strict=False)
    refused(W.UncertaintyWeighting(2), simple, r"has shape \(3,\), expected \(2,\)", strict=False)
    # another strategy is not
    refused(W.GradNorm(M), W.UncertaintyWeighting(M).state_dict(), r"saved by", strict=False)


def test_assign_true_is_refused() -> None:
    uw = W.UncertaintyWeighting(M)
    with pytest.raises(ValueError, match="assign=True"):
        uw.load_state_dict(uw.state_dict(), assign=True)


def test_failed_assignment_is_rolled_back(monkeypatch: pytest.MonkeyPatch) -> None:
    igb = trained(weighting=W.IGB(M, base_epoch=0))[0].weighting
    saved = trained(seed=3, steps=5, weighting=W.IGB(M, base_epoch=0))[0].weighting.state_dict()

    original = W.IGB.load_extra_state
    calls = []

    def broken(self: Any, state: Any) -> None:
        # a strategy that fails half-way through its first load (the rollback then loads the
        # snapshot it took, which succeeds)
        calls.append(1)
        if len(calls) == 1:
            self.epoch = 99
            raise RuntimeError("boom")
        original(self, state)

    monkeypatch.setattr(W.IGB, "load_extra_state", broken)
    before = everything(igb)
    with pytest.raises(RuntimeError, match="boom"):
        igb.load_state_dict(saved)
    monkeypatch.undo()
    assert_same(before, everything(igb))
    assert igb.epoch != 99


# ---------------------------------------------------------------------------- the Balancer
def full(**kw: Any) -> dict[str, Any]:
    return {
        "weighting": W.UncertaintyWeighting(M),
        "aggregator": A.PCGrad(seed=1),
        "transforms": T.SparseMask(ratio=0.5),
        **kw,
    }


def test_balancer_state_format() -> None:
    bal, _, _ = trained(**full())
    sd = bal.state_dict()
    assert set(sd) == {
        "format_version",
        "step",
        "tasks",
        "config",
        "weighting",
        "aggregator",
        "transforms",
    }
    assert sd["format_version"] == 1
    assert sd["step"] == 3 and sd["tasks"] == ["task0", "task1", "task2"]
    assert sd["config"] == {
        "weighting": "UncertaintyWeighting",
        "aggregator": "PCGrad",
        "transforms": ["SparseMask"],
        "at": "params",
    }
    assert trained(at="cut")[0].state_dict()["config"]["at"] == "cut"
    # plain tensors and Python values: loadable with weights_only=True
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = trained(seed=1, **full())[0]
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert_same(everything(bal), everything(other))


def test_balancer_refuses_a_non_mapping() -> None:
    bal = trained(**full())[0]
    refused(bal, [1, 2], r"Balancer: a state_dict must be a mapping")
    refused(bal, None, r"Balancer: a state_dict must be a mapping")


def test_balancer_refuses_missing_and_unexpected_keys() -> None:
    bal = trained(**full())[0]
    saved = trained(seed=1, steps=5, **full())[0].state_dict()
    for key in ("step", "tasks", "weighting", "config", "format_version"):
        truncated = {k: v for k, v in saved.items() if k != key}
        refused(bal, truncated, rf"Balancer: missing key '{key}'")
    refused(bal, {**saved, "extra": 1}, r"Balancer: unexpected key 'extra'")
    weighting = dict(saved["weighting"])
    del weighting["log_vars"]
    refused(
        bal, {**saved, "weighting": weighting}, r"UncertaintyWeighting: missing state 'log_vars'"
    )


def test_balancer_refuses_another_configuration() -> None:
    bal = trained(**full())[0]
    refused(
        bal,
        trained(**full(aggregator=A.MGDA()))[0].state_dict(),
        r"Balancer: configuration differs: aggregator 'MGDA' saved, 'PCGrad' here",
    )
    refused(
        bal,
        trained(**full(aggregator=None))[0].state_dict(),
        r"the state has no aggregator's state, this Balancer has PCGrad",
    )
    refused(
        trained(**full(aggregator=None))[0],
        bal.state_dict(),
        r"the state has an aggregator's state, this Balancer has none",
    )
    refused(
        bal,
        trained(**full(transforms=[]))[0].state_dict(),
        r"the state has 0 transform\(s\), this Balancer has 1",
    )
    refused(bal, trained(at="cut", **full())[0].state_dict(), r"at 'cut' saved, 'params' here")
    refused(
        bal,
        trained(**full(weighting=W.GradNorm(M)))[0].state_dict(),
        r"UncertaintyWeighting: the state was saved by GradNorm",
    )
    refused(bal, {**bal.state_dict(), "format_version": 99}, r"format version 99")


def test_balancer_refuses_another_task_count() -> None:
    bal = trained(2, **full(weighting=W.UncertaintyWeighting(2)))[0]
    saved = trained(**full())[0].state_dict()
    refused(bal, saved, r"UncertaintyWeighting: configured for 2 tasks, the state was saved for 3")
    refused(bal, saved, r"'log_vars' has shape \(3,\), expected \(2,\)")


def test_balancer_refuses_bad_step_and_tasks() -> None:
    bal = trained(**full())[0]
    saved = trained(seed=1, steps=5, **full())[0].state_dict()
    refused(bal, {**saved, "step": -1}, r"'step' must be an integer ≥ 0, got -1")
    refused(bal, {**saved, "step": "3"}, r"'step' must be an integer")
    refused(bal, {**saved, "step": True}, r"'step' must be an integer")
    refused(bal, {**saved, "tasks": [0, 1, 2]}, r"'tasks' must be None or a list of str")
    refused(bal, {**saved, "tasks": "abc"}, r"'tasks' must be None or a list of str")
    refused(bal, {**saved, "tasks": ["a", "a", "b"]}, r"repeated name")


def test_balancer_failure_in_the_third_strategy_leaves_the_first_two() -> None:
    bal = trained(**full())[0]
    saved = trained(seed=1, steps=5, **full())[0].state_dict()
    mask = dict(saved["transforms"][0])
    mask["mask_0"] = mask["mask_0"][:, :3]
    refused(bal, {**saved, "transforms": [mask]}, r"SparseMask: state 'mask_0' has shape \(12, 3\)")


def test_balancer_assignment_failure_rolls_back_every_strategy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bal = trained(**full())[0]
    saved = trained(seed=1, steps=5, **full())[0].state_dict()

    original = T.SparseMask.load_extra_state
    calls = []

    def broken(self: Any, state: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        original(self, state)

    monkeypatch.setattr(T.SparseMask, "load_extra_state", broken)
    before = everything(bal)
    with pytest.raises(RuntimeError, match="boom"):
        bal.load_state_dict(saved)
    monkeypatch.undo()
    assert_same(before, everything(bal))


def test_balancer_non_strict() -> None:
    source = trained(**full())[0]
    saved = source.state_dict()
    # no aggregator here: its state is reported, the rest is loaded
    target = trained(seed=2, **full(aggregator=None))[0]
    keys = target.load_state_dict({**saved, "extra": 1}, strict=False)
    assert keys.unexpected_keys == ["extra", "aggregator"]
    assert keys.missing_keys == []
    assert target.step_count == 3
    assert torch.equal(target.weighting.log_vars, source.weighting.log_vars)  # type: ignore[arg-type]
    # a missing strategy key: reported with its place, the rest loaded
    weighting = dict(saved["weighting"])
    del weighting["log_vars"]
    target = trained(seed=2, **full())[0]
    kept = target.weighting.log_vars.detach().clone()  # type: ignore[union-attr]
    keys = target.load_state_dict({**saved, "weighting": weighting}, strict=False)
    assert keys.missing_keys == ["weighting.log_vars"]
    assert torch.equal(target.weighting.log_vars, kept)  # type: ignore[arg-type]
    assert_same(everything(target.aggregator), everything(source.aggregator))  # type: ignore[arg-type]
    # shapes are still checked
    refused(
        trained(2, **full(weighting=W.UncertaintyWeighting(2)))[0], saved, "shape", strict=False
    )


def test_wrapped_optimizer_refuses_a_bad_balancer_state() -> None:
    bal, _, opt = trained(**full())
    saved = trained(**full(aggregator=A.MGDA()))[2].state_dict()
    before = everything(bal)
    with pytest.raises(ValueError, match="configuration differs"):
        opt.load_state_dict(saved)
    assert_same(before, everything(bal))


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.name for e in REGISTRY])
def test_every_registry_strategy_round_trips_strictly(entry: Entry) -> None:
    def build(seed: int) -> mtlbal.Balancer:
        p = make_problem(M, seed=seed)
        where = p.trunk if entry.at == ("cut",) else "params"
        bal = mtlbal.Balancer(p.trunk, at=where, **entry.make(M))
        opt = mtlbal.wrap(torch.optim.SGD(p.params(), lr=0.05), bal)
        for k in range(4 if seed == 0 else 1):
            opt.zero_grad()
            opt.backward(p.losses())
            opt.step()
            if entry.epoch_every and (k + 1) % entry.epoch_every == 0:
                bal.epoch_end()
        return bal

    source = build(0)
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    buf.seek(0)
    target = build(0)  # same trunk (the masks of SparseMask are chosen from it)
    target.load_state_dict(torch.load(buf, weights_only=False))
    assert_same(everything(source), everything(target))
    # loading into itself changes nothing
    before = everything(target)
    target.load_state_dict(target.state_dict())
    assert_same(before, everything(target))


# ---------------------------------------------------------------------------- copy / pickle
def _mid_step(at: str) -> tuple[Problem, Any, dict[str, Tensor]]:
    """A wrapped optimizer after the forward pass (grad on), before backward."""
    p = make_problem(M)
    if at == "cut":
        bal = mtlbal.Balancer(
            p.trunk, at=p.trunk, weighting=W.UncertaintyWeighting(M), aggregator=A.MGDA()
        )
        assert bal._cut is not None
    else:
        bal = mtlbal.Balancer(
            p.trunk,
            engine="layerwise",
            weighting=W.UncertaintyWeighting(M),
            aggregator=A.PCGrad(seed=0),
        )
        assert bal._capture is not None
    opt = mtlbal.wrap(torch.optim.SGD(p.params(), lr=0.05, momentum=0.9), bal)
    for _ in range(2):
        opt.zero_grad()
        opt.backward(p.losses())
        opt.step()
    opt.zero_grad()
    losses = p.losses()
    if at == "cut":
        assert bal._cut is not None and bal._cut.captured
        assert bal._cut.captured[0][0].grad_fn is not None  # a live graph tensor
    else:
        assert bal._capture is not None and bal._capture.records
    return p, opt, losses


def _copiers() -> list[tuple[str, Callable[[Any], Any]]]:
    def via_torch(obj: Any) -> Any:
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return [
        ("deepcopy", copy.deepcopy),
        ("pickle", lambda obj: pickle.loads(pickle.dumps(obj))),
        ("torch.save", via_torch),
    ]


COPIERS = _copiers()

AT = ["cut", "params"]


@pytest.mark.parametrize("at", AT)
@pytest.mark.parametrize(("how", "copier"), COPIERS, ids=[c[0] for c in COPIERS])
def test_copy_mid_step_then_a_full_step_matches(
    at: str, how: str, copier: Callable[[Any], Any]
) -> None:
    p, opt, losses = _mid_step(at)
    for obj in (opt.balancer, opt.balancer.weighting, opt):
        copier(obj)  # each survives on its own
    p2, opt2 = copier((p, opt))
    bal2 = opt2.balancer
    # the per-step captures are not carried over: the copy records at its own forward
    if at == "cut":
        assert bal2._cut.captured == [] and bal2._cut.module is p2.trunk
    else:
        assert bal2._capture.records == []
    # the original finishes its step, the copy redoes the forward and steps: same result
    info = opt.backward(losses)
    opt.step()
    info2 = opt2.backward(p2.losses())
    opt2.step()
    assert torch.equal(info.weights, info2.weights)
    for a, b in zip(p.params(), p2.params()):
        assert torch.equal(a, b)
    assert_same(everything(opt.balancer), everything(bal2))
    # the original's hooks still capture into the original only
    p.losses()
    if at == "cut":
        assert opt.balancer._cut.captured and not bal2._cut.captured


@pytest.mark.parametrize("at", AT)
def test_copy_resumes_like_the_uninterrupted_run(at: str) -> None:
    p, opt, _ = _mid_step(at)
    p_copy, opt_copy = copy.deepcopy((p, opt))
    saved_model = [q.detach().clone() for q in p_copy.params()]
    saved = copy.deepcopy(opt_copy.state_dict())

    def run(prob: Problem, o: Any, n: int) -> list[Tensor]:
        out = []
        for _ in range(n):
            o.zero_grad()
            out.append(o.backward(prob.losses()).weights.clone())
            o.step()
        return out

    w_full = run(p_copy, opt_copy, 4)
    # rebuild from the state_dicts and continue
    p3 = make_problem(M)  # a fresh model (no hooks) with the saved weights
    with torch.no_grad():
        for q, v in zip(p3.params(), saved_model):
            q.copy_(v)
    kwargs: dict[str, Any] = {"weighting": W.UncertaintyWeighting(M)}
    if at == "cut":
        bal3 = mtlbal.Balancer(p3.trunk, at=p3.trunk, aggregator=A.MGDA(), **kwargs)
    else:
        bal3 = mtlbal.Balancer(p3.trunk, engine="layerwise", aggregator=A.PCGrad(seed=0), **kwargs)
    opt3 = mtlbal.wrap(torch.optim.SGD(p3.params(), lr=0.05, momentum=0.9), bal3)
    opt3.load_state_dict(saved)
    w_resumed = run(p3, opt3, 4)
    for a, b in zip(w_full, w_resumed):
        assert torch.equal(a, b)
    for a, b in zip(p_copy.params(), p3.params()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("at", ["cut", "params"])
@pytest.mark.parametrize(("how", "copier"), COPIERS, ids=[c[0] for c in COPIERS])
def test_every_piece_survives_a_copy_mid_step(
    at: str, how: str, copier: Callable[[Any], Any]
) -> None:
    _, opt, _ = _mid_step(at)
    bal2 = copier(opt.balancer)
    # the copy carries the state, not the step's captures
    assert_same(everything(opt.balancer), everything(bal2))
    assert_same(opt.balancer.state_dict(), bal2.state_dict())
    assert (bal2._cut.captured if at == "cut" else bal2._capture.records) == []
    opt2 = copier(opt)
    assert_same(opt.balancer.state_dict(), opt2.balancer.state_dict())
    copier(opt.balancer.weighting)


@pytest.mark.parametrize(("how", "copier"), COPIERS, ids=[c[0] for c in COPIERS])
def test_sparse_mask_survives_a_copy(how: str, copier: Callable[[Any], Any]) -> None:
    # its lookups are keyed by id(param): they must follow the copied parameters
    p = make_problem(M)
    # at a cut point: at "params" the copy has the Balancer._shared_ids problem above
    bal = mtlbal.Balancer(
        p.trunk, at=p.trunk, aggregator=A.MGDA(), transforms=T.SparseMask(ratio=0.5)
    )
    opt = mtlbal.wrap(torch.optim.Adam(p.params(), lr=0.05), bal)
    frozen_before = p.trunk[0].weight.detach().clone()
    opt.zero_grad()
    opt.backward(p.losses())
    opt.step()
    opt.zero_grad()
    losses = p.losses()  # mid-step: forward done, backward not yet
    p2, opt2 = copier((p, opt))
    mask2 = opt2.balancer.transforms[0].mask_for(p2.trunk[0].weight)
    assert mask2 is not None and not bool(mask2.all())
    opt.backward(losses)
    opt.step()
    opt2.backward(p2.losses())
    opt2.step()
    for prob, o in ((p, opt), (p2, opt2)):
        for _ in range(2):
            o.zero_grad()
            o.backward(prob.losses())
            o.step()
    for a, b in zip(p.params(), p2.params()):
        assert torch.equal(a, b)
    w = p2.trunk[0].weight.detach()
    assert torch.equal(w[~mask2], frozen_before[~mask2])  # frozen entries bitwise unchanged
    assert not torch.equal(w[mask2], frozen_before[mask2])
