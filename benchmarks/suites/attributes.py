"""Attributes: a many-task suite (24 binary attributes, CelebA-like) from procedural inputs.

**Data.** A latent ``z ∈ R¹²`` (``z ~ N(0, I)``) is seen only through a fixed random nonlinear
map: ``x = tanh(z W₁) W₂ + 0.3·ε`` (``W₁ ∈ R^{12×48}``, ``W₂ ∈ R^{48×64}``, Gaussian, fixed by
``data_seed``), 64 features. Each attribute ``t`` scores two latents ``i_t, j_t`` drawn at
random, so attributes share latents and often pull them in opposite directions; the kinds cycle
to make the difficulty uneven:

* ``linear``: ``s = z_i ± ½ z_j`` (the sign drawn per attribute) — easy;
* ``product``: ``s = z_i z_j`` (an XOR of signs) — hard for a narrow trunk;
* ``radial``: ``s = z_i² + z_j²`` — medium;
* ``noisy``: ``s = z_i − z_j`` with a fraction ``q_t ∈ [0.1, 0.25]`` of labels flipped.

The label is ``1[s > threshold]`` with the threshold at the quantile that gives a positive rate
``p_t`` drawn in [0.05, 0.5] (CelebA's attributes are as uneven: a few % to about half).

**Model.** The suites' MLP: a trunk 64→128→64→16 (ReLU; the 16-wide last layer is narrower
than the number of tasks, so the tasks compete for it) and one 2-way linear head per attribute;
cross-entropy per task, Adam. **Metrics**: test accuracy per attribute (CelebA's convention),
their mean and worst; Δm% against the single-task networks (one MLP per attribute, same
budget). **Conflict** is measured, not assumed: the share of task pairs whose gradients at the
shared parameters have a negative cosine, on a few test batches at initialisation and after
one epoch of Equal training. **Cost**: the process-CPU time of one training step per strategy for
``m`` = 5, 10, 20, 40 attributes (interleaved rounds, medians, the ratio to Equal measured in
the same process), which shows how each method's cost grows with the number of tasks.
"""

from __future__ import annotations

import functools
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

import mtlbal
from benchmarks import strategies as S
from benchmarks.common import (
    STL,
    MTLNet,
    Problem,
    TaskSpec,
    TrainConfig,
    missing_note,
    run_problem,
    seed_everything,
    summarize,
)

NAME = "attributes"
TITLE = "Attributes (24 binary tasks, CelebA-like, procedural)"
DESCRIPTION = (
    "Many tasks: 24 binary attributes (CelebA-like) of a 12-d latent seen through a fixed random "
    "nonlinear map, with uneven difficulty (linear, product, radial and label-noise attributes) "
    "and positive rates from 5 % to 50 %; an MLP trunk with a 16-wide last layer shared by 24 "
    "heads, so the tasks compete; test accuracy per attribute, Δm% against single-task MLPs, "
    "the measured share of conflicting task pairs, and the per-step cost for 5–40 tasks."
)
KINDS = ("linear", "product", "radial", "noisy")
HIDDEN = (128, 64, 16)
D_LATENT, D_IN = 12, 64
# the strategies run when none are named (24 tasks: Jacobian methods cost ~m backward passes)
DEFAULT_STRATEGIES = ("Equal", "UW", "MGDA", "UPGrad", "FAMO", "PCGrad", "CAGrad", "NashMTL")
COST_STRATEGIES = ("Equal", "UW", "FAMO", "MGDA", "UPGrad", "PCGrad")


