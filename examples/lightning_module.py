"""A LightningModule with automatic optimization, balanced by one change of base class.

Subclass ``mtlbal.integrations.lightning.BalancedLightningModule`` instead of
``LightningModule``; ``training_step`` returns the per-task losses as a dict and
``configure_optimizers`` returns ``mtlbal.wrap(optimizer, balancer)`` (here with an LR
scheduler). Lightning does the rest: the mixin's ``backward`` hands the losses to the balancer,
the wrapped optimizer also steps uncertainty weighting's log-variances, and the balancer's state
lives in the optimizer's ``state_dict``, so the Trainer's checkpoints carry it.

Two tasks on synthetic data: a regression and a 4-class classification. Uncertainty weighting
at the loss level, MGDA at the trunk's output (a cut point: one backward through the trunk).

Needs ``pip install lightning``. Run (a few seconds on a CPU, nothing to download)::

    python examples/lightning_module.py              # 60 steps
    python examples/lightning_module.py --steps 10
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import mtlbal
from mtlbal.integrations.lightning import BalancedLightningModule


class TwoTasks(BalancedLightningModule):
    def __init__(self, max_steps: int) -> None:
        super().__init__()
        self.max_steps = max_steps
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
        self.reg_head = nn.Linear(16, 1)
        self.cls_head = nn.Linear(16, 4)
        self.balancer = mtlbal.Balancer(
            self.trunk,
            weighting=mtlbal.weighting.UncertaintyWeighting(
                2, task_types=["regression", "classification"]
            ),
            aggregator=mtlbal.aggregation.MGDA(),
            at=self.trunk,
        )

    def losses(self, batch: tuple[Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
        x, target, label = batch
        z = self.trunk(x)
        return {
            "reg": nn.functional.mse_loss(self.reg_head(z), target),
            "cls": nn.functional.cross_entropy(self.cls_head(z), label),
        }

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Any:
        return self.losses(batch)  # {task: loss}: the mixin balances them

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self.log_dict({f"val_{k}": v for k, v in self.losses(batch).items()})

    def configure_optimizers(self) -> Any:
        opt = mtlbal.wrap(torch.optim.AdamW(self.parameters(), lr=1e-2), self.balancer)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_data(n: int, generator: torch.Generator) -> TensorDataset:
    x = torch.randn(n, 8, generator=generator)
    target = torch.sin(x[:, :2]).sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=generator)
    label = (x[:, 2] > 0).long() * 2 + (x[:, 3] > 0).long()
    return TensorDataset(x, target, label)


def fmt(values: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.3g}" for k, v in values.items())


def main(steps: int = 60, seed: int = 0) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    g = torch.Generator().manual_seed(seed)
    train, val = make_data(512, g), make_data(256, g)
    model = TwoTasks(max_steps=steps)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    val_loader = DataLoader(val, batch_size=256)

    def validate() -> dict[str, float]:
        return {
            k: float(v) for k, v in trainer.validate(model, val_loader, verbose=False)[0].items()
        }

    before = validate()
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True, generator=g))
    after = validate()

    info = model.balancing_info  # the last step's StepInfo
    assert info is not None and model.balancer.step_count == steps
    print(f"before  {fmt(before)}")
    print(f"after   {fmt(after)}")
    weights = dict(zip(info.tasks, info.weights.tolist()))
    print(f"last step's task weights (uncertainty x MGDA): {fmt(weights)}")
    for task in ("val_reg", "val_cls"):
        assert after[task] < before[task], (task, before[task], after[task])
    print(f"lightning_module: OK  {model.balancer.step_count} steps")
    return after


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed)
