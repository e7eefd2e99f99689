"""Synthetic multi-modal, multi-task problem: FULLER-style calibration vs its single levels.

Data. A latent ``s ∈ R⁸`` (``s ~ N(0, I)``) is seen through two modalities:

* modality A (clean): ``x_A = P_A s[:4] + 0.1·ε``, 16 features;
* modality B (noisy): ``x_B = P_B s[4:] + σ_B·ε``, 16 features, ``σ_B = 1.5`` (low SNR).

Two regression tasks need both halves of ``s``:

* task ``det``: ``y₁ = tanh(a₁ᵀ s[:4]) + b₁ᵀ s[4:]``;
* task ``seg``: ``y₂ = 5·(a₂ᵀ s[:4] − tanh(b₂ᵀ s[4:]))`` (a 25× larger loss scale).

Model: one MLP branch per modality (16→32→16), concatenation, a fusion MLP (32→32→16: the
trunk's last layer is the task-level cut), two linear heads. Adam (lr 3e-3), batch 64.

Strategies: equal weights (``sum(losses).backward()``), modality level only
(:func:`~mtlbal.presets.fuller_modality_level`), task level only
(:func:`~mtlbal.presets.fuller_task_level`, PCGrad at the cut), FULLER-style (both levels,
:func:`~mtlbal.presets.fuller`) and ARL (:class:`~mtlbal.transforms.ARL`, the alternative to the
modality level's magnitude equalisation: the gradient entering each branch is scaled by the
inverse of that modality's variance). ARL's auxiliary unimodal predictions run the shared fusion,
trunk and heads on one branch's features with the other branch's zeroed (no new parameters);
each modality's auxiliary loss is ``Σ_t MSE_t / Var_batch(y_t)`` over the two tasks, and it is
added to the objective with weight 1, as in the paper. Reported: the test MSE of each task
normalised by the target's variance (mean ± std over seeds), Δ% of their mean against equal
weights (negative is better), the ratio of the noisy to the clean branch's gradient norm before
calibration (averaged over the run; only where the modality level or ARL runs), and ms per step
(noisy on a shared CPU).
"""

from __future__ import annotations

import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import mtlbal
from benchmarks.common import save_suite_result
from benchmarks.metrics import mean_std
from mtlbal.presets import fuller, fuller_modality_level, fuller_task_level
from mtlbal.transforms import ARL

NAME = "multimodal"
SIGMA_B = 1.5
STRATEGIES = ["equal", "modality-only", "task-only (PCGrad@cut)", "FULLER-style", "ARL"]


