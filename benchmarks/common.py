"""What the accuracy suites share: seeding, the MLP models, the training loop of one strategy,
the single-task baseline, and the summary table (Δm%, Δp, mean rank, mean ± std)."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import mtlbal
from benchmarks import metrics as M
from benchmarks import stats as ST
from benchmarks import strategies as S
from benchmarks.registry import TaskType

__all__ = [
    "STL",
    "Problem",
    "TaskSpec",
    "TrainConfig",
    "progress",
    "run_problem",
    "seed_everything",
    "select_strategies",
    "summarize",
]

STL = "STL"
# the reference every strategy is compared with, seed by seed
REFERENCE = "Equal"

# options of the command that reach every suite without passing through its run(): ``heads``
# ("raw": mtlbal's head gradients; "reference": as each method's reference, see weight_heads)
OPTIONS: dict[str, Any] = {"heads": "raw"}


def missing_note(missing: dict[str, str]) -> str:
    """The report line listing strategies absent from this mtlbal (empty when none)."""
    if not missing:
        return ""
    return "\nNot run (absent from this mtlbal): " + ", ".join(sorted(missing)) + ".\n"


def delta_m_section(
    summary_rows: list[dict[str, Any]], out_dir: Any, stem: str, title: str
) -> tuple[str, list[str]]:
    """Plot Δm% per strategy as ``<stem>_delta_m.png`` in ``out_dir`` (when given and there are
    rows); return the Markdown that shows it and the plot names."""
    if out_dir is None or not summary_rows:
        return "", []
    folder = pathlib.Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{stem}_delta_m.png"
    plot_delta_m(summary_rows, folder / name, title)
    return f"\n![Δm% per strategy]({name})\n", [name]


def save_suite_result(result: dict[str, Any], out_dir: Any) -> dict[str, Any]:
    """Write ``result`` as ``<name>.json`` and its Markdown as ``<name>.md`` in ``out_dir``
    (when given) and return it."""
    if out_dir is not None:
        folder = pathlib.Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{result['name']}.json").write_text(json.dumps(result, indent=2))
        (folder / f"{result['name']}.md").write_text(result["markdown"] + "\n")
    return result


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) and ask torch for deterministic kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def progress(iterable: Iterable[Any], *, total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar on stderr when tqdm is installed and ``enabled``; the plain iterable otherwise."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the bench extra
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def select_strategies(names: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The strategies to run (all available ones by default) and the ones left out, with why."""
    return S.available(names)


@dataclass(frozen=True)
class TaskSpec:
    """One task: its loss (``"ce"`` classification, ``"mse"`` regression) and its metric."""

    name: str
    loss: Literal["ce", "mse"]
    metric: Literal["acc", "mae", "mse"]
    out_dim: int = 1
    scale: float = 1.0  # metric reported as metric(pred, y) · scale (MAE) or · scale² (MSE)

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "acc"

    @property
    def key(self) -> str:
        return f"{self.name}/{self.metric}"


@dataclass
class Problem:
    """A multi-task dataset: inputs ``[N, d]`` and targets ``[N, m]`` (class indices stored as
    floats for classification tasks)."""

    name: str
    tasks: list[TaskSpec]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    hidden: tuple[int, ...] = (256, 64)

    @property
    def m(self) -> int:
        return len(self.tasks)

    def to(self, device: str) -> Problem:
        return Problem(
            self.name,
            self.tasks,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.hidden,
        )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3


class MTLNet(nn.Module):
    """An MLP trunk (Linear+ReLU layers) and one linear head per task."""

    def __init__(self, d_in: int, hidden: Sequence[int], out_dims: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = d_in
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(prev, o) for o in out_dims])

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [h(z) for h in self.heads]


