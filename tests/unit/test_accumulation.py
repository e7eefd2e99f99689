"""Gradient accumulation (``Balancer(accumulate=K)`` / ``backward(..., last=...)``): a window of
``K`` equal micro-batches gives the update of the large batch, for every strategy of the
registry, at the parameters and at a cut point; nothing is visible before the window closes."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor

import mtlbal
from conftest import Problem, assert_same, make_problem
from registry import REGISTRY, Entry, feed_validation

# an entry may declare that it refuses gradient accumulation (tested in its own file)
CASES = [(e, at) for e in REGISTRY for at in e.at if e.extras.get("accumulate", True)]
IDS = [f"{e.name}@{at}" for e, at in CASES]
M = 3
B = 12


def losses_of(p: Problem, rows: slice) -> dict[str, Tensor]:
    z = p.trunk(p.x[rows])
    return {
        f"task{t}": (t + 1.0) * (h(z) - y[rows]).pow(2).mean() + 0.1 * (t + 1)
        for t, (h, y) in enumerate(zip(p.heads, p.ys))
    }


def build(entry: Entry, at: str, p: Problem, accumulate: int) -> Any:
    where = "params" if at == "params" else p.trunk
    bal = mtlbal.Balancer(p.trunk, at=where, accumulate=accumulate, **entry.make(M))
    bal.to(dtype=torch.float64)  # learnable strategy parameters too: compare in float64
    return mtlbal.wrap(torch.optim.SGD(p.params(), lr=0.05, momentum=0.9), bal)


def train(entry: Entry, p: Problem, opt: Any, k: int, steps: int) -> list[Any]:
    infos = []
    size = B // k
    for s in range(steps):
        opt.zero_grad()
        for j in range(k):
            info = opt.backward(losses_of(p, slice(j * size, (j + 1) * size)))
            assert info.pending == (j < k - 1)
        infos.append(info)
        opt.step()
        if entry.extras.get("update_after_step"):
            with torch.no_grad():
                parts = [losses_of(p, slice(j * size, (j + 1) * size)) for j in range(k)]
                opt.balancer.update({n: sum(d[n] for d in parts) / k for n in parts[0]})
        feed_validation(entry, opt.balancer, lambda: losses_of(p, slice(0, B)), s)
        if entry.epoch_every and (s + 1) % entry.epoch_every == 0:
            opt.balancer.epoch_end()
    return infos


def _flat_state(sd: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(sd, dict):
        for k, v in sd.items():
            out.update(_flat_state(v, f"{prefix}.{k}"))
    elif isinstance(sd, (list, tuple)):
        for i, v in enumerate(sd):
            out.update(_flat_state(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = sd
    return out


def _jacobian_at_cut(entry: Entry, at: str) -> bool:
    agg = entry.make(M).get("aggregator")
    return (
        at == "cut"
        and agg is not None
        and mtlbal.Need.GRAMIAN in agg.needs
        and not isinstance(agg, mtlbal.aggregation.base.GramianAggregator)
    )


@pytest.mark.parametrize(("entry", "at"), CASES, ids=IDS)
def test_window_equals_large_batch(entry: Entry, at: str) -> None:
    steps = 4 if entry.epoch_every else 3
    big = make_problem(M, dtype=torch.float64, batch=B, seed=1)
    small = copy.deepcopy(big)
    if _jacobian_at_cut(entry, at):
        # the window would have to keep every micro-batch's representation gradients and graph
        with pytest.raises(ValueError, match="needs the Jacobian at the cut point"):
            build(entry, at, small, 3)
        return
    opt_big = build(entry, at, big, 1)
    opt_small = build(entry, at, small, 3)
    ref = train(entry, big, opt_big, 1, steps)
    got = train(entry, small, opt_small, 3, steps)
    for a, b in zip(ref, got):
        assert b.micro_batches == 3 and a.micro_batches == 1
        torch.testing.assert_close(b.losses, a.losses, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(b.weights, a.weights, rtol=1e-8, atol=1e-10)
    for pa, pb in zip(big.params(), small.params()):
        torch.testing.assert_close(pb, pa, rtol=1e-8, atol=1e-10)
    for q_a, q_b in zip(opt_big.balancer.parameters(), opt_small.balancer.parameters()):
        torch.testing.assert_close(q_b, q_a, rtol=1e-8, atol=1e-10)
    assert opt_small.balancer.step_count == opt_big.balancer.step_count == steps
    sa = _flat_state(opt_big.balancer.state_dict()["weighting"])
    sb = _flat_state(opt_small.balancer.state_dict()["weighting"])
    assert sa.keys() == sb.keys()
    for key, va in sa.items():
        vb = sb[key]
        if isinstance(va, Tensor) and va.is_floating_point():
            torch.testing.assert_close(vb, va, rtol=1e-8, atol=1e-10, msg=key)


# ---------------------------------------------------------------- behaviour of the window
def _setup(accumulate: int = 2, **kw: Any) -> tuple[Problem, Any]:
    p = make_problem(M, dtype=torch.float64, batch=B, seed=2)
    bal = mtlbal.Balancer(p.trunk, accumulate=accumulate, **kw)
    bal.to(dtype=torch.float64)
    return p, mtlbal.wrap(torch.optim.SGD(p.params(), lr=0.1), bal)


def test_pending_micro_batch_changes_nothing() -> None:
    p, opt = _setup(
        3,
        weighting=mtlbal.weighting.RLW(M, seed=0),
        aggregator=mtlbal.aggregation.PCGrad(seed=0),
    )
    bal = opt.balancer
    seen: list[Any] = []
    bal.register_hook(lambda b, info: seen.append(info))
    before = copy.deepcopy(bal.state_dict())
    info = opt.backward(losses_of(p, slice(0, 4)))
    assert info.pending and info.micro_batches == 1 and info.step == 0
    info = opt.backward(losses_of(p, slice(4, 8)))
    assert info.pending and info.micro_batches == 2
    assert all(q.grad is None for q in p.params())
    assert all(q.grad is None for q in bal.parameters())
    assert bal.step_count == 0 and bal.last_info is None and not seen
    assert_same(bal.state_dict(), before)
    with pytest.raises(RuntimeError, match="open accumulation window"):
        opt.step()
    with pytest.raises(ValueError, match="accumulation window is open"):
        bal.update(losses_of(p, slice(0, 4)))
    info = opt.backward(losses_of(p, slice(8, 12)))
    assert not info.pending and info.micro_batches == 3 and bal.step_count == 1
    assert len(seen) == 1 and all(q.grad is not None for q in p.params())


def test_last_closes_a_window_early_and_opens_one_without_accumulate() -> None:
    # accumulate=1 with last=False opens a window; last=True closes it: the update is the
    # one of the batch made of the micro-batches seen (here the first 8 rows)
    ref, opt_ref = _setup(1, aggregator=mtlbal.aggregation.UPGrad())
    p, opt = _setup(1, aggregator=mtlbal.aggregation.UPGrad())
    opt_ref.backward(losses_of(ref, slice(0, 8)))
    assert opt.backward(losses_of(p, slice(0, 4)), last=False).pending
    info = opt.backward(losses_of(p, slice(4, 8)), last=True)
    assert info.micro_batches == 2
    for a, b in zip(ref.grads(), p.grads()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    # with accumulate=4, last=True after two micro-batches closes the window just the same
    p4, opt4 = _setup(4, aggregator=mtlbal.aggregation.UPGrad())
    opt4.backward(losses_of(p4, slice(0, 4)))
    opt4.backward(losses_of(p4, slice(4, 8)), last=True)
    for a, b in zip(ref.grads(), p4.grads()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="last must be"):
        opt4.backward(losses_of(p4, slice(0, 4)), last=1)  # type: ignore[arg-type]


def test_non_finite_micro_batch_refuses_the_window() -> None:
    p, opt = _setup(2, weighting=mtlbal.weighting.UncertaintyWeighting(M))
    bal = opt.balancer
    before = copy.deepcopy(bal.state_dict())
    bad = losses_of(p, slice(0, 6))
    bad["task1"] = bad["task1"] * float("nan")
    assert opt.backward(bad).pending  # checked when the window closes: the one host sync
    with pytest.raises(ValueError, match=r"non-finite loss for task.*task1"):
        opt.backward(losses_of(p, slice(6, 12)))
    assert all(q.grad is None for q in p.params()) and bal.step_count == 0
    assert_same(bal.state_dict(), before)
    assert bal._window is None  # the refused window is discarded; the next one starts afresh
    assert opt.backward(losses_of(p, slice(0, 6))).pending
    assert not opt.backward(losses_of(p, slice(6, 12))).pending and bal.step_count == 1


def test_skip_policy_skips_the_window() -> None:
    p, opt = _setup(2, aggregator=mtlbal.aggregation.MGDA(), nonfinite="skip")
    bad = losses_of(p, slice(0, 6))
    bad["task0"] = bad["task0"] + float("inf")
    opt.backward(bad)
    info = opt.backward(losses_of(p, slice(6, 12)))
    assert info.skipped and not info.pending
    assert all(q.grad is None for q in p.params()) and opt.balancer.step_count == 0


def test_micro_batches_must_have_the_same_tasks() -> None:
    p, opt = _setup(2)
    opt.backward(losses_of(p, slice(0, 6)))
    other = losses_of(p, slice(6, 12))
    other["extra"] = other.pop("task2")
    with pytest.raises(ValueError, match="every micro-batch of an optimizer step"):
        opt.backward(other)
    # the refused micro-batch left the window as it was: the next one closes it
    info = opt.backward(losses_of(p, slice(6, 12)))
    assert info.micro_batches == 2 and not info.pending
    # a dict in another order is matched by name
    ref, opt_ref = _setup(1, aggregator=mtlbal.aggregation.UPGrad())
    p2, opt2 = _setup(2, aggregator=mtlbal.aggregation.UPGrad())
    opt_ref.backward(losses_of(ref, slice(0, 12)))
    opt2.backward(losses_of(p2, slice(0, 6)))
    opt2.backward(dict(reversed(list(losses_of(p2, slice(6, 12)).items()))))
    for a, b in zip(ref.grads(), p2.grads()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


class _JacobianMean(mtlbal.aggregation.base.Aggregator):
    """A minimal Jacobian-based aggregator (the mean row) for the refusal test."""

    def aggregate_jacobian(self, jac: Tensor, ctx: Any) -> Tensor:
        return jac.mean(0)


def test_jacobian_aggregator_at_a_cut_is_refused() -> None:
    p = make_problem(M, dtype=torch.float64, batch=B)
    agg = _JacobianMean()
    assert not isinstance(agg, mtlbal.aggregation.base.GramianAggregator)
    with pytest.raises(ValueError, match="needs the Jacobian at the cut point"):
        mtlbal.Balancer(p.trunk, at=p.trunk, aggregator=agg, accumulate=2)
    # at the parameters it is exact
    ref = make_problem(M, dtype=torch.float64, batch=B)
    mtlbal.Balancer(ref.trunk, aggregator=_JacobianMean()).backward(losses_of(ref, slice(0, 12)))
    bal = mtlbal.Balancer(p.trunk, aggregator=agg, accumulate=2)
    bal.backward(losses_of(p, slice(0, 6)))
    bal.backward(losses_of(p, slice(6, 12)))
    for a, b in zip(ref.grads(), p.grads()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_configuration_refusals() -> None:
    p = make_problem(M)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="accumulate must be a positive int"):
            mtlbal.Balancer(p.trunk, accumulate=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="engine='layerwise'"):
        mtlbal.Balancer(
            p.trunk, aggregator=mtlbal.aggregation.UPGrad(), engine="layerwise", accumulate=2
        )


@pytest.mark.parametrize("at", ["params", "cut"])
def test_grad_scaler_window_holds_the_scaled_large_batch_gradients(at: str) -> None:
    scale = 2.0**12
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    kw = {"weighting": mtlbal.weighting.FAMO(M), "aggregator": mtlbal.aggregation.MGDA()}
    ref = make_problem(M, dtype=torch.float64, batch=B, seed=4)
    p = copy.deepcopy(ref)
    cut_ref = ref.trunk if at == "cut" else "params"
    cut = p.trunk if at == "cut" else "params"
    ref_bal = mtlbal.Balancer(ref.trunk, at=cut_ref, **copy.deepcopy(kw))
    info_ref = ref_bal.backward(losses_of(ref, slice(0, 12)))
    bal = mtlbal.Balancer(p.trunk, at=cut, accumulate=2, **kw)
    bal.backward(losses_of(p, slice(0, 6)), scaler=scaler)
    info = bal.backward(losses_of(p, slice(6, 12)), scaler=scaler)
    torch.testing.assert_close(info.weights, info_ref.weights, rtol=1e-9, atol=1e-12)
    for a, b in zip(ref.grads(), p.grads()):
        torch.testing.assert_close(b, a * scale, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("make", "at"),
    [
        (lambda: {"diagnostics": True, "weighting": mtlbal.weighting.FAMO(M)}, "cut"),
        (lambda: {"diagnostics": True}, "params"),
        (lambda: {"aggregator": mtlbal.aggregation.UPGrad(), "chunk_size": 1}, "params"),
        (
            lambda: {
                "aggregator": mtlbal.aggregation.MGDA(),
                "weighting": mtlbal.weighting.GradNorm(M),
            },
            "cut",
        ),
    ],
    ids=[
        "diagnostics-famo@cut",
        "diagnostics@params",
        "chunked-upgrad@params",
        "gradnorm-mgda@cut",
    ],
)
def test_other_configurations_equal_the_large_batch(make: Any, at: str) -> None:
    big = make_problem(M, dtype=torch.float64, batch=B, seed=3)
    small = copy.deepcopy(big)
    one = mtlbal.Balancer(big.trunk, at=big.trunk if at == "cut" else "params", **make())
    win = mtlbal.Balancer(
        small.trunk, at=small.trunk if at == "cut" else "params", accumulate=2, **make()
    )
    one.to(dtype=torch.float64)
    win.to(dtype=torch.float64)
    ref = one.backward(losses_of(big, slice(0, 12)))
    win.backward(losses_of(small, slice(0, 6)))
    got = win.backward(losses_of(small, slice(6, 12)))
    assert ref.gramian is not None and got.gramian is not None
    torch.testing.assert_close(got.gramian, ref.gramian, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.weights, ref.weights, rtol=1e-10, atol=1e-12)
    for a, b in zip(big.grads(), small.grads()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("make", "at"),
    [
        (lambda: {"weighting": mtlbal.weighting.UncertaintyWeighting(M)}, "params"),
        (
            lambda: {
                "weighting": mtlbal.weighting.GradNorm(M),
                "aggregator": mtlbal.aggregation.NashMTL(),
            },
            "params",
        ),
        (lambda: {"aggregator": mtlbal.aggregation.GradVac(seed=0)}, "cut"),
    ],
    ids=["uw-linear", "gradnorm-nash-jacobian", "gradvac-cut"],
)
def test_missing_task_window_equals_the_large_batch(make: Any, at: str) -> None:
    # every micro-batch of the window lacks the same task: the large batch lacking it
    def run(p: Problem, k: int) -> tuple[mtlbal.Balancer, Any]:
        where = p.trunk if at == "cut" else "params"
        bal = mtlbal.Balancer(p.trunk, at=where, accumulate=k, **make())
        bal.to(dtype=torch.float64)
        size = B // k
        for s in range(3):
            for q in [*p.params(), *bal.parameters()]:
                q.grad = None
            for j in range(k):
                losses: dict[str, Any] = dict(losses_of(p, slice(j * size, (j + 1) * size)))
                if s == 1:
                    losses["task1"] = None
                info = bal.backward(losses)
            assert info.missing == (("task1",) if s == 1 else ())
            with torch.no_grad():
                for q in [*p.params(), *bal.parameters()]:
                    if q.grad is not None:
                        q -= 0.1 * q.grad
        return bal, info

    big = make_problem(M, dtype=torch.float64, batch=B, seed=5)
    small = copy.deepcopy(big)
    b1, _ = run(big, 1)
    b2, _ = run(small, 3)
    for a, b in zip(big.params(), small.params()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
    sa = _flat_state(b1.state_dict()["weighting"]) | _flat_state(b1.state_dict()["aggregator"])
    sb = _flat_state(b2.state_dict()["weighting"]) | _flat_state(b2.state_dict()["aggregator"])
    for key, va in sa.items():
        if isinstance(va, Tensor) and va.is_floating_point():
            torch.testing.assert_close(sb[key], va, rtol=1e-9, atol=1e-11, equal_nan=True)
