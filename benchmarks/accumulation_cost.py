"""Cost of gradient accumulation: one optimizer step over K micro-batches, per window mode.

For each model (an MLP 256→3×512 with 4 linear heads, a small CNN with 4 heads), a batch of
``B`` rows is taken either whole or as ``K`` micro-batches. Each variant's step (zero_grad,
forwards, the balancer's backward(s), optimizer step) is timed in process CPU time on one
thread, in interleaved rounds; the table gives the median ratio to *plain accumulation*
(``(Σ_t L_t / K).backward()`` per micro-batch, no balancing) over the rounds, and the ratio of
the same strategy on the whole batch (one step, no window) to the plain one-batch step.

    PYTHONPATH=src python benchmarks/accumulation_cost.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import mtlbal

M = 4


def mlp() -> tuple[nn.Module, nn.ModuleList, Callable[[int], torch.Tensor]]:
    trunk = nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)
    )
    heads = nn.ModuleList([nn.Linear(512, 8) for _ in range(M)])
    return trunk, heads, lambda b: torch.randn(b, 256)


def cnn() -> tuple[nn.Module, nn.ModuleList, Callable[[int], torch.Tensor]]:
    trunk = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
    )
    heads = nn.ModuleList([nn.Linear(512, 8) for _ in range(M)])
    return trunk, heads, lambda b: torch.randn(b, 3, 16, 16)


def variants(build: Callable, batch: int, k: int) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    trunk0, heads0, data = build()
    x = data(batch)
    ys = torch.randn(batch, M, 8)
    out: dict[str, Callable[[], None]] = {}

    def make(name: str, kw: dict | None, micro: int) -> None:
        import copy

        trunk, heads = copy.deepcopy(trunk0), copy.deepcopy(heads0)
        params = [*trunk.parameters(), *heads.parameters()]
        opt: Any
        if kw is None:
            opt = torch.optim.SGD(params, lr=1e-3)
        else:
            kw = dict(kw)
            at: Any = trunk if kw.pop("at", None) == "cut" else "params"
            bal = mtlbal.Balancer(trunk, at=at, accumulate=micro, **kw)
            opt = mtlbal.wrap(torch.optim.SGD(params, lr=1e-3), bal)

        def step() -> None:
            opt.zero_grad()
            for xm, ym in zip(x.chunk(micro), ys.chunk(micro)):
                z = trunk(xm)
                losses = {f"t{i}": (h(z) - ym[:, i]).pow(2).mean() for i, h in enumerate(heads)}
                if kw is None:
                    (sum(losses.values()) / micro).backward()
                else:
                    opt.backward(losses)
            opt.step()

        out[name] = step

    make("plain", None, 1)
    make("plain accumulation", None, k)
    for label, kw in (
        ("UncertaintyWeighting", {"weighting": mtlbal.weighting.UncertaintyWeighting(M)}),
        ("FAMO", {"weighting": mtlbal.weighting.FAMO(M)}),
        ("UPGrad@params", {"aggregator": mtlbal.aggregation.UPGrad(), "engine": "dense"}),
        ("MGDA@cut", {"aggregator": mtlbal.aggregation.MGDA(), "at": "cut"}),
    ):
        make(f"{label} (one batch)", kw, 1)
        make(f"{label} (window of {k})", kw, k)
    return out


def timed(fn: Callable[[], None], n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--micro", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, 1 thread, process CPU time, batch {args.batch}, "
        f"K = {args.micro} micro-batches, m = {M}\n"
    )
    for name, build in (("MLP 256→3×512", mlp), ("CNN 2 conv, 16×16", cnn)):
        vs = variants(build, args.batch, args.micro)
        for fn in vs.values():  # warm-up
            fn()
        ratios: dict[str, list[float]] = {n: [] for n in vs}
        names = list(vs)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            times = {n: timed(vs[n], args.steps) for n in order}
            for n in names:
                base = "plain" if "one batch" in n or n == "plain" else "plain accumulation"
                ratios[n].append(times[n] / times[base])
        print(f"### {name}\n")
        print("| variant | ratio (median over rounds) | to |")
        print("|---|---|---|")
        for n in names:
            base = "plain" if "one batch" in n or n == "plain" else "plain accumulation"
            print(f"| {n} | {statistics.median(ratios[n]):.2f}× | {base} |")
        print()


if __name__ == "__main__":
    main()