class StackedLinear(nn.Module):
    """``m`` independent linear layers applied to ``[m, B, d_in]`` (initialised like
    ``nn.Linear``)."""

    def __init__(self, m: int, d_in: int, d_out: int) -> None:
        super().__init__()
        ws, bs = [], []
        for _ in range(m):
            lin = nn.Linear(d_in, d_out)
            ws.append(lin.weight.detach().T.clone())
            bs.append(lin.bias.detach().clone())
        self.weight = nn.Parameter(torch.stack(ws))  # [m, d_in, d_out]
        self.bias = nn.Parameter(torch.stack(bs)[:, None, :])  # [m, 1, d_out]

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class STLNet(nn.Module):
    """``m`` single-task networks (same architecture as :class:`MTLNet`, one trunk each) trained
    together: their parameters are disjoint, so the gradient of the summed loss is each
    network's own gradient and Adam (element-wise) trains each exactly as if alone."""

    def __init__(self, d_in: int, hidden: Sequence[int], out_dims: Sequence[int]) -> None:
        super().__init__()
        m = len(out_dims)
        dims = [d_in, *hidden]
        self.layers = nn.ModuleList([StackedLinear(m, a, b) for a, b in itertools.pairwise(dims)])
        self.head = StackedLinear(m, dims[-1], max(out_dims))
        self.out_dims = list(out_dims)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = x.unsqueeze(0).expand(len(self.out_dims), *x.shape)
        for layer in self.layers:
            h = F.relu(layer(h))
        out = self.head(h)
        return [out[t, :, :o] for t, o in enumerate(self.out_dims)]


def _task_loss(task: TaskSpec, pred: Tensor, y: Tensor) -> Tensor:
    if task.loss == "ce":
        return F.cross_entropy(pred, y.long())
    return F.mse_loss(pred.squeeze(-1), y)


@torch.no_grad()
def evaluate(model: nn.Module, problem: Problem, batch: int = 4096) -> dict[str, float]:
    """The test metric of every task, ``{task/metric: value}``."""
    model.eval()
    outs: list[list[Tensor]] = []
    for i in range(0, problem.x_test.shape[0], batch):
        outs.append(model(problem.x_test[i : i + batch]))
    model.train()
    res: dict[str, float] = {}
    for t, task in enumerate(problem.tasks):
        pred = torch.cat([o[t] for o in outs])
        y = problem.y_test[:, t]
        if task.metric == "acc":
            v = (pred.argmax(-1) == y.long()).double().mean().item()
        elif task.metric == "mae":
            v = (pred.squeeze(-1) - y).abs().double().mean().item() * task.scale
        else:
            v = (pred.squeeze(-1) - y).double().pow(2).mean().item() * task.scale**2
        res[task.key] = v
    return res


def task_types(tasks: Sequence[TaskSpec]) -> list[TaskType]:
    """``"classification"`` for the cross-entropy tasks, ``"regression"`` for the others (what
    UW's Kendall form needs: the registry passes it to the rows that use it)."""
    return ["classification" if t.loss == "ce" else "regression" for t in tasks]


def weight_heads(heads: Sequence[nn.Module], info: Any) -> None:
    """Scale head ``t``'s gradient by the step's gradient weight ``w_t`` (``--heads
    reference``): what the references of Nash-MTL and MGDA (nash-mtl's code) do by
    back-propagating ``Σ_t w_t L_t``, where mtlbal gives each head its raw ``∇L_t``.

    Only the rows whose reference does it (``registry.Bench.reference_heads``) are changed; a
    step without gradient weights (a loss weighting: its heads are weighted already) is left
    alone. Head ``t`` must read task ``t``'s loss only.
    """
    w = getattr(info, "grad_weights", None)
    if w is None:
        return
    for t, head in enumerate(heads):
        for p in head.parameters():
            if p.grad is not None:
                p.grad.mul_(w[t].to(p.grad.dtype))


