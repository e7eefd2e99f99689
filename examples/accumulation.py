"""Gradient accumulation: four micro-batches per optimizer step, balanced as one large batch.

A balanced step depends on the batch's per-task gradients, so summing four separately balanced
micro-batches is not the balanced step of the batch of 64. ``Balancer(accumulate=4)`` keeps the
micro-batches' sums and solves once when the fourth arrives. The script checks that the result
equals one step on the whole batch (Aligned-MTL at the shared parameters, FAMO's loss weights).

Run: ``python examples/accumulation.py [--steps N]``
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import mtlbal


def make_model() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "trunk": nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh()),
            "heads": nn.ModuleList([nn.Linear(32, 1) for _ in range(3)]),
        }
    ).double()


def losses_of(model: nn.ModuleDict, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    z = model["trunk"](x)
    scales = (1.0, 10.0, 0.1)  # tasks on different scales
    return {
        f"task{i}": s * (head(z)[:, 0] - y[:, i]).pow(2).mean() + 0.5
        for i, (head, s) in enumerate(zip(model["heads"], scales))
    }


def balanced(model: nn.ModuleDict, accumulate: int) -> mtlbal.BalancedOptimizer:
    balancer = mtlbal.Balancer(
        model["trunk"],
        weighting=mtlbal.weighting.FAMO(3),
        aggregator=mtlbal.aggregation.AlignedMTL(),
        accumulate=accumulate,
    )
    return mtlbal.wrap(torch.optim.SGD(model.parameters(), lr=0.05), balancer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10, generator=g, dtype=torch.float64)
    y = torch.randn(64, 3, generator=g, dtype=torch.float64)

    small = make_model()
    large = copy.deepcopy(small)
    opt_small, opt_large = balanced(small, accumulate=4), balanced(large, accumulate=1)

    for _ in range(args.steps):
        # four micro-batches of 16: nothing is written until the fourth
        opt_small.zero_grad()
        for xm, ym in zip(x.chunk(4), y.chunk(4)):
            info = opt_small.backward(losses_of(small, xm, ym))
        assert not info.pending and info.micro_batches == 4
        opt_small.step()
        with torch.no_grad():  # FAMO learns from the losses after the step (the window's mean)
            after = [losses_of(small, xm, ym) for xm, ym in zip(x.chunk(4), y.chunk(4))]
            opt_small.balancer.update({k: sum(d[k] for d in after) / 4 for k in after[0]})

        # the same steps on the batch of 64
        opt_large.zero_grad()
        opt_large.backward(losses_of(large, x, y))
        opt_large.step()
        with torch.no_grad():
            opt_large.balancer.update(losses_of(large, x, y))

    diff = max((a - b).abs().max().item() for a, b in zip(small.parameters(), large.parameters()))
    final = {k: round(v.item(), 4) for k, v in losses_of(small, x, y).items()}
    print(f"{args.steps} optimizer steps of 4 micro-batches; losses {final}")
    print(f"max |accumulated - large batch| over the parameters: {diff:.1e}")
    assert diff < 1e-9, diff
    print("accumulation: OK")


if __name__ == "__main__":
    main()
