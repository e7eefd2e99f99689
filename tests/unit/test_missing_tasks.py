"""Missing tasks: a step in which some tasks have no loss (no labels in the batch).

For every registered strategy that supports it, a missing-task step must equal the step of the
same strategy built for the present tasks only, given the present tasks' slice of the state
(the reference is a second Balancer on a copy of the model: nothing of the code under test
computes it), and must leave the absent tasks' state bitwise as it was. Strategies that do not
support it refuse the step before anything changes. GradNorm (renormalisation over every task)
is checked against its equation in float64.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import mtlbal
from conftest import Problem, assert_same, make_problem
from mtlbal import aggregation as A
from mtlbal import weighting as W
from mtlbal.logging import info_to_dict
from registry import REGISTRY, Entry, feed_validation

M = 3
PRESENT = (0, 2)  # task1 has no labels in the missing-task steps
ABSENT = (1,)
NAMES = tuple(f"task{i}" for i in range(M))

SLICE = [(e, at) for e in REGISTRY if e.missing == "slice" for at in e.at]
REFUSE = [e for e in REGISTRY if e.missing == "refuse"]
SUPPORTED = [e for e in REGISTRY if e.missing != "refuse"]


def _build(entry: Entry, m: int, p: Problem, at: str) -> tuple[mtlbal.Balancer, Any]:
    where = "params" if at == "params" else p.trunk
    bal = mtlbal.Balancer(p.trunk, at=where, **entry.make(m))
    opt = mtlbal.wrap(torch.optim.SGD(p.params(), lr=0.05), bal)
    return bal, opt


def _warm_up(entry: Entry, p: Problem, opt: Any, steps: int = 4) -> None:
    for k in range(steps):
        opt.zero_grad()
        opt.backward(p.losses())
        opt.step()
        feed_validation(entry, opt.balancer, p.losses, k)
        if entry.epoch_every and (k + 1) % entry.epoch_every == 0:
            opt.balancer.epoch_end()


def _tensors(mod: nn.Module) -> dict[str, Tensor]:
    out = {f"buffer:{n}": b for n, b in mod._buffers.items() if b is not None}
    out.update({f"param:{n}": q.detach() for n, q in mod._parameters.items() if q is not None})
    return out


def _slice(x: Tensor, idx: list[int]) -> Tensor:
    """The present tasks' entries of a per-task tensor ([m] or [m, m]); others as they are."""
    if x.dim() >= 1 and x.shape[0] == M:
        x = x[idx]
        if x.dim() >= 2 and x.shape[1] == M:
            x = x[:, idx]
    return x


def _load_sliced(src: nn.Module, dst: nn.Module, idx: list[int]) -> None:
    for n, b in src._buffers.items():
        if b is not None:
            setattr(dst, n, _slice(b, idx).clone())
    for n, q in src._parameters.items():
        if q is not None:
            getattr(dst, n).data = _slice(q.detach(), idx).clone()
    gen = getattr(src, "_generator", None)
    if isinstance(gen, torch.Generator):
        dst._generator.set_state(gen.get_state())  # type: ignore[union-attr]


def _missing_losses(p: Problem) -> dict[str, Tensor]:
    losses = p.losses()
    for i in ABSENT:
        del losses[f"task{i}"]
    return losses


