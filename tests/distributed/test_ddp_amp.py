"""GradScaler under DDP (gloo, 2 processes, CPU scaler): scaled training equals one process on the
concatenated batch, and an overflow in one rank's per-task gradient (finite losses) is skipped by
every rank's scaler together (the per-task gradients or the Gramian carry it to every rank)."""

from __future__ import annotations

import sys
from collections.abc import Callable
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
STEPS = 3
CONFIGS: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "uw@params": ("params", lambda: {"weighting": mtlbal.weighting.UncertaintyWeighting(M)}),
    "gradnorm@params": ("params", lambda: {"weighting": mtlbal.weighting.GradNorm(M)}),
    "mgda@params": ("params", lambda: {"aggregator": mtlbal.aggregation.MGDA()}),
    "nash@cut": ("cut", lambda: {"aggregator": mtlbal.aggregation.NashMTL()}),
}


def run(config: str, shard: int | None, overflow: bool = False) -> dict[str, Any]:
    """``STEPS`` scaled steps; ``overflow``: at step 1, rank 1 (or the single process) adds a
    term with a finite value and an infinite gradient to task t1."""
    at, make = CONFIGS[config]
    net, model, x, y = net_and_data(shard, M)
    bal = mtlbal.Balancer(net.trunk, at="params" if at == "params" else net.trunk, **make())
    opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=0.05), bal)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    skipped, scales = [], []
    for k in range(STEPS):
        opt.zero_grad()
        z, outs = model(x)
        losses = {
            f"t{i}": (i + 1.0) * (o[:, 0] - y[:, i]).pow(2).mean() for i, o in enumerate(outs)
        }
        if overflow and k == 1 and shard in (None, 1):
            losses["t1"] = losses["t1"] + 0.0 * (z[:, 0] - z[:, 0].detach()).abs().sqrt().sum()
        info = opt.backward(losses, scaler=scaler)
        scaler.step(opt)
        scaler.update()
        skipped.append(info.skipped)
        scales.append(float(scaler.get_scale()))
    return {
        "params": [p.detach().clone() for p in net.parameters()],
        "strategy": [p.detach().clone() for p in bal.parameters()],
        "skipped": skipped,
        "scales": scales,
        "steps": bal.step_count,
    }


CASES = [(c, o) for c in CONFIGS for o in (False, True)]
IDS = [f"{c}{'/overflow' if o else ''}" for c, o in CASES]


def _worker(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for (config, overflow), key in zip(CASES, IDS):
        try:
            out[key] = run(config, rank, overflow)
        except Exception as e:
            out[key] = {"error": f"{type(e).__name__}: {e}"}
    return out


@pytest.fixture(scope="module")
def results(ddp_session: dict[str, Any]) -> list[dict[str, Any]]:
    return ddp_session[__name__]


@pytest.mark.parametrize(("config", "overflow"), CASES, ids=IDS)
def test_scaled_ddp_matches_one_process(
    results: list[dict[str, Any]], config: str, overflow: bool
) -> None:
    key = IDS[CASES.index((config, overflow))]
    ranks = [r[key] for r in results]
    for r, res in enumerate(ranks):
        assert "error" not in res, f"rank {r}: {res['error']}"
    ref = run(config, None, overflow)
    for res in ranks:
        assert res["skipped"] == ref["skipped"]
        assert res["scales"] == ref["scales"]
        assert res["steps"] == ref["steps"]
        torch.testing.assert_close(res["params"], ref["params"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res["strategy"], ref["strategy"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    if overflow and CONFIGS[config][1]().get("aggregator") is not None:
        assert ranks[0]["skipped"] == [False, True, False]
