"""DDP on CPU (gloo, 2 processes): the gradients equal single-process full-batch training."""

from __future__ import annotations

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


def _model(seed: int = 0) -> tuple[nn.Module, nn.Module, nn.ModuleList]:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(M)])

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.heads = trunk, heads

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            z = self.trunk(x)
            return [h(z) for h in self.heads]

    return Net().double(), trunk, heads


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=g).double(), torch.randn(16, M, generator=g).double()


def _losses(outs: list[torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"t{i}": (i + 1.0) * (o[:, 0] - y[:, i]).pow(2).mean() for i, o in enumerate(outs)}


def _make(kind: str, net: nn.Module) -> mtlbal.Balancer:
    trunk = net.trunk
    if kind == "mgda-cut":
        return mtlbal.Balancer(trunk, at=trunk, aggregator=mtlbal.aggregation.MGDA())
    if kind == "uw":
        return mtlbal.Balancer(trunk, weighting=mtlbal.weighting.UncertaintyWeighting(M))
    if kind == "uw-pcgrad-params":
        return mtlbal.Balancer(
            trunk,
            weighting=mtlbal.weighting.UncertaintyWeighting(M),
            aggregator=mtlbal.aggregation.PCGrad(seed=0),
        )
    raise ValueError(kind)


KINDS = ["mgda-cut", "uw", "uw-pcgrad-params"]


def _run(rank: int, kind: str) -> dict[str, list[torch.Tensor]]:
    net, _, _ = _model()
    ddp = nn.parallel.DistributedDataParallel(net)
    bal = _make(kind, net)
    opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=0.1), bal)
    x, y = _data()
    xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
    for _ in range(STEPS):  # several steps: DDP accepts the next forward after ours
        opt.zero_grad()
        opt.backward(_losses(ddp(xs), ys))
        opt.step()
    opt.zero_grad()
    opt.backward(_losses(ddp(xs), ys))
    grads = [p.grad.clone() for p in net.parameters()]
    sgrads = [p.grad.clone() for p in bal.parameters()]
    return {"grads": grads, "strategy": sgrads}


def _worker(rank: int) -> dict[str, dict[str, list[torch.Tensor]]]:
    return {kind: _run(rank, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def results(ddp_session: dict[str, Any]) -> list[dict[str, dict[str, list[torch.Tensor]]]]:
    return ddp_session[__name__]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test runs on POSIX")
@pytest.mark.parametrize("kind", KINDS)
def test_ddp_matches_full_batch(
    results: list[dict[str, dict[str, list[torch.Tensor]]]], kind: str
) -> None:
    results = [r[kind] for r in results]
    # every rank holds the same gradients
    for a, b in zip(results[0]["grads"], results[1]["grads"]):
        torch.testing.assert_close(a, b)
    # and they are the single-process full-batch gradients (mean losses over the global batch)
    net, _, _ = _model()
    bal = _make(kind, net)
    opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=0.1), bal)
    x, y = _data()
    for _ in range(STEPS):
        opt.zero_grad()
        opt.backward(_losses(net(x), y))
        opt.step()
    opt.zero_grad()
    opt.backward(_losses(net(x), y))
    for a, p in zip(results[0]["grads"], net.parameters()):
        torch.testing.assert_close(a, p.grad)
    for a, p in zip(results[0]["strategy"], bal.parameters()):
        torch.testing.assert_close(a, p.grad)