@pytest.mark.parametrize(("entry", "at"), SLICE, ids=[f"{e.name}@{at}" for e, at in SLICE])
def test_missing_step_equals_present_only_strategy(entry: Entry, at: str) -> None:
    p = make_problem(M, dtype=torch.float64)
    bal, opt = _build(entry, M, p, at)
    _warm_up(entry, p, opt)
    # the reference: the strategy built for the present tasks, on a copy of the model, given
    # the present tasks' slice of the state
    q = make_problem(M, dtype=torch.float64)  # not a deepcopy: that would copy p's hooks
    with torch.no_grad():
        for a, b in zip(q.params(), p.params()):
            a.copy_(b)
    ref, _ = _build(entry, len(PRESENT), q, at)
    idx = list(PRESENT)
    for s_main, s_ref in zip(bal.strategies, ref.strategies):
        _load_sliced(s_main, s_ref, idx)
    ref.step_count = bal.step_count
    before = [{k: v.clone() for k, v in _tensors(s).items()} for s in bal.strategies]

    opt.zero_grad()
    info = bal.backward(_missing_losses(p))
    q.zero_grad()
    for s in ref.strategies:
        for prm in s.parameters():
            prm.grad = None
    ref_losses = q.losses()
    rinfo = ref.backward({f"task{i}": ref_losses[f"task{i}"] for i in PRESENT})

    assert info.tasks == tuple(f"task{i}" for i in PRESENT)
    assert info.missing == tuple(f"task{i}" for i in ABSENT)
    tight = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(info.weights, rinfo.weights, **tight)
    for a, b in zip([*p.trunk.parameters()], [*q.trunk.parameters()]):
        torch.testing.assert_close(a.grad, b.grad, **tight)
    for t in range(M):
        for a, b in zip(p.heads[t].parameters(), q.heads[t].parameters()):
            if t in ABSENT:
                assert a.grad is None, "an absent task's head gets no gradient"
            else:
                torch.testing.assert_close(a.grad, b.grad, **tight)
    # state: the present entries as the reference's, the absent ones bitwise unchanged
    for s_main, s_ref, prev in zip(bal.strategies, ref.strategies, before):
        now, theirs = _tensors(s_main), _tensors(s_ref)
        for key, value in now.items():
            old = prev.get(key)
            if key not in theirs or old is None or old.shape != value.shape:
                continue  # state only a missing-task step creates: checked per strategy below
            per_task = value.dim() >= 1 and value.shape[0] == M
            if per_task:
                torch.testing.assert_close(_slice(value, idx), theirs[key], **tight)
                for i in ABSENT:
                    assert torch.equal(value[i].isnan(), old[i].isnan())
                    assert torch.equal(value[i].nan_to_num(), old[i].nan_to_num()), key
                    if value.dim() == 2 and value.shape[1] == M:
                        assert torch.equal(value[:, i], old[:, i]), key
            else:
                torch.testing.assert_close(value, theirs[key], **tight)
        for name, prm in s_main.named_parameters(recurse=False):
            if prm.grad is not None and prm.shape[0] == M:
                ref_grad = getattr(s_ref, name).grad
                torch.testing.assert_close(prm.grad[idx], ref_grad, **tight)
                assert torch.equal(prm.grad[list(ABSENT)], torch.zeros(len(ABSENT)).double())


def test_registry_declarations_match_the_strategies() -> None:
    for entry in REGISTRY:
        strategies = [v for v in entry.make(M).values() if isinstance(v, nn.Module)]
        supported = all(s.handles_missing_tasks for s in strategies)
        assert supported == (entry.missing != "refuse"), entry.name


@pytest.mark.parametrize("entry", REFUSE, ids=[e.name for e in REFUSE])
def test_unsupported_refuses_before_anything_changes(entry: Entry) -> None:
    p = make_problem(M)
    if entry.extras.get("positive_losses"):
        pass  # the problem's losses are ≥ 0.1 · (t + 1) > 0 already
    bal, opt = _build(entry, M, p, entry.at[0])
    _warm_up(entry, p, opt)
    opt.zero_grad()
    bal.backward(p.losses())  # .grad filled: the refusal must leave it as it is
    grads = p.grads()
    strategy_grads = [None if q.grad is None else q.grad.clone() for q in bal.parameters()]
    state = copy.deepcopy(bal.state_dict())
    counter, last = bal.step_count, bal.last_info
    refusers = [type(s).__name__ for s in bal.strategies if not s.handles_missing_tasks]
    with pytest.raises(ValueError, match=rf"{refusers[0]} does not support .* 'task1'"):
        bal.backward(_missing_losses(p))
    assert bal.step_count == counter and bal.last_info is last
    for a, b in zip(grads, p.grads()):
        assert torch.equal(a, b)
    for q, g in zip(bal.parameters(), strategy_grads):
        assert (q.grad is None and g is None) or torch.equal(q.grad, g)
    assert_same(state, bal.state_dict())
    # the graph was not consumed: the same losses, complete, still make a step
    info = bal.backward(p.losses())
    assert info.missing == ()


