"""Every registered strategy under DDP (gloo, 2 processes, equal shards) equals one process on
the concatenated batch, over several steps: the reported weights at every step and the
parameters at the end, at the parameters and at a cut point.

One pair of processes runs every registry entry (the worker loops over them and returns the
results); the single-process reference is computed here, in the test process.
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
from registry import REGISTRY, Entry, feed_validation

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn tests run on POSIX"),
]

M = 3
STEPS = 6  # epoch_every=2: three epochs, so IGB v2's agent acts (start_epoch=2) and trains
N = 16
# beyond the registry: MGDA's loss normalisations (the losses are the global ones)
EXTRA = [
    Entry("MGDA-loss", lambda m: {"aggregator": mtlbal.aggregation.MGDA(normalization="loss")}),
    Entry("MGDA-loss+", lambda m: {"aggregator": mtlbal.aggregation.MGDA(normalization="loss+")}),
    # per-task gradients formed for the diagnostics only (a loss-level strategy)
    Entry(
        "UW-diagnostics",
        lambda m: {"weighting": mtlbal.weighting.UncertaintyWeighting(m), "diagnostics": True},
    ),
]


def _ddp_supported(e: Entry, at: str) -> bool:
    # a Jacobian aggregator (TrimmedMean, GradDrop) at a cut point needs the representation
    # Jacobian of the whole batch, which is not gathered across processes: the Balancer refuses
    # it (NotImplementedError); at the parameters it runs like any other
    if not e.extras.get("ddp", True):  # documented as not equal to one process
        return False
    agg = e.make(M).get("aggregator")
    jac = agg is not None and not isinstance(agg, mtlbal.aggregation.GramianAggregator)
    return not (at == "cut" and jac)


CASES = [(e, at) for e in [*REGISTRY, *EXTRA] for at in e.at if _ddp_supported(e, at)]
# rank 1 passes its dict in reversed order at every step: rank 0's order is the canonical one
REVERSED = ["UW+PCGrad", "GradNorm", "FAMO", "IGBv1+AlignedMTL", "DWA"]
REVERSED_CASES = [(e, at) for e, at in CASES if e.name in REVERSED]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(M)])

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [h(z) for h in self.heads]


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 5, generator=g).double(), torch.randn(N, M, generator=g).double()


def _losses(outs: list[Tensor], y: Tensor) -> dict[str, Tensor]:
    # positive (IGB takes logs), differently scaled per task
    return {
        f"t{i}": (i + 1.0) * (o[:, 0] - y[:, i]).pow(2).mean() + 0.1 * (i + 1)
        for i, o in enumerate(outs)
    }


def run(entry: Entry, at: str, shard: int | None, reverse: bool = False) -> dict[str, Any]:
    """``STEPS`` steps of ``entry``; ``shard=None``: one process on the full batch.
    ``reverse``: rank 1 gives its losses in reversed order."""
    torch.manual_seed(0)
    net = Net().double()
    model: nn.Module = net
    x, y = _data()
    if shard is not None:
        model = nn.parallel.DistributedDataParallel(net)
        x, y = x.chunk(WORLD)[shard], y.chunk(WORLD)[shard]
    where = "params" if at == "params" else net.trunk
    bal = mtlbal.Balancer(net.trunk, at=where, **entry.make(M))
    opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), bal)

    def losses() -> dict[str, Tensor]:
        out = _losses(model(x), y)
        return dict(reversed(out.items())) if reverse and shard == 1 else out

    weights, grams = [], []
    for k in range(STEPS):
        opt.zero_grad()
        info = opt.backward(losses())
        opt.step()
        if entry.extras.get("update_after_step"):
            with torch.no_grad():
                bal.update(losses())
        feed_validation(entry, bal, losses, k)
        weights.append(info.weights.detach().clone())
        grams.append(torch.zeros(M, M) if info.gramian is None else info.gramian.clone())
        if entry.epoch_every and (k + 1) % entry.epoch_every == 0:
            bal.epoch_end()
    return {
        "weights": torch.stack(weights),
        "gramians": torch.stack(grams),
        "params": [p.detach().clone() for p in net.parameters()],
        "strategy": [p.detach().clone() for p in bal.parameters()],
    }


def _worker(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for entry, at in CASES:
        try:
            out[f"{entry.name}@{at}"] = run(entry, at, rank)
        except Exception as e:  # reported per case by the test
            out[f"{entry.name}@{at}"] = {"error": f"{type(e).__name__}: {e}"}
    for entry, at in REVERSED_CASES:
        try:
            out[f"{entry.name}@{at}/reversed"] = run(entry, at, rank, reverse=True)
        except Exception as e:
            out[f"{entry.name}@{at}/reversed"] = {"error": f"{type(e).__name__}: {e}"}
    return out


@pytest.fixture(scope="module")
def ddp_results(ddp_session: dict[str, Any]) -> list[dict[str, Any]]:
    return ddp_session[__name__]


def _close(a: Tensor, b: Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def _check(ddp_results: list[dict[str, Any]], key: str, entry: Entry, at: str) -> None:
    ranks = [r[key] for r in ddp_results]
    for r, res in enumerate(ranks):
        assert "error" not in res, f"rank {r}: {res['error']}"
    # the ranks stay bitwise in sync (DDP never re-broadcasts the parameters: a one-ulp
    # difference in the weights would make the replicas drift apart)
    for what in ("weights", "gramians", "params", "strategy"):
        a, b = ranks[0][what], ranks[1][what]
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"the ranks differ ({what})")
    ref = run(entry, at, None)
    for r, res in enumerate(ranks):
        _close(res["weights"], ref["weights"], f"rank {r} weights")
        _close(res["gramians"], ref["gramians"], f"rank {r} Gramians")
        for i, (a, b) in enumerate(zip(res["params"], ref["params"])):
            _close(a, b, f"rank {r} parameter {i}")
        for i, (a, b) in enumerate(zip(res["strategy"], ref["strategy"])):
            _close(a, b, f"rank {r} strategy parameter {i}")


@pytest.mark.parametrize(("entry", "at"), CASES, ids=[f"{e.name}@{at}" for e, at in CASES])
def test_registry_matches_one_process(
    ddp_results: list[dict[str, Any]], entry: Entry, at: str
) -> None:
    _check(ddp_results, f"{entry.name}@{at}", entry, at)


@pytest.mark.parametrize(
    ("entry", "at"), REVERSED_CASES, ids=[f"{e.name}@{at}" for e, at in REVERSED_CASES]
)
def test_dict_order_per_rank_matches_one_process(
    ddp_results: list[dict[str, Any]], entry: Entry, at: str
) -> None:
    """Rank 1's dict is in reversed order at every step (the first step included): the result
    is one process's, in rank 0's order."""
    _check(ddp_results, f"{entry.name}@{at}/reversed", entry, at)
