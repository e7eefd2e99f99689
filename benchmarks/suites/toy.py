"""The two-objective toy problem of CAGrad, reused by Nash-MTL and FAMO.

With ``x = (x₁, x₂)`` and ``LOWER = 5e-6``::

    f₁ = log(max(|0.5(−x₁−7) − tanh(−x₂)|, LOWER)) + 6
    f₂ = log(max(|0.5(−x₁+3) + tanh(−x₂) + 2|, LOWER)) + 6
    c₁ = max(tanh(x₂/2), 0),  c₂ = max(tanh(−x₂/2), 0)
    f₁ˢ = ((−x₁+7)² + 0.1(−x₂−8)²)/10 − 20,  f₂ˢ = ((−x₁−7)² + 0.1(−x₂−8)²)/10 − 20
    L₁ = scale · (f₁c₁ + f₁ˢc₂),  L₂ = f₂c₁ + f₂ˢc₂

``scale = 0.1`` makes the losses imbalanced (the Nash-MTL/FAMO setting). Each strategy starts
from the five standard points (−8.5, 7.5), (0, 0), (9, 9), (−7.5, −0.5), (9, −1) and steps ``x``
with Adam. The full run uses the papers' budget: lr 1e-3 for 35,000 steps (Nash-MTL's
``experiments/toy/trainer.py``; FAMO's runs 50,000: pass ``steps=50_000``); the quick run lr 1e-2
for 3,000 steps, the tiny one (tests) 20 steps.

Reference settings (read at AvivNavon/nash-mtl@cce1840 and Cranial-XIX/FAMO@0a6ad06): FAMO with
its toy γ = 0 (``weight_decay=0``; ``run.sh``: "the objective is not changing"), w_lr 0.025 and
``min_losses = [−21·scale, −21]``; Nash-MTL clips its update to norm 1 (``max_norm=1.0``, its
``WeightMethod.backward``). Every strategy is given the shifted losses ``L_t − L*_t`` with FAMO's
``L* = [−21·scale, −21]`` (below the infimum, so positive): gradients are unchanged, and
loss-based weightings (FAMO's and IGB's logarithms, …) see losses in their domain.

Judged in loss space, where the papers draw it. The Pareto front is computed numerically
(:func:`pareto_front`: the non-dominated loss pairs of a dense grid over ``x ∈ [−10, 10]²``,
refined on a finer grid around them); a run is judged by the distance of its final loss pair to
that front (:func:`front_distance`, in loss units) and by where on the front it ends
(:func:`front_position`: 0 at the end best for L₁, 1 at the end best for L₂; "end" below 0.1 or
above 0.9, "balanced" between). A run whose loss pair still moved more than ``MOVING`` over the
last 5 % of its steps is flagged as still moving. Solver failures (a solver that warned, e.g.
Nash-MTL at a Pareto-stationary point, where no bargaining solution exists) are counted per run.

Speed: the five starts of every strategy run together. One autograd pass gives the per-task
gradients of all runs; each run's own strategy objects (the loss weighting's ``objectives`` and
``observe``, the Gramian aggregator's ``solve``, FAMO's ``update``) do exactly what the Balancer
makes them do with ``at="params"``; one Adam over the stacked points steps them all (Adam is
element-wise, so this is one Adam per run). :func:`trajectory` runs one start through the
Balancer itself; a test checks the two agree. Strategies the fast path does not cover (learnable
weightings such as uncertainty weighting, layer-norm needs) run through the Balancer.
"""

from __future__ import annotations

import math
import pathlib
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import mtlbal
from benchmarks import strategies as S
from benchmarks.common import progress, seed_everything, select_strategies
from mtlbal.aggregation.base import GramianAggregator
from mtlbal.step import Need, StepContext

