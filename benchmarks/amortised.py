"""Cost of amortised balancing (``Balancer(solve_every=k)``) and of GradNorm at the parameters.

Three models, each a shared trunk and ``m`` linear heads (MSE losses, SGD):

* **MLP** 256→3×512 (ReLU), batch 256;
* **CNN** 4 × (conv 3×3 + BatchNorm + ReLU), 3→16→16→32→32 channels, 16×16 input, global
  average pooling, batch 32;
* **transformer** encoder, 2 layers, d = 128, 4 heads, feed-forward 256, 16 tokens, mean
  pooling, batch 32.

A step is ``zero_grad`` + forward + backward + ``optimizer.step()``. Variants: UPGrad at the
shared parameters (default engine) with ``solve_every = k`` for k = 1, 2, 5, 10, 20 (and with
``engine="dense"`` for k = 1, 10), and GradNorm
at the parameters with its norms from one backward per task (``engine="dense"``, the old path)
and from the layer-wise identity (the default engine). Timing: process CPU time
(``time.process_time``) on one thread; each round runs every variant for a block of ``steps``
steps (a multiple of every k, after a warm-up block, so that a block holds whole solve
cycles), each block right after a block of plain ``Σ_t L_t`` steps on its own copy of the
model; a round's ratio is the variant's mean step over the plain block's mean; the table gives
the median over the rounds (and the 25th–75th percentiles).

    PYTHONPATH=src python benchmarks/amortised.py [--rounds 5] [--steps 20] [--m 4]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import mtlbal

KS = (1, 2, 5, 10, 20)


class Pool(nn.Module):
    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=self.dims)


def mlp() -> tuple[nn.Module, int, Callable[[], Tensor]]:
    trunk = nn.Sequential(
        nn.Linear(256, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
    )
    return trunk, 512, lambda: torch.randn(256, 256)


def cnn() -> tuple[nn.Module, int, Callable[[], Tensor]]:
    layers: list[nn.Module] = []
    chans = (3, 16, 16, 32, 32)
    for a, b in itertools.pairwise(chans):
        layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
    trunk = nn.Sequential(*layers, Pool((2, 3)))
    return trunk, 32, lambda: torch.randn(32, 3, 16, 16)


def transformer() -> tuple[nn.Module, int, Callable[[], Tensor]]:
    layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
    trunk = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), Pool((1,)))
    return trunk, 128, lambda: torch.randn(32, 16, 128)


MODELS: dict[str, Callable[[], tuple[nn.Module, int, Callable[[], Tensor]]]] = {
    "MLP 256→3×512, batch 256": mlp,
    "CNN 4×(conv+BN), 16×16, batch 32": cnn,
    "transformer 2 layers d=128, 16 tokens, batch 32": transformer,
}


class Runner:
    def __init__(self, trunk: nn.Module, heads: nn.ModuleList, x: Tensor, ys: Tensor, kw: Any):
        self.trunk, self.heads, self.x, self.ys = trunk, heads, x, ys
        params = [*trunk.parameters(), *heads.parameters()]
        self.balancer = None if kw is None else mtlbal.Balancer(trunk, nonfinite="off", **kw)
        extra = [] if self.balancer is None else list(self.balancer.parameters())
        self.opt = torch.optim.SGD(params + extra, lr=1e-4)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        z = self.trunk(self.x)
        losses = [(h(z) - self.ys[t]).pow(2).mean() for t, h in enumerate(self.heads)]
        if self.balancer is None:
            torch.stack(losses).sum().backward()
        else:
            self.balancer.backward(losses)
        self.opt.step()


def variants(build: Callable[..., Any], m: int) -> dict[str, Runner]:
    torch.manual_seed(0)
    trunk0, width, data = build()
    heads0 = nn.ModuleList([nn.Linear(width, 8) for _ in range(m)])
    x = data()
    ys = torch.randn(m, x.shape[0], 8)
    out: dict[str, Runner] = {}

    def add(name: str, kw: Any) -> None:
        out[name] = Runner(copy.deepcopy(trunk0), copy.deepcopy(heads0), x, ys, kw)

    add("plain", None)
    for k in KS:
        add(
            f"UPGrad, solve_every={k}",
            {"aggregator": mtlbal.aggregation.UPGrad(), "solve_every": k},
        )
    for k in (1, 10):
        add(
            f"UPGrad engine='dense', solve_every={k}",
            {"aggregator": mtlbal.aggregation.UPGrad(), "solve_every": k, "engine": "dense"},
        )
    add(
        "GradNorm@params, per-task loop",
        {"weighting": mtlbal.weighting.GradNorm(m), "engine": "dense"},
    )
    add("GradNorm@params, layer-wise", {"weighting": mtlbal.weighting.GradNorm(m)})
    return out


def _block(r: Runner, steps: int) -> float:
    t0 = time.process_time()
    for _ in range(steps):
        r.step()
    return (time.process_time() - t0) / steps


def measure(build: Callable[..., Any], m: int, rounds: int, steps: int) -> dict[str, list[float]]:
    vs = variants(build, m)
    plain = vs.pop("plain")
    names = list(vs)
    for r in [plain, *vs.values()]:  # warm-up
        _block(r, steps)
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]  # rotated
        for n in order:
            base = _block(plain, steps)
            ratios[n].append(_block(vs[n], steps) / base)
    return ratios


def _q(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="steps per block (a multiple of 20)")
    ap.add_argument("--m", type=str, default="4", help="task counts, comma-separated")
    ap.add_argument("--models", type=str, default="", help="substrings of model names")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for m in (int(v) for v in args.m.split(",")):
        for name, build in MODELS.items():
            if args.models and not any(s in name for s in args.models.split(",")):
                continue
            ratios = measure(build, m, args.rounds, args.steps)
            print(f"\n### {name}, m = {m}\n")
            print("| variant | ratio to a plain step (median) | 25th–75th pct |")
            print("|---|---|---|")
            for n, rs in ratios.items():
                med = statistics.median(rs)
                print(f"| {n} | {med:.2f}× | {_q(rs, 0.25):.2f}–{_q(rs, 0.75):.2f} |", flush=True)


if __name__ == "__main__":
    main()