@functools.lru_cache(maxsize=8)
def make_problem(
    m: int = 24, *, n_train: int = 8000, n_test: int = 4000, data_seed: int = 0
) -> tuple[Problem, tuple[dict[str, Any], ...]]:
    """The data set with ``m`` attributes and the description of each (kind, latents, positive
    rate, flip rate), fixed by ``data_seed``."""
    if m < 1:
        raise ValueError(f"attributes: m must be positive, got {m}")
    rng = np.random.default_rng(data_seed)
    n = n_train + n_test
    z = rng.standard_normal((n, D_LATENT))
    w1 = rng.standard_normal((D_LATENT, 48)) / math.sqrt(D_LATENT)
    w2 = rng.standard_normal((48, D_IN)) / math.sqrt(48)
    x = np.tanh(z @ w1) @ w2 + 0.3 * rng.standard_normal((n, D_IN))
    ys, info = [], []
    for t in range(m):
        kind = KINDS[t % len(KINDS)]
        i, j = (int(k) for k in rng.choice(D_LATENT, size=2, replace=False))
        sign = float(rng.choice([-1.0, 1.0]))
        if kind == "linear":
            s = z[:, i] + 0.5 * sign * z[:, j]
        elif kind == "product":
            s = z[:, i] * z[:, j]
        elif kind == "radial":
            s = z[:, i] ** 2 + z[:, j] ** 2
        else:
            s = z[:, i] - z[:, j]
        rate = float(rng.uniform(0.05, 0.5))
        y = s > np.quantile(s, 1.0 - rate)
        flip = float(rng.uniform(0.1, 0.25)) if kind == "noisy" else 0.0
        if flip:
            y = y ^ (rng.uniform(size=n) < flip)
        ys.append(y)
        info.append(
            {
                "task": f"a{t:02d}",
                "kind": kind,
                "latents": (i, j),
                "positive_rate": round(float(y[n_train:].mean()), 3),
                "flip": round(flip, 3),
            }
        )
    xt = torch.from_numpy(x.astype(np.float32))
    yt = torch.from_numpy(np.stack(ys, axis=1).astype(np.float32))
    tasks = [TaskSpec(f"a{t:02d}", "ce", "acc", out_dim=2) for t in range(m)]
    prob = Problem(
        NAME, tasks, xt[:n_train], yt[:n_train], xt[n_train:], yt[n_train:], hidden=HIDDEN
    )
    return prob, tuple(info)


def _losses(problem: Problem, preds: list[Tensor], y: Tensor) -> list[Tensor]:
    return [F.cross_entropy(p, y[:, t].long()) for t, p in enumerate(preds)]


def conflict(
    problem: Problem, seed: int, *, train_steps: int, batches: int = 4, batch: int = 256
) -> dict[str, float]:
    """Share of task pairs with a negative gradient cosine at the shared parameters (and the
    mean pairwise cosine), on ``batches`` test batches, after ``train_steps`` Equal steps."""
    seed_everything(seed)
    net = MTLNet(problem.x_train.shape[1], problem.hidden, [t.out_dim for t in problem.tasks])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    n = problem.x_train.shape[0]
    for _ in range(train_steps):
        idx = torch.randint(n, (128,), generator=gen)
        opt.zero_grad()
        torch.stack(
            _losses(problem, net(problem.x_train[idx]), problem.y_train[idx])
        ).sum().backward()
        opt.step()
    shared = list(net.trunk.parameters())
    neg, cos_sum, pairs = 0, 0.0, 0
    m = problem.m
    for b in range(batches):
        sl = slice(b * batch, (b + 1) * batch)
        losses = _losses(problem, net(problem.x_test[sl]), problem.y_test[sl])
        g = torch.stack(
            [
                torch.cat(
                    [gi.reshape(-1) for gi in torch.autograd.grad(lt, shared, retain_graph=True)]
                )
                for lt in losses
            ]
        ).double()
        c = F.normalize(g, dim=1) @ F.normalize(g, dim=1).T
        iu = torch.triu_indices(m, m, 1)
        vals = c[iu[0], iu[1]]
        neg += int((vals < 0).sum())
        cos_sum += float(vals.sum())
        pairs += vals.numel()
    return {"negative_pairs": neg / pairs, "mean_cos": cos_sum / pairs}


