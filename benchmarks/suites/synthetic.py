"""Synthetic many-task regression with controllable task conflict and loss-scale imbalance.

Inputs ``x ~ N(0, I_d)`` (``d = 32``). Task ``t`` (of ``m``, up to 64 and more) has its own
teacher features mixed from a common part and a task-specific part,

    W_t = √(1 − c) · W₀ + √c · E_t        (W₀, E_t ∈ ℝ^{r×d}, entries N(0, 1/d), r = 8)
    y_t = s_t · ( v_tᵀ tanh(W_t x) / σ_t + 0.1 ε ),   v_t ~ N(0, I_r), ε ~ N(0, 1),

with ``σ_t`` the standard deviation of ``v_tᵀ tanh(W_t x)`` (so every task has unit signal
before scaling). ``c ∈ [0, 1]`` is the **conflict**: at 0 all tasks share one feature map, at 1
they need unrelated features and compete for the shared trunk's capacity (width 32).
``s_t = 10^{(ρ/4)(2t/(m−1) − 1)}`` is the **imbalance**: the tasks' loss scales ``s_t²`` span a
factor ``10^ρ`` from the first task to the last. Training minimises the per-task MSE of the
raw targets (no standardisation: balancing the scales is the strategies' job); the metric is the
test MSE per task, so Δm% weighs every task the same whatever its scale.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    STL,
    Problem,
    TaskSpec,
    TrainConfig,
    missing_note,
    run_problem,
    select_strategies,
    style,
    summarize,
)

NAME = "synthetic"
# seeds (python -m benchmarks without --seeds): the paired SD of Δm% differences here is ~4
# points (3 seeds, 16 strategies); 5 seeds detect ~13 points with 80% power after Holm, and the
# differences that matter on this problem are tens of points (benchmarks/stats.py)
SEEDS_QUICK = (0, 1, 2)
SEEDS_FULL = (0, 1, 2, 3, 4)
TITLE = "Synthetic many-task regression (conflict × loss-scale imbalance)"


def make_problem(
    m: int,
    *,
    conflict: float = 0.5,
    imbalance: float = 2.0,
    n_train: int = 2000,
    n_test: int = 2000,
    d: int = 32,
    r: int = 8,
    noise: float = 0.1,
    data_seed: int = 0,
) -> Problem:
    """The synthetic problem (fixed by ``data_seed``); see the module docstring."""
    if m < 1:
        raise ValueError(f"m must be ≥ 1, got {m}")
    if not 0.0 <= conflict <= 1.0:
        raise ValueError(f"conflict must be in [0, 1], got {conflict}")
    g = torch.Generator().manual_seed(1000 + data_seed)
    x = torch.randn(n_train + n_test, d, generator=g, dtype=torch.float64)
    w0 = torch.randn(r, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    ys = []
    for _t in range(m):
        e = torch.randn(r, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        w = math.sqrt(1 - conflict) * w0 + math.sqrt(conflict) * e
        v = torch.randn(r, generator=g, dtype=torch.float64)
        f = torch.tanh(x @ w.T * 2.0) @ v
        f = f / f[:n_train].std()
        ys.append(f + noise * torch.randn(f.shape, generator=g, dtype=torch.float64))
    pos = torch.linspace(-1, 1, m, dtype=torch.float64) if m > 1 else torch.zeros(1)
    scales = 10 ** (imbalance / 4 * pos)
    y = torch.stack(ys, 1) * scales
    tasks = [TaskSpec(f"t{t:02d}", "mse", "mse") for t in range(m)]
    xf, yf = x.float(), y.float()
    return Problem(
        f"{NAME}-m{m}-c{conflict}-rho{imbalance}",
        tasks,
        xf[:n_train],
        yf[:n_train],
        xf[n_train:],
        yf[n_train:],
        hidden=(128, 32),
    )


def _plot(
    rows: list[dict[str, Any]], tasks: list[str], scales: np.ndarray, path: pathlib.Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = np.array([np.mean([r[k] for r in rows if r["strategy"] == STL]) for k in tasks])
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    order: list[str] = []
    for r in rows:
        if r["strategy"] not in order and r["strategy"] != STL:
            order.append(r["strategy"])
    for s in order:
        vals = np.array([np.mean([r[k] for r in rows if r["strategy"] == s]) for k in tasks])
        color, marker = style(s)
        ax.plot(
            scales**2,
            100 * (vals - base) / base,
            marker=marker,
            color=color,
            ms=5,
            lw=1,
            label=s,
            markeredgecolor="k",
            markeredgewidth=0.3,
        )
    ax.axhline(0, color="k", lw=1, ls="--", label="single-task")
    ax.set_xscale("log")
    ax.set_xlabel("task loss scale s_t² (log scale)")
    ax.set_ylabel("test MSE vs single-task, % (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    # the legend outside the axes, never over the data
    ax.legend(fontsize=7, ncol=1 + len(order) // 16, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(
    *,
    strategies: list[str] | None,
    seeds: list[int],
    quick: bool,
    device: str = "cpu",
    out_dir: pathlib.Path | None = None,
    show_progress: bool = True,
    configs: list[tuple[int, float, float]] | None = None,
    epochs: int | None = None,
    tiny: bool = False,
) -> dict[str, Any]:
    names, missing = select_strategies(strategies)
    if configs is None and tiny:
        configs = [(4, 0.5, 1.0)]
    if configs is None:
        configs = (
            [(8, 0.5, 2.0)] if quick else [(m, c, 2.0) for m in (4, 16, 64) for c in (0.2, 0.8)]
        )
    cfg = TrainConfig(
        epochs=epochs if epochs is not None else (1 if tiny else 6 if quick else 15),
        batch_size=128,
        lr=1e-3,
    )
    all_rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    md = [
        f"### {TITLE}\n\n",
        f"MLP 32→128→32 + one linear head per task; Adam lr {cfg.lr}, batch {cfg.batch_size}, "
        f"{cfg.epochs} epochs; seeds {seeds}. Metric: test MSE per task (raw scale). "
        "ρ: the task loss scales span 10^ρ.\n",
    ]
    plots: list[str] = []
    for m, c, rho in configs:
        problem = make_problem(m, conflict=c, imbalance=rho, n_train=300 if tiny else 2000)
        rows = run_problem(
            problem,
            names,
            seeds,
            cfg,
            device=device,
            show_progress=show_progress,
            desc=f"synthetic m={m} c={c}",
        )
        summ = summarize(problem.tasks, rows, metric_digits=3, max_metric_columns=8)
        for r in rows:
            r.update({"m": m, "conflict": c, "imbalance": rho})
        for s in summ.rows:
            s.update({"m": m, "conflict": c, "imbalance": rho})
        all_rows += rows
        summaries += summ.rows
        md.append(f"\n#### m = {m}, conflict c = {c}, imbalance ρ = {rho}\n\n{summ.markdown}\n")
        if out_dir is not None and names:
            out_dir.mkdir(parents=True, exist_ok=True)
            name = f"synthetic_m{m}_c{c}_rho{rho}.png"
            pos = np.linspace(-1, 1, m) if m > 1 else np.zeros(1)
            _plot(
                rows,
                [t.key for t in problem.tasks],
                10 ** (rho / 4 * pos),
                out_dir / name,
                f"m={m}, c={c}, ρ={rho}: per-task test MSE against the single-task baseline",
            )
            plots.append(name)
            md.append(f"\n![per-task error, m={m} c={c}]({name})\n")
    md.append(missing_note(missing))
    return {
        "name": NAME,
        "title": TITLE,
        "config": {"configs": configs, "epochs": cfg.epochs, "seeds": seeds, "quick": quick},
        "rows": all_rows,
        "summary": summaries,
        "markdown": "".join(md),
        "plots": plots,
        "missing_strategies": missing,
    }
