"""Missing tasks under DDP (gloo, 2 processes).

When every rank leaves out the same tasks, a missing-task step is the one-process step on the
concatenated batch (exact data parallelism, as for a full step). When the ranks disagree (rank 0
has labels for a task, rank 1 has not), every rank refuses the step with a clear error, nothing
changes, and the next step works.

An absent task's head is an unused parameter in that step: the model is wrapped with
``find_unused_parameters=True``. At a cut point DDP's unused-parameter search stops at the cut
(a detached leaf) and the trunk's hooks then fire twice, so missing tasks at a cut point under
DDP are not supported (documented in docs/concepts.md).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _harness import WORLD, net_and_data
from torch import Tensor, nn

import mtlbal

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn tests run on POSIX"),
]

M = 3
NAMES = ("t0", "t1", "t2")
PATTERN = (("t0", "t1", "t2"), ("t0", "t2"), ("t1",), ("t0", "t1", "t2"))

CONFIGS: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "uw@params": ("params", lambda: {"weighting": mtlbal.weighting.UncertaintyWeighting(M)}),
    "nash@params": ("params", lambda: {"aggregator": mtlbal.aggregation.NashMTL()}),
    "gradvac@params": ("params", lambda: {"aggregator": mtlbal.aggregation.GradVac(seed=1)}),
}


def _losses(out: tuple[Tensor, list[Tensor]], y: Tensor, names: tuple[str, ...]) -> dict[str, Any]:
    _z, outs = out
    return {
        f"t{i}": (i + 1.0) * (o[:, 0] - y[:, i]).pow(2).mean()
        for i, o in enumerate(outs)
        if f"t{i}" in names
    }


def _run(config: str, shard: int | None) -> dict[str, Any]:
    """The PATTERN of present tasks, the same on every rank (``shard=None``: one process)."""
    at, make = CONFIGS[config]
    net, model, x, y = net_and_data(None, M)
    if shard is not None:
        # an absent task's head is unused in that step: DDP must be told (a loss-level
        # backward runs through DDP's reducer); at "params" a gradient method runs no DDP hook
        model = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
        x, y = x.chunk(WORLD)[shard], y.chunk(WORLD)[shard]
    bal = mtlbal.Balancer(
        net.trunk, at="params" if at == "params" else net.trunk, tasks=NAMES, **make()
    )
    opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=0.05), bal)
    res: dict[str, Any] = {"weights": [], "tasks": [], "grads": []}
    for names in PATTERN:
        opt.zero_grad()
        info = opt.backward(_losses(model(x), y, names))
        res["grads"].append([None if p.grad is None else p.grad.clone() for p in net.parameters()])
        opt.step()
        res["weights"].append(info.weights.clone())
        res["tasks"].append((info.tasks, info.missing))
    res["params"] = [p.detach().clone() for p in net.parameters()]
    res["state"] = {k: v.clone() for k, v in bal.state_dict().items() if isinstance(v, Tensor)} | {
        f"s{i}:{k}": v.clone()
        for i, s in enumerate(bal.strategies)
        for k, v in s.state_dict().items()
        if isinstance(v, Tensor)
    }
    return res


def _differ(rank: int) -> dict[str, Any]:
    """After a full step, rank 0 has labels for t1 and rank 1 has not; then a full step."""
    net, model, x, y = net_and_data(rank, M)
    bal = mtlbal.Balancer(net.trunk, weighting=mtlbal.weighting.UncertaintyWeighting(M))
    opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=0.05), bal)
    opt.zero_grad()
    opt.backward(_losses(model(x), y, NAMES))
    opt.step()
    opt.zero_grad()
    before = ([q.detach().clone() for q in bal.parameters()], bal.step_count)
    losses = _losses(model(x), y, NAMES if rank == 0 else ("t0", "t2"))
    res: dict[str, Any] = {"error": None}
    try:
        opt.backward(losses)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    res["grads_after"] = [p.grad for p in net.parameters()]
    res["state_same"] = bal.step_count == before[1] and all(
        torch.equal(a, b.detach()) for a, b in zip(before[0], bal.parameters())
    )
    opt.zero_grad()
    opt.backward(_losses(model(x), y, NAMES))
    res["next_grads"] = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    return res


def _worker(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {c: _run(c, rank) for c in CONFIGS}
    out["differ"] = _differ(rank)
    return out


@pytest.fixture(scope="module")
def results(ddp_session: dict[str, Any]) -> list[dict[str, Any]]:
    return ddp_session[__name__]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_same_missing_tasks_on_every_rank_match_one_process(
    results: list[dict[str, Any]], config: str
) -> None:
    ref = _run(config, None)
    for rank, res in enumerate(r[config] for r in results):
        assert res["tasks"] == ref["tasks"], f"rank {rank}"
        assert res["tasks"][1] == (("t0", "t2"), ("t1",))
        for a, b in zip(res["weights"], ref["weights"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for step_a, step_b in zip(res["grads"], ref["grads"]):
            for a, b in zip(step_a, step_b):
                # DDP (find_unused_parameters) writes zeros where one process leaves None
                assert b is not None or a is None or not a.any()
                if b is not None:
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res["params"], ref["params"], rtol=1e-10, atol=1e-12)
        assert res["state"].keys() == ref["state"].keys()
        for k in ref["state"]:
            torch.testing.assert_close(
                res["state"][k], ref["state"][k], rtol=1e-10, atol=1e-12, equal_nan=True
            )


def test_ranks_that_disagree_on_the_present_tasks_all_refuse(
    results: list[dict[str, Any]],
) -> None:
    ranks = [r["differ"] for r in results]
    for rank, res in enumerate(ranks):
        err = res["error"]
        assert err is not None and err.startswith("ValueError"), f"rank {rank}: {err}"
        assert "rank 0: ['t0', 't1', 't2']" in err and "rank 1: ['t0', 't2']" in err, err
        assert "missing" in err, err
        assert all(g is None for g in res["grads_after"]), f"rank {rank} wrote .grad"
        assert res["state_same"], f"rank {rank} changed the strategies' state or step"
    for res in ranks:
        assert all(torch.isfinite(g).all() for g in res["next_grads"])
    for a, b in zip(ranks[0]["next_grads"], ranks[1]["next_grads"]):
        assert torch.equal(a, b)