class Problem:
    """Fixed projections and task vectors (from ``seed``); ``sample(n, g)`` draws a batch."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(10_000 + seed)
        self.pa = torch.randn(4, 16, generator=g) / 2
        self.pb = torch.randn(4, 16, generator=g) / 2
        self.a1, self.b1 = torch.randn(4, generator=g), torch.randn(4, generator=g) / 2
        self.a2, self.b2 = torch.randn(4, generator=g) / 2, torch.randn(4, generator=g)

    def sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = torch.randn(n, 8, generator=g)
        sa, sb = s[:, :4], s[:, 4:]
        xa = sa @ self.pa + 0.1 * torch.randn(n, 16, generator=g)
        xb = sb @ self.pb + SIGMA_B * torch.randn(n, 16, generator=g)
        y1 = torch.tanh(sa @ self.a1) + sb @ self.b1
        y2 = 5.0 * (sa @ self.a2 - torch.tanh(sb @ self.b2))
        return xa, xb, y1[:, None], y2[:, None]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch_a = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.fuse = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
        self.last = nn.Sequential(nn.Linear(32, 16), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])

    def backbone(self) -> list[nn.Module]:
        return [self.branch_a, self.branch_b, self.fuse, self.last]

    def forward(self, xa: Tensor, xb: Tensor) -> list[Tensor]:
        z = self.last(self.fuse(torch.cat([self.branch_a(xa), self.branch_b(xb)], dim=1)))
        return [h(z) for h in self.heads]

    def with_aux(self, xa: Tensor, xb: Tensor) -> tuple[list[Tensor], list[list[Tensor]]]:
        """The fused predictions and, per modality, the unimodal ones (the other branch's
        features zeroed; the fusion, trunk and heads are shared)."""
        fa, fb = self.branch_a(xa), self.branch_b(xb)
        outs = []
        for feats in ([fa, fb], [fa, torch.zeros_like(fb)], [torch.zeros_like(fa), fb]):
            z = self.last(self.fuse(torch.cat(feats, dim=1)))
            outs.append([h(z) for h in self.heads])
        return outs[0], outs[1:]


def _make(name: str, net: Net) -> mtlbal.Balancer | None:
    branches = [net.branch_a, net.branch_b]
    if name == "equal":
        return None
    if name == "modality-only":
        return fuller_modality_level(net.backbone(), branches, nonfinite="off")
    if name == "task-only (PCGrad@cut)":
        return fuller_task_level(net.backbone(), net.last, nonfinite="off")
    if name == "FULLER-style":
        return fuller(net.backbone(), net.last, branches, nonfinite="off")
    if name == "ARL":
        arl = ARL(branches, aux_tasks=["aux_a", "aux_b"])
        return mtlbal.Balancer(net.backbone(), branches=arl, nonfinite="off")
    raise ValueError(name)


def run_one(name: str, seed: int, steps: int, device: str) -> dict[str, float]:
    prob = Problem(seed)
    torch.manual_seed(seed)
    net = Net().to(device)
    balancer = _make(name, net)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    ratios: list[Tensor] = []
    t0 = time.perf_counter()
    for _ in range(steps):
        xa, xb, y1, y2 = (t.to(device) for t in prob.sample(64, g))
        losses: list[Tensor] | dict[str, Tensor]
        if name == "ARL":
            (o1, o2), aux = net.with_aux(xa, xb)
            v1, v2 = y1.var().detach(), y2.var().detach()
            losses = {"det": (o1 - y1).pow(2).mean(), "seg": (o2 - y2).pow(2).mean()}
            for k, (a1, a2) in zip("ab", aux):
                losses[f"aux_{k}"] = (a1 - y1).pow(2).mean() / v1 + (a2 - y2).pow(2).mean() / v2
        else:
            o1, o2 = net(xa, xb)
            losses = [(o1 - y1).pow(2).mean(), (o2 - y2).pow(2).mean()]
        opt.zero_grad()
        if balancer is None:
            assert isinstance(losses, list)
            (losses[0] + losses[1]).backward()
        else:
            info = balancer.backward(losses)
            bn = info.extras.get("branch_norms")
            if bn is not None:
                ratios.append(bn[1] / bn[0].clamp_min(1e-30))
        opt.step()
    ms = 1000 * (time.perf_counter() - t0) / steps
    test = torch.Generator().manual_seed(999_999)
    xa, xb, y1, y2 = (t.to(device) for t in prob.sample(4000, test))
    with torch.no_grad():
        o1, o2 = net(xa, xb)
        m1 = float((o1 - y1).pow(2).mean() / y1.var())
        m2 = float((o2 - y2).pow(2).mean() / y2.var())
    ratio = float(torch.stack(ratios).mean()) if ratios else math.nan
    return {"det_nmse": m1, "seg_nmse": m2, "grad_ratio_B_A": ratio, "ms_per_step": ms}


def _fmt(m: float | None, s: float | None) -> str:
    return "n/a" if m is None or s is None else f"{m:.4f} ± {s:.4f}"


def run(
    *,
    seeds: list[int],
    quick: bool,
    device: str = "cpu",
    out_dir: pathlib.Path | None = None,
    progress: Callable[[str], None] | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """Train every strategy on every seed; return ``{"name", "rows", "markdown", ...}``."""
    steps = steps if steps is not None else (400 if quick else 3000)
    per: dict[str, list[dict[str, float]]] = {s: [] for s in STRATEGIES}
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # tiny models: more threads only add contention
    try:
        for seed in seeds:
            for name in STRATEGIES:
                per[name].append(run_one(name, seed, steps, device))
                if progress is not None:
                    progress(f"{NAME}: {name} seed {seed} done")
    finally:
        torch.set_num_threads(threads)
    base = [0.5 * (r["det_nmse"] + r["seg_nmse"]) for r in per["equal"]]
    rows: list[dict[str, Any]] = []
    for name in STRATEGIES:
        rs = per[name]
        row: dict[str, Any] = {"strategy": name, "seeds": len(rs), "steps": steps}
        for key in ("det_nmse", "seg_nmse", "grad_ratio_B_A", "ms_per_step"):
            m, s = mean_std([r[key] for r in rs])
            # no modality level: no branch norms (None, so the JSON stays strict)
            row[key], row[key + "_std"] = (None, None) if math.isnan(m) else (m, s)
        deltas = [100 * (0.5 * (r["det_nmse"] + r["seg_nmse"]) - b) / b for r, b in zip(rs, base)]
        row["delta_pct"], row["delta_pct_std"] = mean_std(deltas)
        rows.append(row)
    lines = [
        "| strategy | det NMSE ↓ | seg NMSE ↓ | Δ% mean NMSE vs equal ↓ | ‖g_B‖/‖g_A‖ before "
        "calibration (ARL: before scaling) | ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {_fmt(r['det_nmse'], r['det_nmse_std'])} | "
            f"{_fmt(r['seg_nmse'], r['seg_nmse_std'])} | "
            f"{r['delta_pct']:+.1f} ± {r['delta_pct_std']:.1f} | "
            f"{_fmt(r['grad_ratio_B_A'], r['grad_ratio_B_A_std'])} | {r['ms_per_step']:.1f} |"
        )
    md = (
        f"Synthetic multi-modal problem (clean modality A, noisy modality B σ={SIGMA_B}), "
        f"{steps} steps, seeds {seeds}, {device}. NMSE = test MSE / Var(y).\n\n" + "\n".join(lines)
    )
    result = {"name": NAME, "rows": rows, "markdown": md, "seeds": list(seeds), "quick": quick}
    return save_suite_result(result, out_dir)


if __name__ == "__main__":
    import sys

    quick = "--full" not in sys.argv
    print(run(seeds=[0, 1, 2], quick=quick)["markdown"])