def _stepper(problem: Problem, strategy: str, seed: int) -> Callable[[int], None]:
    """A closure that runs one training step of ``strategy`` on batch number ``i``."""
    seed_everything(seed)
    net = MTLNet(problem.x_train.shape[1], problem.hidden, [t.out_dim for t in problem.tasks])
    spec = S.get(strategy)(problem.m, seed)
    balancer = mtlbal.Balancer(
        net.trunk,
        weighting=spec.weighting,
        aggregator=spec.aggregator,
        at=net.trunk if spec.at == "cut" else "params",
    )
    opt = mtlbal.wrap(torch.optim.Adam(net.parameters(), lr=1e-3), balancer)
    names = [t.name for t in problem.tasks]
    famo = callable(getattr(balancer.weighting, "update", None))
    n = problem.x_train.shape[0]

    def step(i: int) -> None:
        lo = (i * 128) % (n - 128)
        xb, yb = problem.x_train[lo : lo + 128], problem.y_train[lo : lo + 128]
        opt.zero_grad(set_to_none=True)
        opt.backward(dict(zip(names, _losses(problem, net(xb), yb))))
        opt.step()
        if famo:
            with torch.no_grad():
                balancer.update(dict(zip(names, _losses(problem, net(xb), yb))))

    return step


def step_cost(
    strategies: list[str], ms: tuple[int, ...], *, rounds: int = 5, steps: int = 5
) -> list[dict[str, Any]]:
    """CPU ms per training step of each strategy for each number of tasks in ``ms``: after two
    warm-up steps, ``rounds`` interleaved rounds of ``steps`` steps each (process CPU time),
    the median round; with its ratio to Equal measured in the same rounds."""
    out = []
    for m in ms:
        problem, _ = make_problem(m, n_train=1024, n_test=16)
        steppers = {s: _stepper(problem, s, 0) for s in strategies}
        for f in steppers.values():
            f(0)
            f(1)
        times: dict[str, list[float]] = {s: [] for s in strategies}
        for r in range(rounds):
            for s, f in steppers.items():
                t0 = time.process_time()
                for i in range(steps):
                    f(2 + r * steps + i)
                times[s].append(1000 * (time.process_time() - t0) / steps)
        eq = float(np.median(times["Equal"])) if "Equal" in times else math.nan
        for s in strategies:
            med = float(np.median(times[s]))
            out.append({"m": m, "strategy": s, "ms_per_step": med, "vs_equal": med / eq})
    return out


