"""Quick start: three tasks on one shared trunk, uncertainty weighting + MGDA-UB at the trunk.

Run: ``python examples/quickstart.py`` (a few seconds on a CPU; ``--steps 50`` for fewer steps).
examples/plain_loop.py is a fuller loop: a DataLoader, epochs, evaluation, logging, a checkpoint.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import mtlbal


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.heads = nn.ModuleDict(
            {"price": nn.Linear(32, 1), "volume": nn.Linear(32, 1), "label": nn.Linear(32, 3)}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {name: head(z) for name, head in self.heads.items()}


def main(steps: int = 200, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model = Net()
    balancer = mtlbal.Balancer(
        shared=model.trunk,
        weighting=mtlbal.weighting.UncertaintyWeighting(
            num_tasks=3, task_types=["regression", "regression", "classification"]
        ),
        aggregator=mtlbal.aggregation.MGDA(),
        at=model.trunk,  # a cut point: per-task gradients at the trunk's output (MGDA-UB)
    )
    opt = mtlbal.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3), balancer)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    x = torch.randn(512, 10)
    targets = {
        "price": x[:, :3].sum(1, keepdim=True),
        "volume": 100.0 * x[:, 3:5].prod(1, keepdim=True),  # a much larger loss scale
        "label": (x[:, 5] > 0).long() + (x[:, 6] > 1).long(),
    }
    mse, ce = nn.MSELoss(), nn.CrossEntropyLoss()
    info = None
    for step in range(steps):
        idx = torch.randint(0, 512, (64,))
        out = model(x[idx])
        losses = {
            "price": mse(out["price"], targets["price"][idx]),
            "volume": mse(out["volume"], targets["volume"][idx]),
            "label": ce(out["label"], targets["label"][idx]),
        }
        opt.zero_grad()
        info = opt.backward(losses)
        opt.step()
        sched.step()
        if step % 50 == 0:
            weights = ", ".join(f"{t}={w:.3f}" for t, w in zip(info.tasks, info.weights.tolist()))
            print(f"step {step:4d}  weights: {weights}")
    checkpoint = opt.state_dict()  # the optimizer's and the balancer's state, together
    assert "mtlbal" in checkpoint and info is not None
    return dict(zip(info.tasks, info.losses.tolist()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(main(steps=args.steps, seed=args.seed))
    print("quickstart: OK")
