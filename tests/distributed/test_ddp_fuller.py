"""FULLER's modality level under DDP (gloo, 2 processes): the branch calibration sees the
global gradient at the branch outputs, so training equals one process on the concatenated
batch, and the replicas stay bitwise in sync."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _harness import WORLD
from torch import Tensor, nn

from mtlbal.presets import fuller

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn tests run on POSIX"),
]

STEPS = 4
# (task cut, per_sample, target)
CONFIGS = {
    "modality": (False, False, "mean"),
    "both": (True, False, "mean"),
    "both-fixed": (True, False, 0.5),
    "per-sample-fixed": (True, True, 0.5),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cam = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
        self.lid = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.fuse = nn.Sequential(nn.Linear(12, 7), nn.Tanh())
        self.last = nn.Linear(7, 5)
        self.heads = nn.ModuleList([nn.Linear(5, 1), nn.Linear(5, 1)])

    def forward(self, xc: Tensor, xl: Tensor) -> list[Tensor]:
        z = self.last(self.fuse(torch.cat([self.cam(xc), self.lid(xl)], dim=-1)))
        return [h(z) for h in self.heads]


def run(config: str, shard: int | None) -> dict[str, Any]:
    cut, per_sample, target = CONFIGS[config]
    net = Net().double()
    model: nn.Module = net
    g = torch.Generator().manual_seed(1)
    xc, xl, y = (torch.randn(16, k, generator=g).double() for k in (3, 4, 2))
    if shard is not None:
        model = nn.parallel.DistributedDataParallel(net)
        xc, xl, y = (t.chunk(WORLD)[shard] for t in (xc, xl, y))
    bal = fuller(
        [net.cam, net.lid, net.fuse, net.last],
        net.last if cut else None,
        [net.cam, net.lid],
        target=target,
        per_sample=per_sample,
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    norms = []
    for _ in range(STEPS):
        opt.zero_grad()
        outs = model(xc, xl)
        info = bal.backward(
            {f"t{i}": (i + 1.0) * (o[:, 0] - y[:, i]).pow(2).mean() for i, o in enumerate(outs)}
        )
        opt.step()
        norms.append(info.extras["branch_norms"].detach().clone())
    return {"params": [p.detach().clone() for p in net.parameters()], "norms": norms}


def _worker(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for config in CONFIGS:
        try:
            out[config] = run(config, rank)
        except Exception as e:
            out[config] = {"error": f"{type(e).__name__}: {e}"}
    return out


@pytest.fixture(scope="module")
def results(ddp_session: dict[str, Any]) -> list[dict[str, Any]]:
    return ddp_session[__name__]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fuller_matches_one_process(results: list[dict[str, Any]], config: str) -> None:
    ranks = [r[config] for r in results]
    for r, res in enumerate(ranks):
        assert "error" not in res, f"rank {r}: {res['error']}"
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    ref = run(config, None)
    for res in ranks:
        torch.testing.assert_close(res["params"], ref["params"], rtol=1e-10, atol=1e-12)