def run(
    *,
    strategies: list[str] | None,
    seeds: list[int],
    quick: bool,
    device: str = "cpu",
    out_dir: pathlib.Path | None = None,
    show_progress: bool = True,
    tiny: bool = False,
    m: int | None = None,
    cost: bool = True,
) -> dict[str, Any]:
    """Train the single-task MLPs and every strategy once per seed; measure conflict (Equal)
    and the per-step cost against m (on the CPU, whatever ``device``)."""
    names, missing = S.available(strategies)
    if strategies is None:  # this suite's default set, not every registered strategy
        names = [s for s in DEFAULT_STRATEGIES if s in names]
        missing = {k: v for k, v in missing.items() if k in DEFAULT_STRATEGIES}
    m = m if m is not None else (4 if tiny else 24)
    sizes = {"n_train": 512, "n_test": 256} if tiny else {} if quick else {"n_train": 20000}
    problem, info = make_problem(m, **sizes)
    epochs = 1 if tiny else 6 if quick else 20
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=1e-3)
    rows = run_problem(problem, names, seeds, cfg, device=device, show_progress=show_progress)
    steps = cfg.epochs * math.ceil(problem.x_train.shape[0] / cfg.batch_size)
    for r in rows:
        accs = [r[t.key] for t in problem.tasks]
        r["mean_acc"] = float(np.mean(accs))
        r["worst_acc"] = float(np.min(accs))
        r["ms_per_step_wall"] = 1000 * r["wall_s"] / steps
    summ = summarize(problem.tasks, rows)
    conf_steps = 20 if tiny else steps // max(1, cfg.epochs)
    confl = {
        "init": conflict(problem, seeds[0], train_steps=0, batches=1 if tiny else 4),
        "trained": conflict(problem, seeds[0], train_steps=conf_steps, batches=1 if tiny else 4),
    }
    cost_rows: list[dict[str, Any]] = []
    if cost:
        cs = [s for s in COST_STRATEGIES if s in names] if strategies is None else names
        if "Equal" not in cs:
            cs = ["Equal", *cs]
        cost_rows = step_cost(
            cs, (2, 4) if tiny else (5, 10, 20, 40), rounds=1 if tiny else 5, steps=1 if tiny else 5
        )
    # markdown
    kinds = {k: sum(1 for i in info if i["kind"] == k) for k in KINDS}
    rates = [i["positive_rate"] for i in info]
    intro = (
        f"{m} attributes ({', '.join(f'{v} {k}' for k, v in kinds.items())}), positive rates "
        f"{min(rates):.2f}–{max(rates):.2f}; {problem.x_train.shape[0]} training and "
        f"{problem.x_test.shape[0]} test samples; MLP 64→{'→'.join(map(str, HIDDEN))} + {m} "
        f"heads; Adam lr {cfg.lr}, batch {cfg.batch_size}, {cfg.epochs} epochs; seeds {seeds}. "
        "Δm% over the attributes' accuracies against single-task MLPs."
    )
    acc_lines = ["| strategy | mean acc ↑ | worst acc ↑ | wall ms/step |", "|---|---|---|---|"]
    for s in dict.fromkeys(r["strategy"] for r in rows):
        rs = [r for r in rows if r["strategy"] == s]
        acc_lines.append(
            f"| {s} | {np.mean([r['mean_acc'] for r in rs]):.4f} | "
            f"{np.mean([r['worst_acc'] for r in rs]):.4f} | "
            f"{np.median([r['ms_per_step_wall'] for r in rs]):.1f} |"
        )
    conf_md = (
        f"Conflict (Equal, seed {seeds[0]}): {100 * confl['init']['negative_pairs']:.0f} % of "
        f"task pairs have a negative gradient cosine at initialisation (mean cosine "
        f"{confl['init']['mean_cos']:+.3f}), {100 * confl['trained']['negative_pairs']:.0f} % "
        f"after {conf_steps} steps (mean {confl['trained']['mean_cos']:+.3f})."
    )
    title = TITLE if m == 24 else TITLE.replace("24 binary", f"{m} binary")
    md = (
        f"### {title}\n\n{intro}\n\n{summ.markdown}\n\n" + "\n".join(acc_lines) + f"\n\n{conf_md}\n"
    )
    if cost_rows:
        ms_list = list(dict.fromkeys(r["m"] for r in cost_rows))
        head = "| strategy | " + " | ".join(f"m = {k}" for k in ms_list) + " |"
        lines = [head, "|" + "---|" * (1 + len(ms_list))]
        for s in dict.fromkeys(r["strategy"] for r in cost_rows):
            cells = [
                f"{r['ms_per_step']:.1f} ({r['vs_equal']:.1f}×)"
                for k in ms_list
                for r in cost_rows
                if r["m"] == k and r["strategy"] == s
            ]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        md += (
            "\nCPU ms per training step (batch 128, one thread; median of interleaved rounds; "
            "in parentheses the ratio to Equal):\n\n" + "\n".join(lines) + "\n"
        )
    md += missing_note(missing)
    return {
        "name": NAME,
        "title": title,
        "description": DESCRIPTION,
        "config": {
            "m": m,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "n_train": problem.x_train.shape[0],
            "n_test": problem.x_test.shape[0],
            "seeds": list(seeds),
            "quick": quick,
        },
        "tasks": [t.key for t in problem.tasks],
        "task_info": [dict(i) for i in info],
        "baseline": STL,
        "rows": rows,
        "summary": summ.rows,
        "conflict": confl,
        "cost": cost_rows,
        "markdown": md,
        "missing_strategies": missing,
    }
