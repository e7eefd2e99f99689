"""The two-objective toy problem of CAGrad, reused by Nash-MTL and FAMO.

With ``x = (x₁, x₂)`` and ``LOWER = 5e-6``::

    f₁ = log(max(|0.5(−x₁−7) − tanh(−x₂)|, LOWER)) + 6
    f₂ = log(max(|0.5(−x₁+3) + tanh(−x₂) + 2|, LOWER)) + 6
    c₁ = max(tanh(x₂/2), 0),  c₂ = max(tanh(−x₂/2), 0)
    f₁ˢ = ((−x₁+7)² + 0.1(−x₂−8)²)/10 − 20,  f₂ˢ = ((−x₁−7)² + 0.1(−x₂−8)²)/10 − 20
    L₁ = scale · (f₁c₁ + f₁ˢc₂),  L₂ = f₂c₁ + f₂ˢc₂

``scale = 0.1`` makes the losses imbalanced (the Nash-MTL/FAMO setting). The Pareto set is
``x₂ ≈ −8.3552``, ``x₁ ∈ [−7, 7]``. Each strategy starts from the five standard points
(−8.5, 7.5), (0, 0), (9, 9), (−7.5, −0.5), (9, −1) and steps ``x`` with Adam; the full run uses
lr 5e-3 for 5,000 steps (the papers use lr 1e-3 for 35,000–100,000 steps; pass ``steps`` and
``lr`` to :func:`run` for that), the quick run lr 8e-2 for 300 steps (coarser paths, to fit
the quick suite's budget). The balancer treats ``x`` as the shared parameters; a ``-UB``
strategy cuts at a module that returns ``x`` (its representation gradient equals the parameter
gradient here).

The losses are negative in places; methods that take ``log L`` (IGB, FAMO) need a lower bound
``L*``. Following FAMO's toy script (``min_losses = [−21·scale, −21]``), every strategy is given
the shifted losses ``L_t − L*_t`` (``L*`` below the infimum, so they are positive): gradients are
unchanged, loss-based weightings see losses in their domain.

Reported per strategy: the final losses from each start, the distance of the end point to the
Pareto set, and how many of the five runs end within 0.1 of it. The plot shows every trajectory
on the contours of ``L₁ + L₂``.
"""

from __future__ import annotations

import math
import pathlib
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import mtlbal
from benchmarks import strategies as S
from benchmarks.common import progress, seed_everything, select_strategies

NAME = "toy"
TITLE = "Two-objective toy problem (CAGrad / Nash-MTL / FAMO)"
INITS: list[tuple[float, float]] = [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)]
PARETO_X2 = -8.3552
LOWER = 5e-6


def toy_losses(x: Tensor, scale: float = 0.1) -> Tensor:
    """``[L₁, L₂]`` at ``x`` (``[2]``, or ``[..., 2]`` → ``[..., 2]``)."""
    x1, x2 = x[..., 0], x[..., 1]
    f1 = torch.log(torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), min=LOWER)) + 6
    f2 = torch.log(torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), min=LOWER)) + 6
    c1 = torch.clamp(torch.tanh(x2 / 2), min=0)
    c2 = torch.clamp(torch.tanh(-x2 / 2), min=0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    l1 = f1 * c1 + f1_sq * c2
    l2 = f2 * c1 + f2_sq * c2
    return torch.stack([scale * l1, l2], dim=-1)


def min_losses(scale: float = 0.1) -> Tensor:
    """The lower bounds ``L*`` used by FAMO's toy script: ``[−21·scale, −21]``."""
    return torch.tensor([-21.0 * scale, -21.0], dtype=torch.float64)


def pareto_distance(x1: float, x2: float) -> float:
    """Euclidean distance of ``(x₁, x₂)`` to the segment ``x₂ = −8.3552, x₁ ∈ [−7, 7]``."""
    dx = max(abs(x1) - 7.0, 0.0)
    return math.hypot(dx, x2 - PARETO_X2)


class _Point(nn.Module):
    def __init__(self, init: tuple[float, float]) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(init, dtype=torch.float64))

    def forward(self) -> Tensor:
        return self.x * 1.0


