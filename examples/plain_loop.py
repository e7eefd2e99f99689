"""A plain PyTorch training loop with ``mtlbal.wrap``: epochs, evaluation, logging, a checkpoint.

Three tasks share one trunk: two regressions on very different scales and a 3-class
classification. The losses are balanced at the loss level by Dynamic Weight Averaging (which
reads each epoch's mean losses, hence ``balancer.epoch_end()``) and at the gradient level by
UPGrad at the shared parameters. Each epoch logs the task weights through a ``DictHook`` (swap
the callback for ``wandb.log``, MLflow or a CSV writer) and evaluates on held-out data; at the
end one ``state_dict`` of the wrapped optimizer (the optimizer's and the balancer's state)
restores a fresh copy of the run.

Run (a few seconds on a CPU; synthetic data, nothing to download)::

    python examples/plain_loop.py            # 8 epochs
    python examples/plain_loop.py --epochs 2
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import mtlbal


class Net(nn.Module):
    """A shared trunk and one head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.heads = nn.ModuleDict(
            {"price": nn.Linear(32, 1), "volume": nn.Linear(32, 1), "label": nn.Linear(32, 3)}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {name: head(z) for name, head in self.heads.items()}


def make_data(n: int, generator: torch.Generator) -> TensorDataset:
    x = torch.randn(n, 10, generator=generator)
    price = x[:, :3].sum(1, keepdim=True)
    volume = 10.0 * x[:, 3:5].prod(1, keepdim=True)  # a loss ~100 times the others
    label = (x[:, 5] > 0).long() + (x[:, 6] > 1).long()
    return TensorDataset(x, price, volume, label)


def task_losses(
    out: dict[str, Tensor], price: Tensor, volume: Tensor, label: Tensor
) -> dict[str, Tensor]:
    return {
        "price": nn.functional.mse_loss(out["price"], price),
        "volume": nn.functional.mse_loss(out["volume"], volume),
        "label": nn.functional.cross_entropy(out["label"], label),
    }


def fmt(values: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.3g}" for k, v in values.items())


def build() -> tuple[Net, mtlbal.BalancedOptimizer]:
    model = Net()
    balancer = mtlbal.Balancer(
        shared=model.trunk,
        weighting=mtlbal.weighting.DWA(num_tasks=3),
        aggregator=mtlbal.aggregation.UPGrad(),
    )
    opt = mtlbal.wrap(torch.optim.Adam(model.parameters(), lr=3e-3), balancer)
    return model, opt


@torch.no_grad()
def evaluate(model: Net, data: TensorDataset) -> dict[str, float]:
    model.eval()
    x, price, volume, label = data.tensors
    out = model(x)
    result = {name: float(v) for name, v in task_losses(out, price, volume, label).items()}
    result["accuracy"] = float((out["label"].argmax(1) == label).float().mean())
    model.train()
    return result


def main(epochs: int = 8, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, val = make_data(1024, g), make_data(256, g)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=g)

    model, opt = build()
    logged: list[tuple[int, dict[str, float]]] = []
    # every 16th step's StepInfo (weights, norms, ...) as a flat dict of floats
    opt.balancer.register_hook(
        mtlbal.logging.DictHook(lambda d, s: logged.append((s, d)), every=16)
    )

    first = evaluate(model, val)
    print(f"before   val {fmt(first)}")
    for epoch in range(epochs):
        for x, price, volume, label in loader:
            losses = task_losses(model(x), price, volume, label)
            opt.zero_grad()
            opt.backward(losses)  # fills .grad of every parameter; returns a StepInfo
            opt.step()
        opt.balancer.epoch_end()  # DWA's weights for the next epoch come from this one's losses
        step, scalars = logged[-1]
        dwa = {
            k.split("/")[-1]: v for k, v in scalars.items() if k.startswith("mtlbal/loss_weight/")
        }
        print(
            f"epoch {epoch}  val {fmt(evaluate(model, val))}  | step {step} DWA weights {fmt(dwa)}"
        )
    last = evaluate(model, val)
    steps = opt.balancer.step_count

    # one checkpoint holds the model, the optimizer and the balancer (DWA's epoch statistics,
    # the step counter): a fresh run restored from it continues exactly
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.pt")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        checkpoint = torch.load(path)
    model2, opt2 = build()
    model2.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    assert opt2.balancer.step_count == steps == epochs * len(loader)
    x, price, volume, label = train[:64]
    for m, o in ((model, opt), (model2, opt2)):  # one more step, the same for both
        o.zero_grad()
        o.backward(task_losses(m(x), price, volume, label))
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))

    for task in ("price", "volume", "label"):
        assert last[task] < first[task], (task, first[task], last[task])
    print(f"plain_loop: OK  {steps} steps, val {fmt(last)}; the resumed run steps identically")
    return last


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(epochs=args.epochs, seed=args.seed)
