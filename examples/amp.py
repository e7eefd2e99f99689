"""Mixed precision: bf16 autocast, and fp16 autocast with a ``GradScaler``.

The forward runs under ``torch.autocast``; the losses go to ``opt.backward`` as usual.

- **bf16** needs no scaler: ``opt.backward(losses)``.
- **fp16** needs a ``torch.amp.GradScaler``: pass it, ``opt.backward(losses, scaler=scaler)``,
  then ``scaler.step(opt)`` and ``scaler.update()`` in place of ``opt.step()``. The strategies
  see the *unscaled* losses and Gramian; ``.grad`` holds the scaled gradients the scaler
  unscales and checks. A step whose gradients overflow is skipped (``info.skipped``; no
  strategy state changes) and the scaler lowers its scale, exactly as for a plain
  ``scaler.scale(loss).backward()``. Here the scaler starts at a deliberately large scale
  (2^24) so that the first steps overflow and you can see that happen.

Uncertainty weighting at the loss level, MGDA at the trunk's output (a cut point, where the
per-task gradients are fp16 and their Gramian is formed in float32). Runs on a GPU when one is
there, else on the CPU (``torch.amp.GradScaler("cpu")`` needs a recent torch; without it the
fp16 part is left out).

Run (a few seconds on a CPU; synthetic data)::

    python examples/amp.py              # 60 steps each
    python examples/amp.py --steps 10
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import mtlbal


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.heads = nn.ModuleList([nn.Linear(64, 1), nn.Linear(64, 1)])

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z) for head in self.heads]


def task_losses(
    model: Net, x: Tensor, y: Tensor, device: str, dtype: torch.dtype
) -> dict[str, Tensor]:
    with torch.autocast(device, dtype=dtype):
        out = model(x)
    # the losses in float32, outside autocast
    return {
        "sum": nn.functional.mse_loss(out[0].float()[:, 0], y[:, 0]),
        "tanh": nn.functional.mse_loss(out[1].float()[:, 0], y[:, 1]),
    }


def train(steps: int, device: str, dtype: torch.dtype, use_scaler: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model = Net().to(device)
    balancer = mtlbal.Balancer(
        model.trunk,
        weighting=mtlbal.weighting.UncertaintyWeighting(2),
        aggregator=mtlbal.aggregation.MGDA(),
        at=model.trunk,
    )
    opt = mtlbal.wrap(torch.optim.AdamW(model.parameters(), lr=3e-3), balancer)
    opt.to(device)  # the strategies' parameters and state follow the model
    scaler = torch.amp.GradScaler(device, init_scale=2.0**24) if use_scaler else None

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 16, generator=g)
    y = torch.stack([x[:, :4].sum(1), 3.0 * torch.tanh(x[:, 4]) + x[:, 5]], 1)
    x, y = x.to(device), y.to(device)

    def full_data_loss() -> float:
        with torch.no_grad():
            return float(sum(task_losses(model, x, y, device, dtype).values()))

    before = full_data_loss()
    skipped = 0
    for step in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g).to(device)
        losses = task_losses(model, x[idx], y[idx], device, dtype)
        opt.zero_grad()
        if scaler is None:
            info = opt.backward(losses)
            opt.step()
        else:
            info = opt.backward(losses, scaler=scaler)
            scaler.step(opt)  # unscales; skips the step if any gradient overflowed
            scaler.update()  # ... and then lowers the scale
        skipped += int(info.skipped)
        if step % 20 == 0 or step == steps - 1:
            scale = f"  scale {scaler.get_scale():.0f}" if scaler is not None else ""
            print(
                f"  step {step:3d}  batch loss {float(info.losses.sum()):.3f}  "
                f"skipped={info.skipped}{scale}"
            )
    after = full_data_loss()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if steps - skipped >= 10:  # enough steps taken to have learned something
        assert after < before, (before, after)
    result = {"loss before": before, "loss after": after, "skipped steps": skipped}
    if scaler is not None:
        assert skipped > 0 and scaler.get_scale() < 2.0**24  # the overflowing steps were skipped
        result["final scale"] = scaler.get_scale()
    return result


def fmt(values: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in values.items())


def main(steps: int = 60, device: str | None = None) -> None:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"bf16 autocast on {device}, no scaler")
    bf16 = train(steps, device, torch.bfloat16, use_scaler=False)
    print(f"  -> {fmt(bf16)}")
    if hasattr(torch.amp, "GradScaler"):
        print(f"fp16 autocast on {device}, GradScaler")
        fp16 = train(steps, device, torch.float16, use_scaler=True)
        print(f"  -> {fmt(fp16)}")
    else:
        print("fp16 left out: this torch has no torch.amp.GradScaler")
    print("amp: OK")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args()
    main(steps=args.steps, device=args.device)
