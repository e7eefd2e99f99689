"""The Balancer's contract: equal-weight equivalence, the step info, bad input, hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtlbal
from conftest import Problem, make_problem
from mtlbal.aggregation import MGDA, PCGrad
from mtlbal.weighting import GradNorm, UncertaintyWeighting


def _plain_grads(p):  # type: ignore[no-untyped-def]
    p.zero_grad()
    sum(p.losses().values()).backward()
    return p.grads()


def test_equal_weights_bitwise_identical_at_params() -> None:
    p = make_problem(3)
    ref = _plain_grads(p)
    p.zero_grad()
    mtlbal.Balancer(p.trunk).backward(p.losses())
    for a, b in zip(ref, p.grads()):
        assert torch.equal(a, b)


def test_equal_weights_sequence_input_bitwise() -> None:
    p = make_problem(2)
    ref = _plain_grads(p)
    p.zero_grad()
    mtlbal.Balancer(p.trunk).backward(list(p.losses().values()))
    for a, b in zip(ref, p.grads()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_weights_at_cut_point(dtype: torch.dtype) -> None:
    # with nothing to compute at the cut the output is not detached: one ordinary backward,
    # bitwise identical (the issue asks for "within float rounding")
    p = make_problem(3, dtype=dtype)
    ref = _plain_grads(p)
    bal = mtlbal.Balancer(p.trunk, at=p.trunk)
    p.zero_grad()
    bal.backward(p.losses())
    for a, b in zip(ref, p.grads()):
        assert torch.equal(a, b)


def test_cut_point_runs_a_single_backward_call() -> None:
    # DDP arms its reducer for exactly one backward per forward: the cut path must make one
    p = make_problem(3)
    bal = mtlbal.Balancer(p.trunk, at=p.trunk, aggregator=MGDA())
    calls = 0
    original = torch.autograd.backward

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    torch.autograd.backward = counting
    try:
        bal.backward(p.losses())
    finally:
        torch.autograd.backward = original
    assert calls == 1


def test_cut_point_with_aggregator_of_ones_equals_plain() -> None:
    # diagnostics=True forms per-task gradients at the cut and applies w = 1: same gradient
    p = make_problem(3, dtype=torch.float64)
    ref = _plain_grads(p)
    bal = mtlbal.Balancer(p.trunk, at=p.trunk, diagnostics=True)
    p.zero_grad()
    info = bal.backward(p.losses())
    for a, b in zip(ref, p.grads()):
        torch.testing.assert_close(a, b)
    assert info.cosines is not None and info.cosines.shape == (3, 3)
    assert info.grad_norms is not None and (info.grad_norms > 0).all()


def test_params_diagnostics_equal_plain_and_stats_are_right() -> None:
    p = make_problem(3, dtype=torch.float64)
    ref = _plain_grads(p)
    bal = mtlbal.Balancer(p.trunk, diagnostics=True)
    p.zero_grad()
    info = bal.backward(p.losses())
    for a, b in zip(ref, p.grads()):
        torch.testing.assert_close(a, b)
    # independent per-task gradients of the shared parameters
    losses = p.losses()
    rows = []
    for v in losses.values():
        gs = torch.autograd.grad(v, list(p.trunk.parameters()), retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in gs]))
    J = torch.stack(rows)
    norms = J.norm(dim=1)
    torch.testing.assert_close(info.grad_norms, norms)
    cos = (J @ J.T) / (norms[:, None] * norms[None, :])
    torch.testing.assert_close(info.cosines, cos)
    iu = torch.triu_indices(3, 3, 1)
    expected_conflict = (cos[iu[0], iu[1]] < 0).double().mean()
    torch.testing.assert_close(info.conflict, expected_conflict)


def test_info_contents_and_device() -> None:
    p = make_problem(2)
    info = mtlbal.Balancer(p.trunk, aggregator=MGDA()).backward(p.losses())
    assert info.tasks == ("task0", "task1")
    assert info.losses.shape == (2,) and not info.losses.requires_grad
    assert info.grad_weights is not None and info.grad_weights.shape == (2,)
    assert info.step == 1 and not info.skipped
    assert info.losses.device == p.x.device


def test_heads_receive_gradient_of_weighted_losses_under_gradient_method() -> None:
    p = make_problem(3, dtype=torch.float64)
    uw = UncertaintyWeighting(3)
    bal = mtlbal.Balancer(p.trunk, weighting=uw, aggregator=MGDA())
    p.zero_grad()
    bal.backward(p.losses())
    got = [h.weight.grad.clone() for h in p.heads]
    p.zero_grad()
    losses = p.losses()
    a = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    total = sum(a[i] * v for i, v in enumerate(losses.values()))
    total.backward()
    for h, g in zip(p.heads, got):
        torch.testing.assert_close(h.weight.grad, g)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("at", ["params", "cut"])
def test_nan_loss_raises_naming_task_and_leaves_grad_untouched(at: str) -> None:
    p = make_problem(3)
    bal = mtlbal.Balancer(p.trunk, at="params" if at == "params" else p.trunk, aggregator=MGDA())
    for q in p.params():
        q.grad = torch.full_like(q, 7.0)
    losses = p.losses()
    losses["task1"] = losses["task1"] * float("nan")
    with pytest.raises(ValueError, match="task1"):
        bal.backward(losses)
    for q in p.params():
        assert torch.equal(q.grad, torch.full_like(q, 7.0))
    assert bal.step_count == 0


def test_inf_loss_raises() -> None:
    p = make_problem(2)
    losses = p.losses()
    losses["task0"] = losses["task0"] + float("inf")
    with pytest.raises(ValueError, match=r"non-finite.*task0"):
        mtlbal.Balancer(p.trunk).backward(losses)


def test_skip_policy_skips_step_without_state_update() -> None:
    p = make_problem(2)
    gn = GradNorm(2)
    bal = mtlbal.Balancer(p.trunk, weighting=gn, nonfinite="skip")
    losses = p.losses()
    losses["task0"] = losses["task0"] * float("nan")
    info = bal.backward(losses)
    assert info.skipped
    assert bal.step_count == 0
    assert gn.initial_losses is None  # no state update on a skipped step
    assert all(q.grad is None for q in p.params())
    info = bal.backward(p.losses())
    assert not info.skipped and bal.step_count == 1


def test_nonfinite_off_does_not_check() -> None:
    p = make_problem(2)
    losses = p.losses()
    losses["task0"] = losses["task0"] * float("nan")
    info = mtlbal.Balancer(p.trunk, nonfinite="off").backward(losses)
    assert torch.isnan(p.trunk[0].weight.grad).all()
    assert not info.skipped


def test_non_scalar_loss() -> None:
    p = make_problem(2)
    z = p.trunk(p.x)
    with pytest.raises(ValueError, match=r"task 'b'.*scalar"):
        mtlbal.Balancer(p.trunk).backward({"a": z.mean(), "b": z.pow(2).mean(0)})


def test_no_losses() -> None:
    p = make_problem(2)
    with pytest.raises(ValueError, match="no losses"):
        mtlbal.Balancer(p.trunk).backward({})


def test_not_a_mapping_or_sequence() -> None:
    p = make_problem(2)
    with pytest.raises(TypeError, match="dict"):
        mtlbal.Balancer(p.trunk).backward(3.0)  # type: ignore[arg-type]


def test_detached_loss() -> None:
    p = make_problem(2)
    losses = p.losses()
    losses["task1"] = losses["task1"].detach()
    with pytest.raises(ValueError, match=r"task1.*does not require grad"):
        mtlbal.Balancer(p.trunk).backward(losses)


@pytest.mark.parametrize("at", ["params", "cut"])
def test_task_not_connected_to_shared_part(at: str) -> None:
    p = make_problem(2)
    side = nn.Linear(6, 1)
    bal = mtlbal.Balancer(p.trunk, at="params" if at == "params" else p.trunk, aggregator=PCGrad())
    losses = p.losses()
    losses["orphan"] = side(p.x).pow(2).mean()
    for q in p.params():
        q.grad = None
    with pytest.raises(ValueError, match="'orphan' does not depend on"):
        bal.backward(losses)
    assert all(q.grad is None for q in p.params())


def test_wrong_number_of_tasks() -> None:
    p = make_problem(3)
    bal = mtlbal.Balancer(p.trunk, weighting=UncertaintyWeighting(2))
    with pytest.raises(ValueError, match="built for 2 tasks, got 3"):
        bal.backward(p.losses())


def test_task_set_change_with_stateful_strategy() -> None:
    p = make_problem(3)
    bal = mtlbal.Balancer(p.trunk, weighting=GradNorm(3))
    bal.backward(p.losses())
    losses = p.losses()
    renamed = {("x" if k == "task2" else k): v for k, v in losses.items()}
    with pytest.raises(ValueError, match="task set changed"):
        bal.backward(renamed)


def test_task_set_change_is_fine_for_stateless() -> None:
    p = make_problem(3)
    bal = mtlbal.Balancer(p.trunk, aggregator=MGDA())
    bal.backward(p.losses())
    p.zero_grad()
    losses = p.losses()
    del losses["task2"]
    info = bal.backward(losses)
    assert info.weights.shape == (2,)


def test_bad_arguments() -> None:
    p = make_problem(2)
    with pytest.raises(ValueError, match="nonfinite"):
        mtlbal.Balancer(p.trunk, nonfinite="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at must be"):
        mtlbal.Balancer(p.trunk, at="representation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no parameter"):
        mtlbal.Balancer(nn.ReLU())


def test_cut_point_without_forward_between_steps() -> None:
    p = make_problem(2)
    bal = mtlbal.Balancer(p.trunk, at=p.trunk, aggregator=MGDA())
    losses = p.losses()
    bal.backward(losses)
    with pytest.raises(ValueError, match="captured"):
        bal.backward({k: v * 1.0 for k, v in losses.items()})


# ---------------------------------------------------------------- hooks
def test_register_hook_and_remove() -> None:
    p = make_problem(2)
    bal = mtlbal.Balancer(p.trunk, at=p.trunk)
    seen: list[int] = []
    handle = bal.register_hook(lambda b, info: seen.append(info.step))
    bal.backward(p.losses())
    handle.remove()
    bal.backward(p.losses())
    assert seen == [1]
    # remove(): the cut point's forward hook is gone, the model's output is no longer replaced
    bal.remove()
    z = p.trunk(p.x)
    assert z.grad_fn is not None


def test_parameters_lists_learnable_strategy_parameters() -> None:
    p = make_problem(2)
    uw = UncertaintyWeighting(2)
    bal = mtlbal.Balancer(p.trunk, weighting=uw)
    assert [id(q) for q in bal.parameters()] == [id(uw.log_vars)]
    assert list(mtlbal.Balancer(p.trunk).parameters()) == []


def test_shared_as_parameter_list_and_several_modules() -> None:
    p = make_problem(2, dtype=torch.float64)
    ref_bal = mtlbal.Balancer(p.trunk, aggregator=MGDA())
    p.zero_grad()
    ref_bal.backward(p.losses())
    ref = p.grads()
    for shared in (list(p.trunk.parameters()), [p.trunk[0], p.trunk[2]]):
        p.zero_grad()
        mtlbal.Balancer(shared, aggregator=MGDA()).backward(p.losses())
        for a, b in zip(ref, p.grads()):
            torch.testing.assert_close(a, b)


def test_chunked_engine_equals_unchunked() -> None:
    p = make_problem(5, dtype=torch.float64)
    p.zero_grad()
    mtlbal.Balancer(p.trunk, aggregator=MGDA()).backward(p.losses())
    ref = p.grads()
    p.zero_grad()
    mtlbal.Balancer(p.trunk, aggregator=MGDA(), chunk_size=2).backward(p.losses())
    for a, b in zip(ref, p.grads()):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- hooks' lifetime
def _trunk_trains(p: Problem) -> bool:
    """Whether a plain backward through the trunk's output reaches the trunk's parameters."""
    for q in p.params():
        q.grad = None
    sum(p.losses().values()).backward()  # type: ignore[union-attr]
    return all(q.grad is not None for q in p.trunk.parameters())


def test_failed_construction_leaves_no_hook() -> None:
    p = make_problem(2)
    branch = p.trunk[0]
    taken = mtlbal.Balancer(p.trunk, at=p.trunk[2], aggregator=mtlbal.aggregation.MGDA())
    # the second capture (a modality branch on a module already used as a cut point) fails
    # after the cut point's hook was registered: every hook it registered is removed again
    with pytest.raises(ValueError, match="already the cut point"):
        mtlbal.Balancer(
            p.trunk, at=p.trunk, aggregator=mtlbal.aggregation.MGDA(), branches=[branch, p.trunk[2]]
        )
    taken.remove()
    assert _trunk_trains(p)
    with pytest.raises(ValueError, match="cannot also be the cut point"):
        mtlbal.Balancer(
            p.trunk, at=p.trunk, aggregator=mtlbal.aggregation.MGDA(), branches=[p.trunk, branch]
        )
    assert _trunk_trains(p)


def test_second_balancer_on_the_same_cut_point_is_refused() -> None:
    p = make_problem(2)
    first = mtlbal.Balancer(p.trunk, at=p.trunk, aggregator=mtlbal.aggregation.MGDA())
    with pytest.raises(ValueError, match="already the cut point of another Balancer"):
        mtlbal.Balancer(p.trunk, at=p.trunk, aggregator=mtlbal.aggregation.UPGrad())
    first.remove()
    second = mtlbal.Balancer(p.trunk, at=p.trunk, aggregator=mtlbal.aggregation.UPGrad())
    second.backward(p.losses())
    assert all(q.grad is not None for q in p.trunk.parameters())


def test_a_collected_balancer_removes_its_hooks() -> None:
    import gc

    p = make_problem(2)
    b = mtlbal.Balancer(p.trunk, at=p.trunk, aggregator=mtlbal.aggregation.MGDA())
    del b
    gc.collect()
    # the detaching forward hook is gone: a plain backward trains the trunk again
    assert _trunk_trains(p)
    mtlbal.Balancer(p.trunk, at=p.trunk, aggregator=mtlbal.aggregation.MGDA())  # not refused


def test_dict_order_does_not_matter_after_the_first_step() -> None:
    p, q = make_problem(3), make_problem(3)
    a = mtlbal.Balancer(p.trunk, weighting=mtlbal.weighting.UncertaintyWeighting(3))
    b = mtlbal.Balancer(q.trunk, weighting=mtlbal.weighting.UncertaintyWeighting(3))
    a.backward(p.losses())
    b.backward(q.losses())
    info_a = a.backward(p.losses())
    info_b = b.backward(dict(reversed(list(q.losses().items()))))
    assert info_a.tasks == info_b.tasks == ("task0", "task1", "task2")
    torch.testing.assert_close(info_a.weights, info_b.weights, rtol=0, atol=0)
    for x, y in zip(p.params(), q.params()):
        torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)