def _pattern(k: int) -> tuple[int, ...]:
    return ((0, 1, 2), (0, 2), (1, 2), (0, 1, 2), (2,), (0, 1))[k % 6]


def _run(entry: Entry, p: Problem, opt: Any, start: int, stop: int) -> list[Tensor]:
    out = []
    for k in range(start, stop):
        opt.zero_grad()
        losses = p.losses()
        info = opt.backward({f"task{i}": losses[f"task{i}"] for i in _pattern(k)})
        opt.step()
        out.append(info.weights.detach().clone())
        if entry.epoch_every and (k + 1) % entry.epoch_every == 0:
            opt.balancer.epoch_end()
    return out


@pytest.mark.parametrize("entry", SUPPORTED, ids=[e.name for e in SUPPORTED])
def test_resume_across_missing_steps(entry: Entry) -> None:
    k, n = 3, 7
    p = make_problem(M)
    _, opt = _build(entry, M, p, entry.at[0])
    _run(entry, p, opt, 0, 1)  # the task set is learnt from a full first step
    w_full = _run(entry, p, opt, 1, n)
    final = [q.detach().clone() for q in p.params()]

    p1 = make_problem(M)
    _, opt1 = _build(entry, M, p1, entry.at[0])
    w_a = _run(entry, p1, opt1, 0, 1)[1:] + _run(entry, p1, opt1, 1, k)
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    p2 = make_problem(M)
    with torch.no_grad():
        for a, b in zip(p2.params(), p1.params()):
            a.copy_(b)
    bal2, opt2 = _build(entry, M, p2, entry.at[0])
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    assert bal2.tasks == NAMES
    w_b = _run(entry, p2, opt2, k, n)
    for a, b in zip(w_full, w_a + w_b):
        assert torch.equal(a, b)
    for a, b in zip(final, p2.params()):
        assert torch.equal(a, b.detach())


# ---------------------------------------------------------------------------- the inputs


def test_none_entries_and_declared_tasks() -> None:
    p = make_problem(M)
    # declared: the very first step may lack a task
    bal = mtlbal.Balancer(p.trunk, aggregator=A.UPGrad(), tasks=NAMES)
    losses = p.losses()
    info = bal.backward({"task0": losses["task0"], "task1": None, "task2": losses["task2"]})
    assert info.tasks == ("task0", "task2") and info.missing == ("task1",)
    assert bal.tasks == NAMES
    # a sequence with None, once the count is known
    seq = mtlbal.Balancer(p.trunk, weighting=W.UncertaintyWeighting(M))
    losses = list(p.losses().values())
    seq.backward(losses)
    losses = list(p.losses().values())
    info = seq.backward([losses[0], None, losses[2]])
    assert info.tasks == ("0", "2") and info.missing == ("1",)
    assert info.weights.shape == (2,)