def train_one(
    problem: Problem,
    strategy: str,
    seed: int,
    cfg: TrainConfig,
    device: str = "cpu",
    *,
    heads: Literal["raw", "reference"] | None = None,
) -> dict[str, Any]:
    """Train one network with ``strategy`` (or the single-task baselines for :data:`STL`) and
    return ``{"strategy", "seed", "wall_s", <task/metric>: value, ...}``.

    ``heads="reference"``: the heads of the rows whose reference weights them get ``w_t ∇L_t``
    (:func:`weight_heads`); ``"raw"`` (mtlbal's behaviour): ``∇L_t``; ``None``: the command's
    ``--heads`` (:data:`OPTIONS`)."""
    seed_everything(seed)
    out_dims = [t.out_dim for t in problem.tasks]
    d_in = problem.x_train.shape[1]
    model: nn.Module
    head_modules: Sequence[nn.Module] = []
    reference_heads = False
    if strategy == STL:
        model = STLNet(d_in, problem.hidden, out_dims).to(device)
        opt: Any = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        balancer = None
    else:
        net = MTLNet(d_in, problem.hidden, out_dims).to(device)
        model = net
        spec = S.get(strategy)(problem.m, seed, task_types=task_types(problem.tasks))
        balancer = mtlbal.Balancer(
            net.trunk,
            weighting=spec.weighting,
            aggregator=spec.aggregator,
            at=net.trunk if spec.at == "cut" else "params",
            **({"transforms": spec.transforms} if spec.transforms is not None else {}),
            solve_every=spec.solve_every,
        ).to(device)
        reference_heads = (heads or OPTIONS["heads"]) == "reference" and spec.reference_heads
        head_modules = list(net.heads)
        opt = mtlbal.wrap(torch.optim.Adam(net.parameters(), lr=cfg.lr), balancer)
    gen = torch.Generator().manual_seed(seed)
    n = problem.x_train.shape[0]
    names = [t.name for t in problem.tasks]
    # validation-driven strategies (Need.VALIDATION: CoBa) get a validation split held out of
    # the training set (the last tenth; the test set is never used) and one validation batch
    # after every step, as in CoBa's paper; they train on the other nine tenths
    n_val = 0
    if balancer is not None and mtlbal.step.Need.VALIDATION in balancer.needs:
        n_val = max(1, n // 10)
        n -= n_val
    val_at = 0
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen).to(problem.x_train.device)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb, yb = problem.x_train[idx], problem.y_train[idx]
            preds = model(xb)
            losses = [
                _task_loss(task, p, yb[:, t])
                for t, (task, p) in enumerate(zip(problem.tasks, preds))
            ]
            opt.zero_grad(set_to_none=True)
            if balancer is None:
                torch.stack(losses).sum().backward()
            elif spec.closure:  # F-MTL: the forward again, on the same batch

                def closure(xb: Tensor = xb, yb: Tensor = yb) -> dict[str, Tensor]:
                    again = model(xb)
                    return {
                        task.name: _task_loss(task, p, yb[:, t])
                        for t, (task, p) in enumerate(zip(problem.tasks, again))
                    }

                opt.backward(dict(zip(names, losses)), closure=closure)
            else:
                info = opt.backward(dict(zip(names, losses)))
                if reference_heads:
                    weight_heads(head_modules, info)
            opt.step()
            if balancer is not None and callable(getattr(balancer.weighting, "update", None)):
                # FAMO: re-evaluate the same batch after the step, feed it back
                with torch.no_grad():
                    preds = model(xb)
                    after = [
                        _task_loss(task, p, yb[:, t])
                        for t, (task, p) in enumerate(zip(problem.tasks, preds))
                    ]
                balancer.update(dict(zip(names, after)))
            if n_val:
                vi = n + (torch.arange(val_at, val_at + cfg.batch_size) % n_val)
                val_at = (val_at + cfg.batch_size) % n_val
                vi = vi.to(problem.x_train.device)
                with torch.no_grad():
                    preds = model(problem.x_train[vi])
                    vloss = [
                        _task_loss(task, p, problem.y_train[vi][:, t])
                        for t, (task, p) in enumerate(zip(problem.tasks, preds))
                    ]
                opt.observe_validation(dict(zip(names, vloss)))
        if balancer is not None:
            balancer.epoch_end()
    wall = time.perf_counter() - t0
    if balancer is not None:
        balancer.remove()
    row: dict[str, Any] = {"strategy": strategy, "seed": seed}
    row.update(evaluate(model, problem))
    row["wall_s"] = round(wall, 3)
    return row