NAME = "toy"
TITLE = "Two-objective toy problem (CAGrad / Nash-MTL / FAMO)"
INITS: list[tuple[float, float]] = [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)]
LOWER = 5e-6
SCALE = 0.1
PAPER_STEPS = 35_000
PAPER_LR = 1e-3
MOVING = 0.05  # loss-space displacement over the last 5 % of the steps that flags a moving run
ON_FRONT = 0.05  # loss-space distance to the front below which a run has reached it
# the methods of the published figures first, then a few more of mtlbal's
DEFAULT_STRATEGIES = [
    "Equal",
    "MGDA",
    "PCGrad",
    "CAGrad",
    "NashMTL",
    "FAMO",
    "IMTLG",
    "UPGrad",
    "FairGrad",
]
# What the published figures show (Nash-MTL Fig. 1 at 35k steps, FAMO Fig. 2 at 50k):
# runs that reach the front out of 5, and where they end.
PUBLISHED = {
    "MGDA": "5/5 reach the front, all pulled to one end",
    "PCGrad": "4/5: the (9, 9) start does not reach the front",
    "CAGrad": "4/5: the (9, 9) start does not reach the front",
    "NashMTL": "5/5, spread along the front",
    "FAMO": "5/5, spread along the front",
    "Equal": "not shown in the figures",
}


def toy_losses(x: Tensor, scale: float = SCALE) -> Tensor:
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


def min_losses(scale: float = SCALE) -> Tensor:
    """The lower bounds ``L*`` used by FAMO's toy script: ``[−21·scale, −21]``."""
    return torch.tensor([-21.0 * scale, -21.0], dtype=torch.float64)


# ---- the Pareto front, numerically