def test_input_errors() -> None:
    p = make_problem(M)
    bal = mtlbal.Balancer(p.trunk, weighting=W.UncertaintyWeighting(M))
    bal.backward(p.losses())
    losses = p.losses()
    with pytest.raises(ValueError, match="every task of this step is absent"):
        bal.backward({n: None for n in losses})
    with pytest.raises(ValueError, match=r"unknown task\(s\) 'other'"):
        bal.backward({"task0": losses["task0"], "other": losses["task1"]})
    with pytest.raises(ValueError, match="task names must be unique"):
        mtlbal.Balancer(p.trunk, tasks=("a", "a"))
    with pytest.raises(ValueError, match="built for 3 tasks, tasks= names 2"):
        mtlbal.Balancer(p.trunk, weighting=W.UncertaintyWeighting(M), tasks=("a", "b"))
    with pytest.raises(TypeError, match="sequence of task names"):
        mtlbal.Balancer(p.trunk, tasks="abc")
    # declared tasks: another name is refused even for strategies without state
    eq = mtlbal.Balancer(p.trunk, tasks=NAMES)
    with pytest.raises(ValueError, match=r"declared with Balancer\(tasks=\.\.\.\)"):
        eq.backward({"task0": losses["task0"], "x": losses["task1"]})
    # the first step of an undeclared run with a missing task: the hint says what to do
    fresh = mtlbal.Balancer(p.trunk, weighting=W.UncertaintyWeighting(M))
    with pytest.raises(ValueError, match=r"declare every task with Balancer\(tasks=\.\.\.\)"):
        fresh.backward({"task0": losses["task0"], "task2": losses["task2"]})


def test_logging_has_no_entry_for_absent_tasks() -> None:
    p = make_problem(M)
    bal = mtlbal.Balancer(p.trunk, aggregator=A.MGDA(), tasks=NAMES)
    info = bal.backward(_missing_losses(p))
    scalars = info_to_dict(info)
    assert not any("task1" in k for k in scalars)
    assert {"mtlbal/weight/task0", "mtlbal/weight/task2", "mtlbal/cosine/task0~task2"} <= set(
        scalars
    )


def test_context_fields() -> None:
    seen: list[Any] = []

    class Spy(A.UPGrad):
        supports_missing_tasks = True

        def solve(self, gramian: Tensor, ctx: Any) -> Tensor:
            seen.append((ctx.tasks, ctx.present, ctx.all_tasks, tuple(ctx.losses.shape)))
            return super().solve(gramian, ctx)

    p = make_problem(M)
    bal = mtlbal.Balancer(p.trunk, aggregator=Spy())
    bal.backward(p.losses())
    bal.backward(_missing_losses(p))
    assert seen == [
        (NAMES, None, NAMES, (3,)),
        (("task0", "task2"), (0, 2), NAMES, (2,)),
    ]


# ---------------------------------------------------------------------------- per strategy


def test_uncertainty_absent_log_variance_gets_exactly_zero() -> None:
    p = make_problem(M, dtype=torch.float64)
    uw = W.UncertaintyWeighting(M).double()
    bal = mtlbal.Balancer(p.trunk, weighting=uw, tasks=NAMES)
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.3, -0.2, 0.1]))
    losses = _missing_losses(p)
    bal.backward(losses)
    assert uw.log_vars.grad is not None
    assert torch.equal(uw.log_vars.grad[1], torch.zeros((), dtype=torch.float64))
    # ∂/∂s_t of a_t e^{−s_t} L_t + b s_t = b − a_t e^{−s_t} L_t (a = b = ½ for regression)
    for i in PRESENT:
        L = float(losses[f"task{i}"].detach())
        s = float(uw.log_vars[i].detach())
        expected = 0.5 - 0.5 * torch.exp(torch.tensor(-s, dtype=torch.float64)) * L
        torch.testing.assert_close(uw.log_vars.grad[i], expected, rtol=1e-12, atol=1e-14)


