"""Gradient-conflict incidence with and without a sparse-training mask (Zhang et al. 2024).

The sparse-training paper (arXiv:2411.18615) reports the share of task pairs whose shared
gradients have a negative cosine, averaged over all iterations and over the last 50%, and finds
that training a fixed subset of the shared parameters lowers it. This suite measures the same
statistic (``StepInfo.conflict``, ``Balancer(diagnostics=True)``, collected by
:class:`~mtlbal.diagnostics.ConflictIncidence`) on one model trained with and without a
:class:`~mtlbal.transforms.SparseMask`, under equal weights and under two gradient methods
(MGDA, PCGrad).

Data. ``x ~ N(0, I₁₆)``, a random teacher layer ``h = tanh(x W)`` (32 units) and three
regression tasks ``y_t = h v_t + 0.1 ε`` with ``v₂ = −0.6 v₁ + 0.8 r₂`` (partly opposed to task 1)
and ``v₃ = r₃`` (unrelated): a problem with built-in conflict.

Model: trunk 16→64→64 (ReLU), three linear heads; Adam (lr 1e-3), batch 32. The mask is the
paper's PSN selection on the random initial weights, keeping 40% of every neuron's inputs
(``SparseMask(ratio=0.4)``; the paper reports ≈60% trainable for randomly initialised MTAN,
biases stay trainable). Under a mask the cosines are those of the masked gradients (the mask
acts before aggregation and statistics).

Reported: conflict incidence (% of pairs, mean over all steps and over the last half), the mean
test NMSE over the tasks (test MSE / Var(y)), the trainable share of the trunk, ms per step.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import mtlbal
from benchmarks.common import save_suite_result
from benchmarks.metrics import mean_std
from mtlbal.aggregation import MGDA, PCGrad
from mtlbal.diagnostics import ConflictIncidence
from mtlbal.transforms import SparseMask

NAME = "conflict"
RATIO = 0.4
METHODS = ["equal", "MGDA", "PCGrad"]


class Problem:
    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(20_000 + seed)
        self.w = torch.randn(16, 32, generator=g) / 4
        v1 = torch.randn(32, generator=g)
        v2 = -0.6 * v1 + 0.8 * torch.randn(32, generator=g)
        v3 = torch.randn(32, generator=g)
        self.v = torch.stack([v1, v2, v3], dim=1) / 32**0.5

    def sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, 16, generator=g)
        y = torch.tanh(x @ self.w) @ self.v + 0.1 * torch.randn(n, 3, generator=g)
        return x, y


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(64, 1) for _ in range(3)])

    def forward(self, x: Tensor) -> Tensor:
        z = self.trunk(x)
        return torch.cat([h(z) for h in self.heads], dim=1)


def run_one(method: str, masked: bool, seed: int, steps: int, device: str) -> dict[str, float]:
    prob = Problem(seed)
    torch.manual_seed(seed)
    net = Net().to(device)
    agg = {"equal": None, "MGDA": MGDA(), "PCGrad": PCGrad(seed=seed)}[method]
    mask = SparseMask(ratio=RATIO) if masked else None
    balancer = mtlbal.Balancer(
        net.trunk, aggregator=agg, transforms=mask, diagnostics=True, nonfinite="off"
    )
    tracker = ConflictIncidence()
    balancer.register_hook(tracker)
    opt = mtlbal.wrap(torch.optim.Adam(net.parameters(), lr=1e-3), balancer)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = (t.to(device) for t in prob.sample(32, g))
        out = net(x)
        losses = [(out[:, t] - y[:, t]).pow(2).mean() for t in range(3)]
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
    ms = 1000 * (time.perf_counter() - t0) / steps
    x, y = (t.to(device) for t in prob.sample(4000, torch.Generator().manual_seed(999_999)))
    with torch.no_grad():
        nmse = float(((net(x) - y).pow(2).mean(0) / y.var(0)).mean())
    s = tracker.summary()
    return {
        "conflict_pct": 100 * s["mean"],
        "conflict_last_half_pct": 100 * s["last_half"],
        "nmse": nmse,
        "trainable": 1.0 if mask is None else mask.trainable_fraction(),
        "ms_per_step": ms,
    }


def run(
    *,
    seeds: list[int],
    quick: bool,
    device: str = "cpu",
    out_dir: pathlib.Path | None = None,
    progress: Callable[[str], None] | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """Every method with and without the mask on every seed; ``{"name", "rows", "markdown"}``."""
    steps = steps if steps is not None else (300 if quick else 2000)
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # tiny models: more threads only add contention
    rows: list[dict[str, Any]] = []
    try:
        for method in METHODS:
            for masked in (False, True):
                rs = []
                for seed in seeds:
                    rs.append(run_one(method, masked, seed, steps, device))
                    if progress is not None:
                        progress(f"{NAME}: {method} mask={masked} seed {seed} done")
                row: dict[str, Any] = {
                    "method": method,
                    "mask": f"PSN {int(RATIO * 100)}%/neuron" if masked else "none",
                    "seeds": len(rs),
                    "steps": steps,
                }
                for key in rs[0]:
                    row[key], row[key + "_std"] = mean_std([r[key] for r in rs])
                rows.append(row)
    finally:
        torch.set_num_threads(threads)
    lines = [
        "| method | mask | trainable trunk | conflict % (all steps) | conflict % (last half) "
        "| test NMSE ↓ | ms/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['mask']} | {100 * r['trainable']:.1f}% | "
            f"{r['conflict_pct']:.1f} ± {r['conflict_pct_std']:.1f} | "
            f"{r['conflict_last_half_pct']:.1f} ± {r['conflict_last_half_pct_std']:.1f} | "
            f"{r['nmse']:.4f} ± {r['nmse_std']:.4f} | {r['ms_per_step']:.1f} |"
        )
    md = (
        f"Gradient-conflict incidence (share of task pairs with cos < 0, shared-parameter "
        f"gradients), 3 tasks, {steps} steps, seeds {seeds}, {device}.\n\n" + "\n".join(lines)
    )
    result = {"name": NAME, "rows": rows, "markdown": md, "seeds": list(seeds), "quick": quick}
    return save_suite_result(result, out_dir)


if __name__ == "__main__":
    import sys

    quick = "--full" not in sys.argv
    print(run(seeds=[0, 1, 2], quick=quick)["markdown"])
