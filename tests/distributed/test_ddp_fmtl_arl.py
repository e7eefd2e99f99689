"""F-MTL (a closure re-runs the DDP forward at perturbed parameters) and ARL (inverse-variance
branch coefficients from the global auxiliary losses) under DDP (gloo, 2 processes, equal
shards): training equals one process on the concatenated batch; the replicas stay bitwise equal.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _harness import WORLD
from torch import Tensor, nn

import mtlbal
from mtlbal.aggregation import FMTL, UPGrad
from mtlbal.transforms import ARL

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn tests run on POSIX"),
]

STEPS = 3
CONFIGS = ["fmtl-sum", "fmtl-upgrad-adaptive", "arl"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ea = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.eb = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.fuse = nn.Sequential(nn.Linear(10, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 1)])

    def forward(self, xa: Tensor, xb: Tensor) -> list[Tensor]:
        fa, fb = self.ea(xa), self.eb(xb)
        za, zb = torch.zeros_like(fa), torch.zeros_like(fb)
        outs = [h(self.fuse(torch.cat([fa, fb], 1))) for h in self.heads]
        # unimodal auxiliaries through the shared fusion and the first head (ARL)
        outs.append(self.heads[0](self.fuse(torch.cat([fa, zb], 1))))
        outs.append(self.heads[0](self.fuse(torch.cat([za, fb], 1))))
        return outs


def run(config: str, shard: int | None) -> dict[str, Any]:
    net = Net().double()
    model: nn.Module = net
    g = torch.Generator().manual_seed(1)
    xa, xb, y = (torch.randn(16, k, generator=g).double() for k in (3, 4, 2))
    if shard is not None:
        model = nn.parallel.DistributedDataParallel(net)
        xa, xb, y = (t.chunk(WORLD)[shard] for t in (xa, xb, y))
    shared = [net.ea, net.eb, net.fuse]

    def losses() -> dict[str, Tensor]:
        o = model(xa, xb)
        out = {f"t{i}": (i + 1.0) * (o[i][:, 0] - y[:, i]).pow(2).mean() for i in range(2)}
        if config == "arl":
            out["aux_a"] = (o[2][:, 0] - y[:, 0]).pow(2).mean()
            out["aux_b"] = (o[3][:, 0] - y[:, 0]).pow(2).mean()
        return out

    if config == "arl":
        bal = mtlbal.Balancer(shared, branches=ARL([net.ea, net.eb], aux_tasks=["aux_a", "aux_b"]))
    elif config == "fmtl-sum":
        bal = mtlbal.Balancer(shared, aggregator=FMTL(rho=0.1))
    else:
        bal = mtlbal.Balancer(shared, aggregator=FMTL(UPGrad(), rho=0.5, adaptive=True))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    extras = []
    for _ in range(STEPS):
        opt.zero_grad()
        closure = None if config == "arl" else losses
        info = bal.backward(losses(), closure=closure)
        opt.step()
        key = "branch_weights" if config == "arl" else "flat_norms"
        extras.append(info.extras[key].detach().clone())
    return {"params": [p.detach().clone() for p in net.parameters()], "extras": extras}


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


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_one_process(results: list[dict[str, Any]], config: str) -> None:
    ranks = [r[config] for r in results]
    for r, res in enumerate(ranks):
        assert "error" not in res, f"rank {r}: {res['error']}"
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    ref = run(config, None)
    for res in ranks:
        torch.testing.assert_close(res["extras"], ref["extras"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res["params"], ref["params"], rtol=1e-10, atol=1e-12)