def test_dwa_counts_only_the_steps_a_task_had() -> None:
    dwa = W.DWA(M)
    p = make_problem(M, dtype=torch.float64)
    bal = mtlbal.Balancer(p.trunk, weighting=dwa)
    sums = torch.zeros(M, dtype=torch.float64)
    counts = torch.zeros(M, dtype=torch.float64)
    for present in ((0, 1, 2), (0, 2), (2,)):
        losses = p.losses()
        bal.backward({f"task{i}": losses[f"task{i}"] for i in present})
        for i in present:
            sums[i] += float(losses[f"task{i}"].detach())
            counts[i] += 1
    assert dwa.epoch_absent is not None and dwa.epoch_absent.tolist() == [1, 2, 0]
    bal.epoch_end()
    assert dwa.prev_mean is not None
    torch.testing.assert_close(dwa.prev_mean, sums / counts, rtol=1e-12, atol=0)
    assert dwa.epoch_absent is None
    # an epoch without task1: its mean is carried forward (rate 1)
    losses = p.losses()
    bal.backward({"task0": losses["task0"], "task2": losses["task2"]})
    bal.epoch_end()
    assert dwa.prev_mean is not None and dwa.prev2_mean is not None
    assert dwa.prev_mean[1] == dwa.prev2_mean[1]
    # the next missing-task step: DWA over the present tasks, m' · softmax(r_P / τ)
    r = dwa.prev_mean / dwa.prev2_mean
    losses = p.losses()
    info = bal.backward({"task1": losses["task1"], "task2": losses["task2"]})
    expected = 2 * torch.softmax(r[[1, 2]] / 2.0, dim=0)
    torch.testing.assert_close(info.weights, expected.to(info.weights.dtype), rtol=1e-12, atol=0)


def test_dwa_first_epoch_without_a_task_gives_a_neutral_rate() -> None:
    dwa = W.DWA()
    p = make_problem(M, dtype=torch.float64)
    bal = mtlbal.Balancer(p.trunk, weighting=dwa, tasks=NAMES)
    for _ in range(2):  # two epochs in which task1 never has a loss
        losses = p.losses()
        bal.backward({"task0": losses["task0"], "task2": losses["task2"]})
        bal.epoch_end()
    assert dwa.prev_mean is not None and bool(dwa.prev_mean[1].isnan())
    info = bal.backward(p.losses())
    assert torch.isfinite(info.weights).all()


def _layer_norms(p: Problem, losses: dict[str, Tensor], layer: list[Tensor]) -> Tensor:
    norms = []
    for v in losses.values():
        gs = torch.autograd.grad(v, layer, retain_graph=True)
        norms.append(torch.sqrt(sum((g * g).sum() for g in gs)))
    return torch.stack(norms)


