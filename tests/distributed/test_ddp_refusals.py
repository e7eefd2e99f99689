"""Refusals under DDP (gloo, 2 processes) are global: a non-finite value on one rank, or ranks
that disagree on the tasks, make every rank skip or raise together; none is left waiting in a
collective, and the next step works.

One pair of processes runs every scenario (the worker returns, per scenario, what each rank
saw); a rank that hangs fails the test through the harness's deadline.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _harness import WORLD, Net, net_and_data
from torch import Tensor, nn

import mtlbal

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn tests run on POSIX"),
]

M = 3


# configurations: (at, Balancer keyword arguments); the loss-level one forms no per-task gradient
CONFIGS: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "mgda@params": ("params", lambda: {"aggregator": mtlbal.aggregation.MGDA()}),
    "nash@cut": ("cut", lambda: {"aggregator": mtlbal.aggregation.NashMTL()}),
    "uw@params": ("params", lambda: {"weighting": mtlbal.weighting.UncertaintyWeighting(M)}),
    "equal@cut": ("cut", lambda: {}),
    "famo@params": ("params", lambda: {"weighting": mtlbal.weighting.FAMO(M)}),
}


def _setup(config: str, rank: int, **kw: Any) -> tuple[Any, ...]:
    at, make = CONFIGS[config]
    torch.manual_seed(0)
    net = Net().double()
    ddp = nn.parallel.DistributedDataParallel(net)
    bal = mtlbal.Balancer(net.trunk, at="params" if at == "params" else net.trunk, **make(), **kw)
    opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=0.05), bal)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g).double(), torch.randn(16, M, generator=g).double()
    return net, ddp, bal, opt, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]


def _losses(
    out: tuple[Tensor, list[Tensor]], y: Tensor, names: list[str] | None = None
) -> dict[str, Tensor]:
    _z, outs = out
    names = names or [f"t{i}" for i in range(M)]
    return {
        n: (i + 1.0) * (o[:, 0] - y[:, i]).pow(2).mean()
        for i, (n, o) in enumerate(zip(names, outs))
    }


def _grads(net: nn.Module) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


def _state(bal: mtlbal.Balancer) -> dict[str, Any]:
    return {"step": bal.step_count, "strategy": [p.detach().clone() for p in bal.parameters()]}


def _try(fn: Callable[[], Any]) -> str | None:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _nonfinite(config: str, rank: int, policy: str, where: str) -> dict[str, Any]:
    """Step 1 fine; step 2 non-finite on rank 1 only (``where``: "loss", or "grad": a NaN
    gradient behind a finite loss); step 3 fine."""
    net, ddp, bal, opt, x, y = _setup(config, rank, nonfinite=policy)
    opt.zero_grad()
    opt.backward(_losses(ddp(x), y))
    opt.step()
    before = _state(bal)
    opt.zero_grad()
    z, outs = ddp(x)
    losses = _losses((z, outs), y)
    if rank == 1:
        if where == "loss":
            losses["t1"] = losses["t1"] * float("nan")
        else:  # d sqrt(u)/du at u = 0 is inf; times 0: NaN, the loss is unchanged
            losses["t1"] = losses["t1"] + 0.0 * (z[:, 0] - z[:, 0].detach()).abs().sqrt().sum()
    res: dict[str, Any] = {}
    info = None

    def step2() -> None:
        nonlocal info
        info = opt.backward(losses)

    res["error"] = _try(step2)
    res["skipped"] = None if info is None else info.skipped
    res["grads_after"] = _grads(net)
    res["state_same"] = (
        all(torch.equal(a, b) for a, b in zip(before["strategy"], _state(bal)["strategy"]))
        and before["step"] == bal.step_count
    )
    opt.zero_grad()
    opt.backward(_losses(ddp(x), y))
    res["next_grads"] = _grads(net)
    res["next_step"] = bal.step_count
    return res


def _names(config: str, rank: int, kind: str, first: bool) -> dict[str, Any]:
    """Rank 1 passes other task names (``kind="names"``, same count) or fewer tasks
    (``kind="count"``), on the first step or after one good step; then a good step."""
    net, ddp, _bal, opt, x, y = _setup(config, rank)
    if not first:
        opt.zero_grad()
        opt.backward(_losses(ddp(x), y))
        opt.step()
    opt.zero_grad()
    out = ddp(x)
    losses = _losses(out, y)
    if rank == 1:
        if kind == "names":
            losses = _losses(out, y, ["t0", "t1", "other"])
        else:
            del losses["t2"]
    res: dict[str, Any] = {"error": _try(lambda: opt.backward(losses))}
    res["grads_after"] = _grads(net)
    opt.zero_grad()
    opt.backward(_losses(ddp(x), y))
    res["next_grads"] = _grads(net)
    return res


def _update(config: str, rank: int, kind: str) -> dict[str, Any]:
    """FAMO's ``balancer.update`` after a good step: rank 1 passes other names (``"names"``),
    or a NaN loss (``"nan-skip"``, ``"nan-raise"``); then a good step and update."""
    policy = "skip" if kind == "nan-skip" else "raise"
    net, ddp, bal, opt, x, y = _setup(config, rank, nonfinite=policy)
    opt.zero_grad()
    opt.backward(_losses(ddp(x), y))
    opt.step()
    before = copy.deepcopy(bal.weighting.state_dict())
    with torch.no_grad():
        after = _losses(ddp(x), y)
    if rank == 1:
        if kind == "names":
            after = {"t0": after["t0"], "t1": after["t1"], "other": after["t2"]}
        else:
            after["t1"] = after["t1"] * float("nan")
    res: dict[str, Any] = {"error": _try(lambda: bal.update(after))}
    res["state_same"] = all(
        torch.equal(v, bal.weighting.state_dict()[k])
        for k, v in before.items()
        if isinstance(v, Tensor)
    )
    opt.zero_grad()
    opt.backward(_losses(ddp(x), y))
    opt.step()
    with torch.no_grad():
        bal.update(_losses(ddp(x), y))
    res["next_grads"] = _grads(net)
    res["logits"] = bal.weighting.state_dict()["logits"].clone()
    return res


def _set_change(shard: int | None) -> dict[str, Any]:
    """MGDA at the parameters (no per-task state): 2 steps on tasks t0, t1, t2, then 2 steps
    on t0, t1, u (a new task set); rank 1 gives its dict in reversed order throughout.
    ``shard=None``: one process on the full batch."""
    net, model, x, y = net_and_data(shard, M)
    bal = mtlbal.Balancer(net.trunk, aggregator=mtlbal.aggregation.MGDA())
    opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=0.05), bal)
    tasks = []
    for k in range(4):
        names = ["t0", "t1", "t2"] if k < 2 else ["t0", "t1", "u"]
        losses = _losses(model(x), y, names)
        if shard == 1:
            losses = dict(reversed(losses.items()))
        opt.zero_grad()
        info = opt.backward(losses)
        opt.step()
        tasks.append(info.tasks)
    return {"params": [p.detach().clone() for p in net.parameters()], "tasks": tasks}


SCENARIOS: dict[str, tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]] = {}
for _c in ("mgda@params", "nash@cut", "uw@params", "equal@cut"):
    for _p in ("skip", "raise"):
        SCENARIOS[f"{_c}/{_p}/loss"] = (_nonfinite, (_c, _p, "loss"))
for _c in ("mgda@params", "nash@cut"):
    for _p in ("skip", "raise"):
        SCENARIOS[f"{_c}/{_p}/grad"] = (_nonfinite, (_c, _p, "grad"))
for _c in ("uw@params", "equal@cut"):
    for _k in ("names", "count"):
        for _f in (True, False):
            SCENARIOS[f"{_c}/{_k}/{'first' if _f else 'later'}"] = (_names, (_c, _k, _f))
for _k in ("names", "nan-skip", "nan-raise"):
    SCENARIOS[f"famo@params/update/{_k}"] = (_update, ("famo@params", _k))


def _worker(rank: int) -> dict[str, Any]:
    out = {key: fn(args[0], rank, *args[1:]) for key, (fn, args) in SCENARIOS.items()}
    for key, res in out.items():  # shown by pytest -s
        print(f"rank {rank} {key}: {res['error']}", flush=True)
    out["set-change"] = {"error": _try(lambda: out.update(set_change=_set_change(rank)))}
    return out


@pytest.fixture(scope="module")
def results(ddp_session: dict[str, Any]) -> list[dict[str, Any]]:
    return ddp_session[__name__]


def _same(a: list[Tensor | None], b: list[Tensor | None]) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b)
    )


def _next_step_fine(ranks: list[dict[str, Any]]) -> None:
    for res in ranks:
        assert all(g is not None and torch.isfinite(g).all() for g in res["next_grads"])
    assert _same(ranks[0]["next_grads"], ranks[1]["next_grads"])


NONFINITE = [k for k in SCENARIOS if SCENARIOS[k][0] is _nonfinite and "famo" not in k]
UPDATE = [k for k in SCENARIOS if SCENARIOS[k][0] is _update]
NAMES = [k for k in SCENARIOS if SCENARIOS[k][0] is _names]


@pytest.mark.parametrize("key", NONFINITE)
def test_nonfinite_on_one_rank_is_global(results: list[dict[str, Any]], key: str) -> None:
    ranks = [r[key] for r in results]
    policy, where = key.split("/")[1:]
    for rank, res in enumerate(ranks):
        assert all(g is None for g in res["grads_after"]), f"rank {rank} wrote .grad"
        assert res["state_same"], f"rank {rank} changed the strategies' state or step"
        if policy == "skip":
            assert res["error"] is None, f"rank {rank}: {res['error']}"
            assert res["skipped"] is True, f"rank {rank} did not skip"
        else:
            assert res["error"] is not None and res["error"].startswith("ValueError"), res
            if where == "grad":
                assert "'t1'" in res["error"], f"rank {rank}: {res['error']}"
            elif rank == 1:  # the rank that holds the NaN names the task
                assert "'t1'" in res["error"], res["error"]
            else:
                assert "another rank" in res["error"], res["error"]
    _next_step_fine(ranks)
    assert ranks[0]["next_step"] == ranks[1]["next_step"] == 2


@pytest.mark.parametrize("key", NAMES)
def test_tasks_disagree_every_rank_raises(results: list[dict[str, Any]], key: str) -> None:
    ranks = [r[key] for r in results]
    for rank, res in enumerate(ranks):
        assert res["error"] is not None and res["error"].startswith("ValueError"), (
            f"rank {rank}: {res['error']}"
        )
        if rank == 0:  # the other rank's message is quoted (rank 1 raises its own error)
            assert "rank 1" in res["error"], f"rank {rank}: {res['error']}"
        assert all(g is None for g in res["grads_after"]), f"rank {rank} wrote .grad"
    _next_step_fine(ranks)


@pytest.mark.parametrize("key", UPDATE)
def test_update_refusal_is_global(results: list[dict[str, Any]], key: str) -> None:
    """``balancer.update`` (FAMO): other names or a NaN on one rank: every rank raises (or, with
    ``nonfinite="skip"`` and a NaN, every rank leaves the state alone); the next step works."""
    ranks = [r[key] for r in results]
    kind = key.split("/")[-1]
    for rank, res in enumerate(ranks):
        assert res["state_same"], f"rank {rank} changed FAMO's state"
        if kind == "nan-skip":
            assert res["error"] is None, f"rank {rank}: {res['error']}"
        else:
            assert res["error"] is not None and res["error"].startswith("ValueError"), res
    if kind == "names":
        assert "rank 1" in ranks[0]["error"], ranks[0]["error"]
    _next_step_fine(ranks)
    torch.testing.assert_close(ranks[0]["logits"], ranks[1]["logits"], rtol=0, atol=0)


def test_task_set_change_matches_one_process(results: list[dict[str, Any]]) -> None:
    """A new task set mid-training (every rank, rank 1 in reversed order): rank 0's order is
    canonical again and training equals one process."""
    for r, res in enumerate(results):
        assert res["set-change"]["error"] is None, f"rank {r}: {res['set-change']['error']}"
    ranks = [res["set_change"] for res in results]
    ref = _set_change(None)
    for res in ranks:
        assert res["tasks"] == ref["tasks"]
        torch.testing.assert_close(res["params"], ref["params"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
