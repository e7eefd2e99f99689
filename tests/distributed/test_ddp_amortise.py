"""Amortised balancing under DDP (gloo, 2 processes): every rank solves on the same steps, and
every step (solve and reuse) equals one process on the concatenated batch.

What the Balancer all-reduces itself (``torch.distributed.all_reduce`` from Python; DDP's own
bucket reductions run in its C++ reducer and are not counted) is recorded per step: at a cut
point only the ``m × m`` Gramian (and the ``[m]`` losses) — the Gramian-only recipe, exact there
because the per-sample blocks of the representation are disjoint across ranks; at the shared
parameters the per-task gradients on solve steps (``m ×`` the trunk's size: the global Gramian
has cross-rank terms, so no ``m × m`` all-reduce is exact there), and on reuse steps nothing of
the trunk (its weighted gradient is synced by DDP's reducer like a plain step's).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _harness import net_and_data

import mtlbal

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn tests run on POSIX"),
]

M = 3
STEPS = 5
EVERY = 2
CONFIGS = ["upgrad@params", "uw-mgda@params", "mgda@cut"]


def _losses(out: Any, y: torch.Tensor) -> list[torch.Tensor]:
    _z, outs = out
    return [(i + 1.0) * (o[:, 0] - y[:, i]).pow(2).mean() for i, o in enumerate(outs)]


def _run(config: str, shard: int | None) -> dict[str, Any]:
    net, model, x, y = net_and_data(shard, M)
    kw: dict[str, Any] = {"solve_every": EVERY}
    if config == "upgrad@params":
        kw["aggregator"] = mtlbal.aggregation.UPGrad()
    elif config == "uw-mgda@params":
        kw["aggregator"] = mtlbal.aggregation.MGDA()
        kw["weighting"] = mtlbal.weighting.UncertaintyWeighting(M).double()
    else:
        kw["aggregator"] = mtlbal.aggregation.MGDA()
        kw["at"] = net.trunk
    bal = mtlbal.Balancer(net.trunk, **kw)
    opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=0.05), bal)
    reduced: list[int] = []
    original = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        reduced.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    res: dict[str, Any] = {"grads": [], "weights": [], "reused": [], "traffic": []}
    for _ in range(STEPS):
        opt.zero_grad()
        out = model(x)
        reduced.clear()
        dist.all_reduce = counting  # type: ignore[assignment]
        try:
            info = opt.backward(_losses(out, y))
        finally:
            dist.all_reduce = original
        res["traffic"].append(sum(n for n in reduced if n > 1))  # not the 1-element verdicts
        res["grads"].append([p.grad.clone() for p in [*net.parameters(), *bal.parameters()]])
        res["weights"].append(info.weights.clone())
        res["reused"].append(info.reused)
        opt.step()
    return res


def _worker(rank: int) -> dict[str, Any]:
    return {c: _run(c, rank) for c in CONFIGS}


@pytest.fixture(scope="module")
def results(ddp_session: dict[str, Any]) -> list[dict[str, Any]]:
    return ddp_session[__name__]


@pytest.mark.parametrize("config", CONFIGS)
def test_amortised_steps_match_one_process(results: list[dict[str, Any]], config: str) -> None:
    ref = _run(config, None)
    assert ref["reused"] == [False, True, False, True, False]
    for rank, res in enumerate(r[config] for r in results):
        assert res["reused"] == ref["reused"], f"rank {rank}"
        for a, b in zip(res["weights"], ref["weights"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for step_a, step_b in zip(res["grads"], ref["grads"]):
            for a, b in zip(step_a, step_b):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS)
def test_what_the_balancer_all_reduces(results: list[dict[str, Any]], config: str) -> None:
    net, _, _, _ = net_and_data(None, M)
    trunk = sum(p.numel() for p in net.trunk.parameters())
    heads = sum(p.numel() for p in net.heads.parameters())
    traffic = results[0][config]["traffic"]
    reused = results[0][config]["reused"]
    agree = 6  # the step's agreement on the task set and the verdict (six integers)
    for n, r in zip(traffic, reused):
        if config == "mgda@cut":
            assert n <= agree + M + M * M  # the losses and the Gramian, solve or reuse
        elif r:  # the losses and the heads' unweighted share only: nothing of the trunk
            assert n <= agree + M + heads
        else:  # the per-task gradients of the trunk and the heads
            assert n >= M * trunk