def test_gradnorm_missing_step_equation() -> None:
    """GradNorm on the present tasks, from the paper's equations in float64, with the full
    weight vector renormalised before the step and only the present ones after."""
    p = make_problem(M, dtype=torch.float64)
    gn = W.GradNorm(M, alpha=1.5).double()
    bal = mtlbal.Balancer(p.trunk, weighting=gn)
    opt = torch.optim.SGD([*p.params(), *bal.parameters()], lr=0.05)
    first = p.losses()
    L0 = torch.stack([v.detach() for v in first.values()])
    opt.zero_grad()
    bal.backward(first)
    opt.step()  # the weights move; the renormalisation is deferred to the next step
    opt.zero_grad()
    w_before = gn.weights.detach().clone().clamp_min(gn.min_weight)
    w_norm = w_before * (M / w_before.sum())

    losses = _missing_losses(p)
    layer = list(p.trunk[2].parameters())
    n = _layer_norms(p, losses, layer)
    Lp = torch.stack([v.detach() for v in losses.values()])
    idx = list(PRESENT)
    wp = w_norm[idx].clone().requires_grad_(True)
    g = wp * n
    ratio = Lp / L0[idx]
    r = ratio / ratio.mean()
    target = (g.detach().mean() * r.pow(1.5)).detach()
    (gw,) = torch.autograd.grad((g - target).abs().sum(), wp)
    expected_shared = torch.autograd.grad(
        sum(w * v for w, v in zip(w_norm[idx], losses.values())),
        list(p.trunk.parameters()),
        retain_graph=True,
    )

    info = bal.backward(losses)
    torch.testing.assert_close(gn.weights.detach(), w_norm, rtol=1e-12, atol=0)
    torch.testing.assert_close(info.weights, w_norm[idx], rtol=1e-12, atol=0)
    assert gn.weights.grad is not None
    torch.testing.assert_close(gn.weights.grad[idx], gw, rtol=1e-10, atol=1e-12)
    assert gn.weights.grad[1] == 0
    for prm, e in zip(p.trunk.parameters(), expected_shared):
        torch.testing.assert_close(prm.grad, e, rtol=1e-10, atol=1e-12)

    # after the update: the present weights are renormalised to m − w_absent, the absent one
    # is left as it is
    opt.step()
    opt.zero_grad()
    w_after = gn.weights.detach().clone()
    assert gn.renorm_mask is not None and gn.renorm_mask.tolist() == [True, False, True]
    bal.backward(p.losses())
    w = gn.weights.detach()
    assert torch.equal(w[1], w_after[1])
    clamped = w_after.clamp_min(gn.min_weight)[idx]
    expected = clamped * ((M - w_after[1]) / clamped.sum())
    torch.testing.assert_close(w[idx], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(w.sum(), torch.tensor(float(M), dtype=w.dtype), rtol=1e-12, atol=0)
    assert gn.renorm_mask is None


def test_gradnorm_initial_loss_per_task() -> None:
    p = make_problem(M, dtype=torch.float64)
    gn = W.GradNorm(M).double()
    bal = mtlbal.Balancer(p.trunk, weighting=gn, tasks=NAMES)
    first = _missing_losses(p)
    bal.backward(first)
    assert gn.initial_losses is not None and bool(gn.initial_losses[1].isnan())
    torch.testing.assert_close(
        gn.initial_losses[[0, 2]], torch.stack(list(first.values())).detach()
    )
    second = p.losses()
    bal.backward(second)
    assert gn.initial_losses[1] == second["task1"].detach()
    assert gn.initial_losses[0] == first["task0"].detach()


def test_gradvac_untouched_targets() -> None:
    gv = A.GradVac(seed=0)
    p = make_problem(M, dtype=torch.float64)
    bal = mtlbal.Balancer(p.trunk, aggregator=gv, tasks=NAMES)
    bal.backward(_missing_losses(p))  # the first step lacks task1: targets start at 0
    assert gv.targets is not None and gv.targets.shape == (M, M)
    assert torch.equal(gv.targets[1], torch.zeros(M, dtype=torch.float64))
    assert torch.equal(gv.targets[:, 1], torch.zeros(M, dtype=torch.float64))
    assert gv.targets[0, 2] != 0 and gv.targets[2, 0] != 0


def test_nash_unseen_task_has_no_warm_start() -> None:
    nash = A.NashMTL()
    p = make_problem(M, dtype=torch.float64)
    bal = mtlbal.Balancer(p.trunk, aggregator=nash, tasks=NAMES)
    bal.backward(_missing_losses(p))
    assert nash.alpha is not None and bool(nash.alpha[1].isnan())
    assert torch.isfinite(nash.alpha[[0, 2]]).all()
    info = bal.backward(p.losses())  # the full step solves from the reference's start
    assert torch.isfinite(nash.alpha).all() and torch.isfinite(info.weights).all()
    # its α solves α (Gα) = 1
    g = info.gramian.double()
    torch.testing.assert_close(nash.alpha * (g @ nash.alpha), torch.ones(M, dtype=g.dtype))


def test_rlw_draws_over_the_present_tasks() -> None:
    rlw = W.RLW(seed=4)
    p = make_problem(M)
    bal = mtlbal.Balancer(p.trunk, weighting=rlw, tasks=NAMES)
    info = bal.backward(_missing_losses(p))
    noise = torch.randn(2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(info.weights, (2 * torch.softmax(noise, 0)).float())
