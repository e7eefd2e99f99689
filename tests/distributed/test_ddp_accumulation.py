"""Gradient accumulation under DDP (gloo, 2 processes): two micro-batches per rank, with and
without ``no_sync()`` around the first, give the single-process full-batch step."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _harness import WORLD
from torch import nn

import mtlbal

pytestmark = pytest.mark.distributed

M = 3
STEPS = 2
MICRO = 2


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
            self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(M)])

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            z = self.trunk(x)
            return [h(z) for h in self.heads]

    return Net().double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 5, generator=g).double(), torch.randn(16, M, generator=g).double()


def _losses(outs: list[torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        f"t{i}": (i + 1.0) * (o[:, 0] - y[:, i]).pow(2).mean() + 0.5 for i, o in enumerate(outs)
    }


def _make(kind: str, net: nn.Module, accumulate: int) -> mtlbal.Balancer:
    trunk = net.trunk
    kw: dict[str, Any] = {"accumulate": accumulate}
    if kind == "uw":  # the linear mode: one backward per micro-batch
        kw["weighting"] = mtlbal.weighting.UncertaintyWeighting(M)
    elif kind == "famo":  # the Jacobian mode without an aggregator
        kw["weighting"] = mtlbal.weighting.FAMO(M)
    elif kind == "uw-upgrad":  # the Jacobian mode with one
        kw["weighting"] = mtlbal.weighting.UncertaintyWeighting(M)
        kw["aggregator"] = mtlbal.aggregation.UPGrad()
    elif kind == "mgda-cut":  # the cut mode
        return mtlbal.Balancer(trunk, at=trunk, aggregator=mtlbal.aggregation.MGDA(), **kw)
    else:
        raise ValueError(kind)
    bal = mtlbal.Balancer(trunk, **kw)
    bal.to(dtype=torch.float64)
    return bal


KINDS = ["uw", "famo", "uw-upgrad", "mgda-cut"]


def _run(rank: int, kind: str, no_sync: bool) -> dict[str, list[torch.Tensor]]:
    net = _model()
    ddp = nn.parallel.DistributedDataParallel(net)
    bal = _make(kind, net, MICRO)
    opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=0.1), bal)
    x, y = _data()
    xs, ys = x.chunk(WORLD)[rank].chunk(MICRO), y.chunk(WORLD)[rank].chunk(MICRO)
    for s in range(STEPS + 1):
        opt.zero_grad()
        for j in range(MICRO):
            quiet = no_sync and j < MICRO - 1
            with ddp.no_sync() if quiet else contextlib.nullcontext():
                info = opt.backward(_losses(ddp(xs[j]), ys[j]))
        assert not info.pending and info.micro_batches == MICRO
        if s < STEPS:
            opt.step()
            if kind == "famo":
                with torch.no_grad():
                    parts = [_losses(net(xs[j]), ys[j]) for j in range(MICRO)]
                    # this rank's mean over its micro-batches; update() takes the rank mean
                    bal.update({n: sum(p[n] for p in parts) / MICRO for n in parts[0]})
    return {
        "grads": [p.grad.clone() for p in net.parameters()],
        "strategy": [p.grad.clone() for p in bal.parameters()],
    }


def _worker(rank: int) -> dict[str, dict[str, list[torch.Tensor]]]:
    return {f"{k}-{ns}": _run(rank, k, ns) for k in KINDS for ns in (False, True)}


@pytest.fixture(scope="module")
def results(ddp_session: dict[str, Any]) -> list[dict[str, dict[str, list[torch.Tensor]]]]:
    return ddp_session[__name__]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test runs on POSIX")
@pytest.mark.parametrize("no_sync", [False, True], ids=["sync", "no_sync"])
@pytest.mark.parametrize("kind", KINDS)
def test_ddp_accumulation_matches_full_batch(
    results: list[dict[str, dict[str, list[torch.Tensor]]]], kind: str, no_sync: bool
) -> None:
    got = [r[f"{kind}-{no_sync}"] for r in results]
    for a, b in zip(got[0]["grads"], got[1]["grads"]):
        torch.testing.assert_close(a, b)
    net = _model()
    bal = _make(kind, net, 1)
    opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=0.1), bal)
    x, y = _data()
    for s in range(STEPS + 1):
        opt.zero_grad()
        opt.backward(_losses(net(x), y))
        if s < STEPS:
            opt.step()
            if kind == "famo":
                with torch.no_grad():
                    bal.update(_losses(net(x), y))
    for a, p in zip(got[0]["grads"], net.parameters()):
        torch.testing.assert_close(a, p.grad)
    for a, p in zip(got[0]["strategy"], bal.parameters()):
        torch.testing.assert_close(a, p.grad)