def nondominated(points: np.ndarray) -> np.ndarray:
    """The non-dominated rows of ``points`` ``[n, 2]`` (both coordinates minimised), sorted by
    the first coordinate (the second then decreases)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    order = np.lexsort((p[:, 1], p[:, 0]))
    p = p[order]
    # a point is kept when its second coordinate is below that of every point before it
    prev_min = np.minimum.accumulate(np.concatenate([[np.inf], p[:-1, 1]]))
    return p[p[:, 1] < prev_min]


def pareto_front(
    fn: Any,
    lo: tuple[float, float] = (-10.0, -10.0),
    hi: tuple[float, float] = (10.0, 10.0),
    *,
    n: int = 801,
    refine: int = 4,
    n_fine: int = 1601,
    thin_fraction: float = 1e-4,
) -> np.ndarray:
    """The Pareto front ``[k, 2]`` of ``fn`` (``[..., 2]`` float64 points → ``[..., 2]``
    losses) over the box ``lo``–``hi``: the non-dominated loss pairs of an ``n × n`` grid, then
    ``refine`` times of an ``n_fine × n_fine`` grid over the box (one coarse cell wider) around
    the Pareto-optimal points found so far; sorted by the first loss and thinned to points at
    least ``thin_fraction`` of the front's extent apart (:func:`thin`)."""
    lo_a, hi_a = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)

    def evaluate(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g1, g2 = np.meshgrid(a, b, indexing="ij")
        xs = np.stack([g1.ravel(), g2.ravel()], -1)
        with torch.no_grad():
            ls = fn(torch.from_numpy(xs)).numpy()
        return xs, ls

    xs, ls = evaluate(np.linspace(lo_a[0], hi_a[0], n), np.linspace(lo_a[1], hi_a[1], n))
    step = (hi_a - lo_a) / (n - 1)
    for _ in range(refine):
        keep = _nondominated_mask(ls)
        px, pl = xs[keep], ls[keep]
        a_lo = np.maximum(px.min(0) - step, lo_a)
        a_hi = np.minimum(px.max(0) + step, hi_a)
        fx, fl = evaluate(
            np.linspace(a_lo[0], a_hi[0], n_fine), np.linspace(a_lo[1], a_hi[1], n_fine)
        )
        xs, ls = np.concatenate([px, fx]), np.concatenate([pl, fl])
        step = (a_hi - a_lo) / (n_fine - 1)
    return thin(nondominated(ls), thin_fraction)


def thin(front: np.ndarray, fraction: float) -> np.ndarray:
    """Every point of the sorted ``front`` at least ``fraction`` of its extent (the diagonal of
    its bounding box) from the previous kept point, and its last point: a dense grid gives
    many points a rounding error apart."""
    if len(front) < 3 or fraction <= 0:
        return front
    eps = fraction * float(np.hypot(*(front.max(0) - front.min(0))))
    keep = [0]
    last = front[0]
    for i in range(1, len(front) - 1):
        if np.hypot(*(front[i] - last)) >= eps:
            keep.append(i)
            last = front[i]
    keep.append(len(front) - 1)
    return front[keep]


def _nondominated_mask(ls: np.ndarray) -> np.ndarray:
    order = np.lexsort((ls[:, 1], ls[:, 0]))
    srt = ls[order]
    prev_min = np.minimum.accumulate(np.concatenate([[np.inf], srt[:-1, 1]]))
    mask = np.zeros(len(ls), dtype=bool)
    mask[order[srt[:, 1] < prev_min]] = True
    return mask


def _project(point: np.ndarray, front: np.ndarray) -> tuple[float, float]:
    """Distance of ``point`` to the polyline ``front`` and the arc-length fraction of its
    closest point."""
    a, b = front[:-1], front[1:]
    ab = b - a
    len2 = (ab**2).sum(1)
    t = np.clip(((point - a) * ab).sum(1) / np.where(len2 > 0, len2, 1.0), 0.0, 1.0)
    closest = a + t[:, None] * ab
    d = np.sqrt(((closest - point) ** 2).sum(1))
    i = int(np.argmin(d))
    seg = np.sqrt(len2)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    total = cum[-1] if cum[-1] > 0 else 1.0
    return float(d[i]), float((cum[i] + t[i] * seg[i]) / total)


def front_distance(point: Any, front: np.ndarray) -> float:
    """Euclidean distance of the loss pair ``point`` to the front (a polyline through its
    points, in loss units); 0 on the front. A point that dominates part of the front (only
    possible within the grid's resolution) gets its distance too, not a negative value."""
    if len(front) == 1:
        return float(np.hypot(*(np.asarray(point) - front[0])))
    return _project(np.asarray(point, dtype=np.float64), front)[0]


def front_position(point: Any, front: np.ndarray) -> float:
    """Where on the front the loss pair's closest point lies: the arc-length fraction from the
    end best for the first loss (0) to the end best for the second (1)."""
    if len(front) == 1:
        return 0.5
    return _project(np.asarray(point, dtype=np.float64), front)[1]


def where_on_front(pos: float) -> str:
    return "L₁ end" if pos < 0.1 else "L₂ end" if pos > 0.9 else "balanced"


_FRONT_CACHE: dict[tuple[float, int, int], np.ndarray] = {}


def toy_front(scale: float = SCALE, *, n: int = 801, n_fine: int = 1601) -> np.ndarray:
    """The toy problem's Pareto front in loss space (cached per ``scale`` and grid)."""
    key = (scale, n, n_fine)
    if key not in _FRONT_CACHE:
        _FRONT_CACHE[key] = pareto_front(lambda x: toy_losses(x, scale), n=n, n_fine=n_fine)
    return _FRONT_CACHE[key]


# ---- the runs


def _spec(strategy: str, seed: int, scale: float) -> S.Spec:
    """The strategy as the reference toy scripts run it (see the module docstring)."""
    if strategy == "FAMO":
        return S.Spec(weighting=mtlbal.weighting.FAMO(2, weight_decay=0.0))
    if strategy == "NashMTL":
        return S.Spec(aggregator=mtlbal.aggregation.NashMTL(on_failure="warn", max_norm=1.0))
    return S.get(strategy)(2, seed)


def fast_path_supported(spec: S.Spec) -> bool:
    """Whether :func:`run_batched` can run this strategy: a weighting without parameters of
    its own (its gradient would need the Balancer's optimizer) and without layer-norm needs."""
    w = spec.weighting
    if w is None:
        return True
    if any(True for _ in w.parameters()) or w.grad_norm_params():
        return False
    return Need.LAYER_NORMS not in w.needs


class _Point(nn.Module):
    def __init__(self, init: tuple[float, float]) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(init, dtype=torch.float64))

    def forward(self) -> Tensor:
        return self.x * 1.0


def _is_solver_warning(w: warnings.WarningMessage) -> bool:
    return "solver" in type(w.message).__name__.lower()