def trajectory(
    strategy: str,
    init: tuple[float, float],
    *,
    steps: int,
    lr: float,
    seed: int,
    scale: float,
    record_every: int = 10,
) -> dict[str, Any]:
    """Run one strategy from one start; the recorded path and the end point's losses."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = _trajectory(
            strategy, init, steps=steps, lr=lr, seed=seed, scale=scale, record_every=record_every
        )
    # solver failures a strategy reported (e.g. Nash-MTL on the Pareto front) are counted
    row["solver_warnings"] = sum(1 for w in caught if "solver" in type(w.message).__name__.lower())
    return row


def _trajectory(
    strategy: str,
    init: tuple[float, float],
    *,
    steps: int,
    lr: float,
    seed: int,
    scale: float,
    record_every: int,
) -> dict[str, Any]:
    seed_everything(seed)
    point = _Point(init)
    spec = S.get(strategy)(2, seed)
    balancer = mtlbal.Balancer(
        point,
        weighting=spec.weighting,
        aggregator=spec.aggregator,
        at=point if spec.at == "cut" else "params",
        transforms=spec.transforms,
        nonfinite="off",
    )
    opt = mtlbal.wrap(torch.optim.Adam(point.parameters(), lr=lr), balancer)
    path = [list(init)]
    epoch = max(steps // 100, 1)  # IGB/DWA-style strategies see 100 "epochs"
    shift = min_losses()
    for k in range(steps):
        losses = toy_losses(point()) - shift
        opt.zero_grad(set_to_none=True)
        if spec.closure:  # F-MTL: the losses again at the perturbed point

            def closure() -> dict[str, Tensor]:
                again = toy_losses(point()) - shift
                return {"L1": again[0], "L2": again[1]}

            opt.backward({"L1": losses[0], "L2": losses[1]}, closure=closure)
        else:
            opt.backward({"L1": losses[0], "L2": losses[1]})
        opt.step()
        if callable(getattr(balancer.weighting, "update", None)):
            with torch.no_grad():  # FAMO: the same point re-evaluated after the step
                after = toy_losses(point()) - shift
            balancer.update({"L1": after[0], "L2": after[1]})
        if mtlbal.step.Need.VALIDATION in balancer.needs:
            with torch.no_grad():  # CoBa: no data here, the losses themselves are validation
                after = toy_losses(point()) - shift
            balancer.observe_validation({"L1": after[0], "L2": after[1]})
        if (k + 1) % epoch == 0:
            balancer.epoch_end()
        if (k + 1) % record_every == 0:
            path.append(point.x.detach().tolist())
    balancer.remove()
    end = point.x.detach()
    final = toy_losses(end, scale).tolist()
    x1, x2 = end.tolist()
    return {
        "strategy": strategy,
        "init": list(init),
        "end": [x1, x2],
        "L1": final[0],
        "L2": final[1],
        "pareto_dist": pareto_distance(x1, x2),
        "path": path,
    }


def _plot(results: dict[str, list[dict[str, Any]]], path: pathlib.Path, scale: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    g1, g2 = np.meshgrid(np.linspace(-10, 10, 200), np.linspace(-10, 10, 200))
    grid = torch.tensor(np.stack([g1, g2], -1))
    total = toy_losses(grid, scale).sum(-1).numpy()
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, name in zip(axes.flat, names):
        ax.contour(g1, g2, total, levels=25, cmap="Greys", linewidths=0.5)
        ax.plot([-7, 7], [PARETO_X2, PARETO_X2], color="tab:green", lw=3, alpha=0.5)
        for i, r in enumerate(results[name]):
            p = np.asarray(r["path"])
            ax.plot(p[:, 0], p[:, 1], color=colors(i), lw=1.2)
            ax.plot(p[0, 0], p[0, 1], "o", color=colors(i), ms=3)
            ax.plot(p[-1, 0], p[-1, 1], "*", color="k", ms=6)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
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
    steps: int | None = None,
    lr: float | None = None,
    tiny: bool = False,
) -> dict[str, Any]:
    names, missing = select_strategies(strategies)
    # a regulariser of per-sample representations (Rep-MTL) has no batch on a 2-D point
    for n in [n for n in names if S.get(n)(2, 0).transforms]:
        names.remove(n)
        missing[n] = "needs a batch of representations (not a single point)"
    n_steps = steps if steps is not None else (20 if tiny else 300 if quick else 5000)
    lr = lr if lr is not None else (8e-2 if quick else 5e-3)
    scale = 0.1
    seed = seeds[0] if seeds else 0
    jobs = [(s, init) for s in names for init in INITS]
    res: dict[str, list[dict[str, Any]]] = {s: [] for s in names}
    for s, init in progress(jobs, total=len(jobs), desc="toy", enabled=show_progress):
        res[s].append(trajectory(s, init, steps=n_steps, lr=lr, seed=seed, scale=scale))
    rows = []
    lines = [
        "| strategy | reached Pareto set (≤ 0.1) | mean distance | "
        + " | ".join(f"L₁, L₂ from {tuple(i)}" for i in INITS)
        + " |",
        "|" + "---|" * (3 + len(INITS)),
    ]
    for s in names:
        rs = res[s]
        reached = sum(r["pareto_dist"] <= 0.1 for r in rs)
        mean_d = float(np.mean([r["pareto_dist"] for r in rs]))
        cells = [s, f"{reached}/{len(rs)}", f"{mean_d:.3f}"]
        cells += [f"{r['L1']:.2f}, {r['L2']:.2f}" for r in rs]
        lines.append("| " + " | ".join(cells) + " |")
        for r in rs:
            rows.append({k: v for k, v in r.items() if k != "path"})
    plots: list[str] = []
    if out_dir is not None and names:
        out_dir.mkdir(parents=True, exist_ok=True)
        p = out_dir / "toy_trajectories.png"
        _plot(res, p, scale)
        plots.append(p.name)
    md = (
        f"### {TITLE}\n\nAdam lr {lr}, {n_steps} steps, L₁ scaled by {scale}; five standard "
        f"starting points. Pareto set: x₂ = {PARETO_X2}, x₁ ∈ [−7, 7]. The losses are negative "
        "(down to about −20): weightings that assume positive losses (uncertainty weighting's "
        "log-variances, the logarithms of IGB and FAMO) run outside their domain here, so read "
        "their rows as a stress test.\n\n" + "\n".join(lines) + "\n"
    )
    for p_name in plots:
        md += f"\n![toy trajectories]({p_name})\n"
    return {
        "name": NAME,
        "title": TITLE,
        "config": {"steps": n_steps, "lr": lr, "scale": scale, "inits": INITS, "quick": quick},
        "rows": rows,
        "markdown": md,
        "plots": plots,
        "missing_strategies": missing,
    }
