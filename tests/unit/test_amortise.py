"""Amortised balancing (``Balancer(solve_every=k)``), float64.

The contract: a solve step is the step of ``solve_every=1``; a reuse step writes exactly
``∇ Σ_t w_t ℓ_t`` (stored ``w``) to the shared part and ``∇ Σ_t ℓ_t`` to the heads — the
references below are plain ``torch.autograd.grad`` calls, never the Balancer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import mtlbal
from conftest import Problem, assert_same, make_problem
from mtlbal.aggregation import MGDA, GradDrop, GradVac, UPGrad
from mtlbal.weighting import UncertaintyWeighting

K = 3


def _batch(p: Problem, step: int) -> Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(p.x.shape, generator=g, dtype=p.x.dtype)


def _grads(loss: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


@pytest.mark.parametrize("where", ["params", "cut"])
def test_solve_steps_equal_every_step_and_reuse_steps_are_one_weighted_gradient(
    where: str,
) -> None:
    p = make_problem(3, dtype=torch.float64)
    p2 = copy.deepcopy(p)  # before any Balancer hooks p's modules
    pr = copy.deepcopy(p)  # the reference: no Balancer on it
    at = "params" if where == "params" else p.trunk
    amortised = mtlbal.Balancer(p.trunk, aggregator=UPGrad(), at=at, solve_every=K)
    at2 = "params" if where == "params" else p2.trunk
    every = mtlbal.Balancer(p2.trunk, aggregator=UPGrad(), at=at2)
    stored: Tensor | None = None
    for step in range(7):  # no optimizer step: both see the same parameters and batches
        x = _batch(p, step)
        p.zero_grad()
        p2.zero_grad()
        if step % K == 0:
            info = amortised.backward(p.losses(x))
            ref = every.backward(p2.losses(x))
            assert not info.reused and info.gramian is not None
            assert_same(info.grad_weights, ref.grad_weights)
            for a, b in zip(p.grads(), p2.grads()):
                assert torch.equal(a, b)
            stored = info.grad_weights
        else:
            assert stored is not None
            # the reference: autograd on the same graph, written from the contract
            ell = torch.stack(list(pr.losses(x).values()))
            shared = _grads((stored * ell).sum(), list(pr.trunk.parameters()))
            heads = _grads(ell.sum(), list(pr.heads.parameters()))
            info = amortised.backward(p.losses(x))
            assert info.reused and info.gramian is None
            assert torch.equal(info.grad_weights, stored)
            assert torch.equal(info.weights, stored)  # equal loss weights
            for q, g in zip(p.trunk.parameters(), shared):
                torch.testing.assert_close(q.grad, g, rtol=1e-12, atol=1e-14)
            for q, g in zip(p.heads.parameters(), heads):
                torch.testing.assert_close(q.grad, g, rtol=1e-12, atol=1e-14)
        assert info.step == step + 1


def test_reuse_with_a_learnable_weighting_gives_its_parameters_the_unweighted_gradient() -> None:
    # ℓ_t = L_t/(2σ_t²) + log σ_t: the log-variances get ∇ Σ ℓ_t (+ aux) as on a solve step
    m = 3
    p = make_problem(m, dtype=torch.float64)
    uw = UncertaintyWeighting(m).double()
    bal = mtlbal.Balancer(p.trunk, weighting=uw, aggregator=MGDA(), solve_every=2)
    bal.backward(p.losses(_batch(p, 0)))
    w = bal.last_info.grad_weights  # type: ignore[union-attr]
    p.zero_grad()
    for q in bal.parameters():
        q.grad = None
    losses = p.losses(_batch(p, 1))
    ell_obj = uw.objectives(torch.stack(list(losses.values())), mtlbal.StepContext())
    aux = ell_obj.aux if ell_obj.aux is not None else torch.zeros((), dtype=torch.float64)
    own = list(bal.parameters())
    ref_own = _grads(ell_obj.objectives.sum() + aux, own)
    ref_shared = _grads((w * ell_obj.objectives).sum(), list(p.trunk.parameters()))
    info = bal.backward(losses)
    assert info.reused
    for q, g in zip(own, ref_own):
        torch.testing.assert_close(q.grad, g, rtol=1e-12, atol=1e-14)
    for q, g in zip(p.trunk.parameters(), ref_shared):
        torch.testing.assert_close(q.grad, g, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(info.weights, w * info.loss_weights)


def test_a_stateful_aggregator_advances_on_solve_steps_only() -> None:
    # GradVac's EMA targets after the solve steps 0, 3, 6 of an amortised run equal those of
    # an every-step Balancer that saw only the batches of those steps
    p = make_problem(3, dtype=torch.float64)
    p2 = copy.deepcopy(p)
    gv = GradVac(seed=0)
    bal = mtlbal.Balancer(p.trunk, aggregator=gv, solve_every=K)
    gv2 = GradVac(seed=0)
    ref = mtlbal.Balancer(p2.trunk, aggregator=gv2)
    for step in range(7):
        before = copy.deepcopy(gv.state_dict())
        info = bal.backward(p.losses(_batch(p, step)))
        if step % K:
            assert info.reused
            assert_same(gv.state_dict(), before)
        else:
            ref_info = ref.backward(p2.losses(_batch(p, step)))
            assert_same(info.grad_weights, ref_info.grad_weights)
            assert_same(gv.state_dict(), gv2.state_dict())


def _train(bal: mtlbal.Balancer, p: Problem, steps: range) -> list[Tensor]:
    opt = torch.optim.SGD(p.params(), lr=0.05)
    out = []
    for step in steps:
        p.zero_grad()
        info = bal.backward(p.losses(_batch(p, step)))
        opt.step()
        out.append(info.grad_weights)
    return out


def test_resume_mid_cycle_equals_an_uninterrupted_run() -> None:
    p = make_problem(3, dtype=torch.float64)
    p_a = copy.deepcopy(p)
    full = mtlbal.Balancer(p.trunk, aggregator=UPGrad(), solve_every=K)
    a = mtlbal.Balancer(p_a.trunk, aggregator=UPGrad(), solve_every=K)
    weights_full = _train(full, p, range(8))
    first = _train(a, p_a, range(4))  # stopped after a reuse step, mid-cycle
    state = a.state_dict()
    assert state["amortise"]["solved_at"] == 3 and state["amortise"]["tasks"] is not None
    p_b = copy.deepcopy(p_a)
    b = mtlbal.Balancer(p_b.trunk, aggregator=UPGrad(), solve_every=K)
    b.load_state_dict(copy.deepcopy(state))
    rest = _train(b, p_b, range(4, 8))
    for x, y in zip(first + rest, weights_full):
        assert torch.equal(x, y)
    for q, r in zip(p_b.params(), p.params()):
        assert torch.equal(q, r)


def test_state_dict_is_checked() -> None:
    p = make_problem(2, dtype=torch.float64)
    bal = mtlbal.Balancer(p.trunk, aggregator=UPGrad(), solve_every=K)
    bal.backward(p.losses())
    state = bal.state_dict()
    plain = mtlbal.Balancer(make_problem(2).trunk, aggregator=UPGrad())
    with pytest.raises(ValueError, match="unexpected key 'amortise'"):
        plain.load_state_dict(state)
    fresh = mtlbal.Balancer(make_problem(2).trunk, aggregator=UPGrad(), solve_every=K)
    with pytest.raises(ValueError, match="missing key 'amortise'"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "amortise"})
    bad = copy.deepcopy(state)
    bad["amortise"]["weights"] = torch.ones(3, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"amortise.weights' must be a floating tensor of shape \[2\]"
    ):
        fresh.load_state_dict(bad)
    assert fresh.step_count == 0 and fresh._amortiser.weights is None  # type: ignore[union-attr]
    fresh.load_state_dict(state)
    assert torch.equal(fresh._amortiser.weights, bal._amortiser.weights)  # type: ignore[union-attr,arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"solve_every": 0}, "solve_every must be a positive int"),
        ({"solve_every": True}, "solve_every must be a positive int"),
        ({"solve_every": 2}, "needs a Gramian aggregator"),
        ({"solve_every": 2, "aggregator": GradDrop(seed=0)}, "GradDrop gives a direction"),
        (
            {"solve_every": 2, "aggregator": UPGrad(), "accumulate": 2},
            "with gradient accumulation",
        ),
        (
            {
                "solve_every": 2,
                "aggregator": UPGrad(),
                "transforms": mtlbal.transforms.SparseMask(ratio=0.5),
            },
            "with gradient transforms",
        ),
    ],
)
def test_refused_configurations(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mtlbal.Balancer(make_problem(2).trunk, **kwargs)  # type: ignore[arg-type]


def test_missing_tasks_force_a_solve_and_restart_the_schedule() -> None:
    p = make_problem(3, dtype=torch.float64)
    bal = mtlbal.Balancer(
        p.trunk, aggregator=UPGrad(), solve_every=K, tasks=("task0", "task1", "task2")
    )
    pattern = [None, None, "task1", None, None, None, None]
    reused = []
    for step, absent in enumerate(pattern):
        losses = p.losses(_batch(p, step))
        if absent is not None:
            del losses[absent]
        info = bal.backward(losses)
        reused.append(info.reused)
        assert info.grad_weights is not None and info.grad_weights.shape == (len(losses),)
    # solve at 0; reuse at 1; step 2 lacks a task: solve; step 3 has all again: solve; then
    # reuse at 4 and 5, solve at 6
    assert reused == [False, True, False, False, True, True, False]


def test_a_nonfinite_loss_on_a_reuse_step_is_refused_and_changes_nothing() -> None:
    p = make_problem(2, dtype=torch.float64)
    bal = mtlbal.Balancer(p.trunk, aggregator=UPGrad(), solve_every=K)
    bal.backward(p.losses())
    state = copy.deepcopy(bal.state_dict())
    p.zero_grad()
    losses = p.losses()
    losses["task1"] = losses["task1"] * float("nan")
    with pytest.raises(ValueError, match="non-finite loss for task"):
        bal.backward(losses)
    assert all(q.grad is None for q in p.params())
    assert_same(bal.state_dict(), state)
    skipping = mtlbal.Balancer(
        p.trunk,
        aggregator=UPGrad(),
        solve_every=K,
        nonfinite="skip",
    )
    skipping.load_state_dict(state)
    assert skipping.backward(losses).skipped
    assert_same(skipping.state_dict(), state)


def test_repr_and_no_solver_call_on_reuse_steps() -> None:
    calls = []

    class Counting(UPGrad):
        def _weights(self, gramian: Tensor) -> Tensor:
            calls.append(gramian.shape[0])
            return super()._weights(gramian)

    p = make_problem(2, dtype=torch.float64)
    bal = mtlbal.Balancer(p.trunk, aggregator=Counting(), solve_every=5)
    assert "solve_every=5" in repr(bal)
    for step in range(11):
        bal.backward(p.losses(_batch(p, step)))
    assert len(calls) == 3  # steps 0, 5, 10