def run_problem(
    problem: Problem,
    strategies: list[str],
    seeds: list[int],
    cfg: TrainConfig,
    *,
    device: str = "cpu",
    desc: str = "",
    show_progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every strategy and the single-task baselines once per seed; the rows of
    :func:`train_one` (seeds interleaved so that a slow stretch of a shared machine does not hit
    one strategy only)."""
    prob = problem.to(device)
    jobs = [(s, seed) for seed in seeds for s in [STL, *strategies]]
    rows = []
    for s, seed in progress(
        jobs, total=len(jobs), desc=desc or problem.name, enabled=show_progress
    ):
        row = train_one(prob, s, seed, cfg, device)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def _fmt(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


@dataclass
class Summary:
    rows: list[dict[str, Any]] = field(default_factory=list)
    markdown: str = ""
    # compare(rows): the paired statistics against REFERENCE ({} when not computable)
    stats: dict[str, Any] = field(default_factory=dict)


def compare(rows: list[dict[str, Any]], key: str = "delta_m") -> dict[str, Any]:
    """The seed-paired statistics of a suite's rows against :data:`REFERENCE` (lower is better):
    ``{"per": {strategy: {diff, low, high, p, p_holm, verdict, sd, n, group}}, "n_differ",
    "n_compared", "sd", "seeds", "detectable", "seeds_for_1pt"}`` (see :mod:`benchmarks.stats`);
    ``{}`` when there is no reference row or fewer than two seeds."""
    values: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["strategy"] == STL or key not in r:
            continue
        values.setdefault(r["strategy"], {})[int(r["seed"])] = float(r[key])
    if REFERENCE not in values or len(values[REFERENCE]) < 2 or len(values) < 2:
        return {}
    per = ST.compare_to_reference(values, REFERENCE)
    letters = ST.groups(values)
    for s, v in per.items():
        v["group"] = letters[s]
    sds = [float(v["sd"]) for v in per.values() if np.isfinite(float(v["sd"]))]
    sd = float(np.median(sds)) if sds else float("nan")
    n = len(values[REFERENCE])
    k = len(per)
    return {
        "reference": REFERENCE,
        "key": key,
        "per": per,
        "reference_group": letters[REFERENCE],
        "n_compared": k,
        "n_differ": sum(v["verdict"] != "indistinguishable" for v in per.values()),
        "sd": sd,
        "seeds": n,
        "detectable": ST.detectable_difference(sd, n, comparisons=k) if sds else float("nan"),
        "seeds_for_1pt": ST.seeds_needed(1.0, sd, comparisons=k) if sds else None,
        "seeds_for": {str(d): ST.seeds_needed(float(d), sd, comparisons=k) for d in (1, 2, 5, 10)}
        if sds
        else {},
    }


def power_note(stats: dict[str, Any], unit: str = "points of Δm%") -> str:
    """One Markdown paragraph: how many comparisons differ, and what the seeds can detect."""
    if not stats:
        return ""
    return (
        f"Against {stats['reference']} (seed-paired, 95% t-interval, Holm over "
        f"{stats['n_compared']} strategies): **{stats['n_differ']} of {stats['n_compared']} "
        f"differ**. The median paired SD is {stats['sd']:.2f} {unit}; with {stats['seeds']} "
        f"seeds a true difference of {stats['detectable']:.2f} {unit} is detected with 80% power "
        f"(Holm at worst Bonferroni); detecting a difference of "
        + " / ".join(stats.get("seeds_for", {}))
        + " points needs "
        + " / ".join(str(v) for v in stats.get("seeds_for", {}).values())
        + " seeds. "
        "Groups: strategies sharing a letter cannot be told apart (pairwise, Holm over all "
        "pairs).\n"
    )


def _interval(v: dict[str, Any]) -> str:
    if not np.isfinite(float(v["low"])):
        return f"{float(v['diff']):+.2f}"
    return f"{float(v['diff']):+.2f} [{float(v['low']):+.2f}, {float(v['high']):+.2f}]"


VERDICT_MARK = {"better": "better", "worse": "worse", "indistinguishable": "≈"}


def summarize(
    problem_tasks: Sequence[TaskSpec],
    rows: list[dict[str, Any]],
    *,
    metric_digits: int = 4,
    max_metric_columns: int = 11,
) -> Summary:
    """Per strategy: every metric as mean ± std over seeds, Δm% and Δp against the mean of the
    single-task baselines (per seed, then mean ± std), and — when the suite ran
    :data:`REFERENCE` with two seeds or more — the seed-paired difference of Δm% against it with
    its 95% interval, the Holm-corrected verdict and the group letters (:func:`compare`). Adds
    ``delta_m``/``delta_p`` to each MTL row. The mean rank is kept in the rows (``mean_rank``)
    but not shown: a ranking without its uncertainty is not reported."""
    keys = [t.key for t in problem_tasks]
    hib = [t.higher_is_better for t in problem_tasks]
    task_of = [t.name for t in problem_tasks]
    stl = [r for r in rows if r["strategy"] == STL]
    if not stl:
        raise ValueError("no single-task baseline row: Δm needs one")
    base = [float(np.mean([r[k] for r in stl])) for k in keys]
    order: list[str] = []
    for r in rows:
        if r["strategy"] not in order:
            order.append(r["strategy"])
    per: dict[str, list[dict[str, Any]]] = {
        s: [r for r in rows if r["strategy"] == s] for s in order
    }
    for rs in per.values():
        for r in rs:
            vals = [r[k] for k in keys]
            r["delta_m"] = M.delta_m(vals, base, hib)
            r["delta_p"] = M.delta_p(vals, base, hib, task_of)
    mtl = [s for s in order if s != STL]
    means = {s: [float(np.mean([r[k] for r in per[s]])) for k in keys] for s in order}
    ranks = M.mean_rank({s: means[s] for s in mtl}, hib) if mtl else {}
    stats = compare(rows)
    show_metrics = len(keys) <= max_metric_columns
    header = ["strategy"]
    if show_metrics:
        header += [f"{k} {'↑' if h else '↓'}" for k, h in zip(keys, hib)]
    header += ["Δm% ↓", "Δp% ↑"]
    if stats:
        header += [f"Δm% − {REFERENCE} [95% CI]", "verdict", "group"]
    header += ["worst task Δ% ↓", "s/run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summary_rows = []
    for s in order:
        rs = per[s]
        dm = M.mean_std([r["delta_m"] for r in rs])
        dp = M.mean_std([r["delta_p"] for r in rs])
        # worst task: the largest signed relative drop of any single metric (seed means)
        rel = [(-1.0 if h else 1.0) * (v - b) / b * 100 for v, b, h in zip(means[s], base, hib)]
        worst = max(rel)
        wall = float(np.median([r["wall_s"] for r in rs]))
        srow: dict[str, Any] = {
            "strategy": s,
            "n_seeds": len(rs),
            "delta_m": dm[0],
            "delta_m_std": dm[1],
            "delta_p": dp[0],
            "delta_p_std": dp[1],
            "mean_rank": ranks.get(s),
            "worst_task_delta": worst,
            "median_wall_s": wall,
        }
        cmp = stats.get("per", {}).get(s) if stats else None
        if cmp is not None:
            srow.update(
                {
                    "vs_ref": cmp["diff"],
                    "vs_ref_low": cmp["low"],
                    "vs_ref_high": cmp["high"],
                    "p_holm": cmp["p_holm"],
                    "verdict": cmp["verdict"],
                    "group": cmp["group"],
                }
            )
        elif stats and s == REFERENCE:
            srow.update({"vs_ref": 0.0, "verdict": "reference", "group": stats["reference_group"]})
        cells = [f"**{s}**" if s == STL else s]
        for k in keys:
            ms = M.mean_std([r[k] for r in rs])
            srow[k] = ms[0]
            srow[k + "_std"] = ms[1]
            if show_metrics:
                cells.append(_fmt(ms[0], ms[1], metric_digits))
        if s == STL:
            cells += ["0 (ref.)", "0 (ref.)"]
            if stats:
                cells += ["–", "–", "–"]
            cells += ["0", f"{wall:.1f}"]
        else:
            cells += [_fmt(dm[0], dm[1], 2), _fmt(dp[0], dp[1], 2)]
            if stats:
                if cmp is not None:
                    cells += [_interval(cmp), VERDICT_MARK[str(cmp["verdict"])], str(cmp["group"])]
                else:
                    cells += ["0 (ref.)", "–", str(stats["reference_group"])]
            cells += [f"{worst:+.2f}", f"{wall:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
        summary_rows.append(srow)
    md = "\n".join(lines)
    if stats:
        md += "\n\n" + power_note(stats)
    return Summary(summary_rows, md, stats)


# one colour and one marker per strategy, the same in every plot. The quick rows (what `make
# bench` shows together) come first, so they get 12 distinct colours (tab10 and two dark extra
# colours, all dark enough to read as thin lines on white); the (colour, marker) pairs repeat
# only after 20 × 9 strategies
_MARKERS = "osD^vP*Xh"
_COLOURS = [
    *(f"C{i}" for i in range(10)),
    "black",
    "darkgoldenrod",
    "navy",
    "maroon",
    "teal",
    "olive",
    "indigo",
    "darkslategray",
    "crimson",
    "sienna",
]


def style(name: str) -> tuple[Any, str]:
    """The (colour, marker) of strategy ``name`` in every plot of the report."""
    names = [STL, *S.QUICK, *(n for n in S.STRATEGIES if n not in S.QUICK)]
    i = names.index(name) if name in names else len(names) + sum(map(ord, name))
    return _COLOURS[i % len(_COLOURS)], _MARKERS[i % len(_MARKERS)]


def plot_delta_m(summary_rows: list[dict[str, Any]], path: Any, title: str) -> None:
    """Each strategy's seed-paired difference of Δm% against :data:`REFERENCE` with its 95%
    interval (a forest plot, best at the top; a dashed line at 0 = the reference). Without the
    paired statistics (one seed, no reference row): Δm% ± std against single-task learning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary_rows if r["strategy"] not in (STL,)]
    paired_ = any("vs_ref_low" in r for r in rows)
    if paired_:
        rows = [r for r in rows if "vs_ref_low" in r]
        rows.sort(key=lambda r: -float(r["vs_ref"]))
        xs = [float(r["vs_ref"]) for r in rows]
        lo = [x - float(r["vs_ref_low"]) for x, r in zip(xs, rows)]
        hi = [float(r["vs_ref_high"]) - x for x, r in zip(xs, rows)]
        xlabel = f"Δm% − Δm%({REFERENCE}), percentage points (95% CI; lower is better)"
    else:
        rows.sort(key=lambda r: -float(r["delta_m"]))
        xs = [float(r["delta_m"]) for r in rows]
        lo = hi = [float(r["delta_m_std"]) for r in rows]
        xlabel = "Δm% vs single-task learning (mean ± std over seeds; lower is better)"
    finite = [v for v in [*lo, *hi] if np.isfinite(v)]
    cap = 10 * (max(finite) if finite else 1.0) + 1.0
    lo = [min(v, cap) for v in lo]
    hi = [min(v, cap) for v in hi]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.4))
    for y, (r, x, a, b) in enumerate(zip(rows, xs, lo, hi)):
        color, marker = style(r["strategy"])
        ax.errorbar(
            x,
            y,
            xerr=[[a], [b]],
            fmt=marker,
            color=color,
            ms=6,
            capsize=3,
            lw=1.2,
            markeredgecolor="k",
            markeredgewidth=0.4,
        )
        verdict = r.get("verdict")
        if verdict in ("better", "worse", "indistinguishable"):
            ax.annotate(
                VERDICT_MARK[verdict],
                (1.01, y),
                xycoords=("axes fraction", "data"),
                va="center",
                fontsize=7,
                color={"better": "tab:green", "worse": "tab:red"}.get(verdict, "0.4"),
            )
    ax.axvline(0, color="k", lw=1, ls="--")
    # the reference named on its line (no legend box over the data)
    ax.annotate(
        REFERENCE if paired_ else "single-task",
        (0, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(0, 3),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=7,
    )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["strategy"] for r in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=9, pad=14)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