def trajectory(
    strategy: str,
    init: tuple[float, float],
    *,
    steps: int,
    lr: float,
    seed: int,
    scale: float = SCALE,
    record_every: int = 10,
) -> dict[str, Any]:
    """Run one strategy from one start through the :class:`~mtlbal.Balancer`; the recorded path
    (``x``), the end point and the solver failures."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = _trajectory(
            strategy, init, steps=steps, lr=lr, seed=seed, scale=scale, record_every=record_every
        )
    row["solver_failures"] = sum(1 for w in caught if _is_solver_warning(w))
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
    spec = _spec(strategy, seed, scale)
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
    shift = min_losses(scale)
    for k in range(steps):
        losses = toy_losses(point(), scale) - shift
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
                after = toy_losses(point(), scale) - shift
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
    return {
        "strategy": strategy,
        "init": list(init),
        "end": point.x.detach().tolist(),
        "path": path,
    }


@dataclass
class _Run:
    strategy: str
    init: tuple[float, float]
    spec: S.Spec
    failures: int = 0


def run_batched(
    strategies: list[str],
    inits: list[tuple[float, float]],
    *,
    steps: int,
    lr: float,
    seed: int,
    scale: float = SCALE,
    record_every: int = 10,
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """Every (strategy, start) run at once (see the module docstring); one dict per run, in the
    order strategies × inits, as :func:`trajectory` returns."""
    seed_everything(seed)
    runs: list[_Run] = []
    for s in strategies:
        for init in inits:
            spec = _spec(s, seed, scale)
            if not fast_path_supported(spec):
                raise ValueError(f"toy: {s} needs the Balancer path (trajectory), not run_batched")
            runs.append(_Run(s, init, spec))
    x = torch.tensor([r.init for r in runs], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=lr)
    equal = mtlbal.weighting.Equal()
    shift = min_losses(scale)
    tasks = ("L1", "L2")
    epoch = max(steps // 100, 1)
    paths: list[list[list[float]]] = [[list(r.init)] for r in runs]
    it = progress(range(steps), total=steps, desc="toy", enabled=show_progress)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in it:
            losses = toy_losses(x, scale) - shift  # [b, 2]
            g1 = torch.autograd.grad(losses[:, 0].sum(), x, retain_graph=True)[0]
            g2 = torch.autograd.grad(losses[:, 1].sum(), x)[0]
            jac = torch.stack([g1, g2], dim=1)  # [b, 2 tasks, 2 params]
            raw = losses.detach()
            direction = torch.empty_like(x)
            for i, r in enumerate(runs):
                before = len(caught)
                ctx = StepContext(step=k, tasks=tasks, losses=raw[i], all_tasks=tasks)
                weighting = r.spec.weighting or equal
                wts = weighting.objectives(raw[i], ctx).weights.detach()
                j = wts[:, None] * jac[i]
                agg = r.spec.aggregator
                if agg is None:
                    d = j.sum(0)
                elif isinstance(agg, GramianAggregator):
                    g = j @ j.T
                    d = agg.solve((g + g.T) / 2, ctx) @ j
                else:
                    d = agg.aggregate_jacobian(j, ctx)
                weighting.observe(raw[i])
                direction[i] = d
                r.failures += sum(1 for w in caught[before:] if _is_solver_warning(w))
            x.grad = direction
            opt.step()
            with torch.no_grad():
                after = toy_losses(x, scale) - shift
            for i, r in enumerate(runs):
                w = r.spec.weighting
                update = getattr(w, "update", None)
                if w is not None and callable(update):
                    update(after[i])
                if w is not None and (k + 1) % epoch == 0:
                    w.epoch_end()
            if (k + 1) % record_every == 0:
                for i, p in enumerate(x.detach().tolist()):
                    paths[i].append(p)
            del caught[:]
    return [
        {
            "strategy": r.strategy,
            "init": list(r.init),
            "end": x[i].detach().tolist(),
            "path": paths[i],
            "solver_failures": r.failures,
        }
        for i, r in enumerate(runs)
    ]


def judge(row: dict[str, Any], front: np.ndarray, scale: float = SCALE) -> dict[str, Any]:
    """Loss-space verdict of one run: final losses, distance to the front, position on it,
    whether it is still moving (displacement over the last 5 % of the recorded path)."""
    path = torch.tensor(row["path"], dtype=torch.float64)
    lp = toy_losses(path, scale).numpy()
    end = lp[-1]
    tail = lp[max(0, len(lp) - 1 - max(1, round(0.05 * (len(lp) - 1))))]
    dist = front_distance(end, front)
    pos = front_position(end, front)
    moved = float(np.hypot(*(end - tail)))
    return {
        "L1": float(end[0]),
        "L2": float(end[1]),
        "front_dist": dist,
        "on_front": dist <= ON_FRONT,
        "front_pos": pos,
        "where": where_on_front(pos) if dist <= ON_FRONT else "off the front",
        "tail_move": moved,
        "moving": moved > MOVING,
    }


def _plot(
    results: dict[str, list[dict[str, Any]]], front: np.ndarray, path: pathlib.Path, scale: float
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols, 3.3 * rows + 0.7), squeeze=False, sharex=True, sharey=True
    )
    markers = ["o", "s", "^", "D", "v"]
    colors = plt.get_cmap("tab10")
    handles: list[Any] = []
    for ax, name in zip(axes.flat, names):
        ax.plot(front[:, 0], front[:, 1], "-", color="0.55", lw=5, alpha=0.6, zorder=1)
        for i, r in enumerate(results[name]):
            lp = toy_losses(torch.tensor(r["path"], dtype=torch.float64), scale).numpy()
            ax.plot(lp[:, 0], lp[:, 1], "-", color=colors(i), lw=1.2, zorder=2)
            ax.plot(*lp[0], markers[i % 5], color=colors(i), mec="k", ms=6, zorder=3)
            ax.plot(*lp[-1], "*", color=colors(i), mec="k", ms=11, zorder=4)
        fails = sum(r.get("solver_failures", 0) for r in results[name])
        on = sum(r["on_front"] for r in results[name])
        extra = f", {fails} solver failures" if fails else ""
        ax.set_title(f"{name}: {on}/{len(results[name])} on the front{extra}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel(f"L₁ (× {scale})")
    for ax in axes[:, 0]:
        ax.set_ylabel("L₂")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color="0.55", lw=5, alpha=0.6, label="Pareto front")]
    for i, init in enumerate(INITS):
        handles.append(
            plt.Line2D(
                [], [], color=colors(i), marker=markers[i], mec="k", lw=1.2, label=f"start {init}"
            )
        )
    handles.append(plt.Line2D([], [], color="k", marker="*", lw=0, ms=10, label="end"))
    fig.legend(handles=handles, loc="upper center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / (3.3 * rows + 0.7)))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def collect(
    names: list[str],
    *,
    steps: int,
    lr: float,
    seed: int,
    scale: float = SCALE,
    show_progress: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Run every strategy from every start: the batched runner where it applies, the Balancer
    for the rest; ``{strategy: [run, ...]}`` (runs as :func:`trajectory` returns them)."""
    record = max(1, steps // 1000)
    fast = [s for s in names if fast_path_supported(_spec(s, seed, scale))]
    res: dict[str, list[dict[str, Any]]] = {s: [] for s in names}
    for r in run_batched(
        fast,
        INITS,
        steps=steps,
        lr=lr,
        seed=seed,
        scale=scale,
        record_every=record,
        show_progress=show_progress,
    ):
        res[r["strategy"]].append(r)
    slow = [(s, init) for s in names if s not in fast for init in INITS]
    for s, init in progress(slow, total=len(slow), desc="toy (Balancer)", enabled=show_progress):
        res[s].append(
            trajectory(s, init, steps=steps, lr=lr, seed=seed, scale=scale, record_every=record)
        )
    return res


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
    names, missing = select_strategies(strategies if strategies is not None else DEFAULT_STRATEGIES)
    # a regulariser of per-sample representations (Rep-MTL) has no batch on a 2-D point
    for n in [n for n in names if S.get(n)(2, 0).transforms]:
        names.remove(n)
        missing[n] = "needs a batch of representations (not a single point)"
    n_steps = steps if steps is not None else (20 if tiny else 3000 if quick else PAPER_STEPS)
    lr = lr if lr is not None else (1e-2 if quick or tiny else PAPER_LR)
    seed = seeds[0] if seeds else 0
    res = collect(names, steps=n_steps, lr=lr, seed=seed, show_progress=show_progress)
    return report(
        res, steps=n_steps, lr=lr, quick=quick, tiny=tiny, out_dir=out_dir, missing=missing
    )


def report(
    res: dict[str, list[dict[str, Any]]],
    *,
    steps: int,
    lr: float,
    quick: bool,
    tiny: bool = False,
    out_dir: pathlib.Path | None = None,
    missing: dict[str, str] | None = None,
    scale: float = SCALE,
) -> dict[str, Any]:
    """Judge the runs of :func:`collect` against the front; the suite's result (table, plot)."""
    names = list(res)
    n_steps = steps
    front = toy_front(scale, n=201, n_fine=401) if tiny else toy_front(scale)
    rows = []
    for s in names:
        for r in res[s]:
            r.update(judge(r, front, scale))
            rows.append({k: v for k, v in r.items() if k != "path"})
    lines = [
        "| strategy | on the front | ends | still moving | solver failures | "
        + " | ".join(f"from {tuple(i)}" for i in INITS)
        + " | published figure |",
        "|" + "---|" * (5 + len(INITS)),
    ]
    for s in names:
        rs = res[s]
        on = sum(r["on_front"] for r in rs)
        ends = {w: sum(r["where"] == w for r in rs) for w in ("L₁ end", "balanced", "L₂ end")}
        ends_txt = ", ".join(f"{v} {k}" for k, v in ends.items() if v) or "–"
        moving = sum(r["moving"] for r in rs)
        fails = sum(r["solver_failures"] for r in rs)
        cells = [s, f"{on}/{len(rs)}", ends_txt, f"{moving}/{len(rs)}", f"{fails}"]
        cells += [
            f"{r['where']} (d {r['front_dist']:.3f}{', moving' if r['moving'] else ''})" for r in rs
        ]
        cells.append(PUBLISHED.get(s, "–"))
        lines.append("| " + " | ".join(cells) + " |")
    plots: list[str] = []
    if out_dir is not None and names:
        out_dir.mkdir(parents=True, exist_ok=True)
        p = out_dir / "toy_trajectories.png"
        _plot(res, front, p, scale)
        plots.append(p.name)
    md = (
        f"### {TITLE}\n\nAdam lr {lr}, {n_steps} steps, L₁ scaled by {scale}; the five standard "
        "starting points; FAMO with the toy's γ = 0, Nash-MTL with its update clipped to norm 1, "
        "as their reference scripts. Judged in loss space against the numerically computed "
        f"Pareto front ({len(front)} points): *on the front* = final loss pair within "
        f"{ON_FRONT} of it; *ends* = where on the front (L₁ end / balanced / L₂ end: the first "
        "or last 10 % of its length); *still moving* = the loss pair moved more than "
        f"{MOVING} over the last 5 % of the steps; *d* = distance to the front (loss units); "
        "solver failures = steps where the solver found no solution (Nash-MTL then keeps its "
        "previous weights).\n\n" + "\n".join(lines) + "\n"
    )
    for p_name in plots:
        md += f"\n![toy trajectories in loss space]({p_name})\n"
    return {
        "name": NAME,
        "title": TITLE,
        "config": {
            "steps": n_steps,
            "lr": lr,
            "scale": scale,
            "inits": INITS,
            "quick": quick,
            "on_front_tol": ON_FRONT,
            "moving_tol": MOVING,
        },
        "rows": rows,
        "markdown": md,
        "plots": plots,
        "missing_strategies": missing or {},
        # the overview's column: runs that end on the front, out of the starts
        "overview": {
            "title": "on the Pareto front",
            "cells": {s: f"{sum(r['on_front'] for r in res[s])}/{len(res[s])}" for s in names},
        },
    }
