"""QM9-lite: the 11 standard QM9 regression targets from simple molecular features, with an MLP.

Opt-in: the data is the ``qm9pack`` wheel (``pip install 'mtlbal[qm9]'``; 130,831 molecules,
MIT). The CSV files are read straight from the installed package, which is never imported.

* Targets (Nash-MTL's 11): μ (D), α (bohr³), HOMO, LUMO (meV), ⟨R²⟩ (bohr²), ZPVE (meV), the
  atomization energies U₀, U, H, G (meV; the total energy minus the isolated atoms' reference
  energies, as PyG does) and C_v (cal/mol·K). The HOMO–LUMO gap is left out, as in the papers.
* Features (34): the 29 eigenvalues of the Coulomb matrix (``C_ii = ½Z_i^2.4``,
  ``C_ij = Z_iZ_j/|R_i − R_j|`` in bohr; sorted, zero-padded) and the counts of H, C, N, O, F;
  standardised with training statistics.
* Training: the targets are standardised (training mean/std), each task's loss is the MSE of
  its standardised target; an MLP 34→256→256 trunk with 11 linear heads; Adam. Evaluation: the
  MAE of each target in its physical unit (all lower-is-better), on a held-out random split.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import pathlib
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import mtlbal
from benchmarks import metrics as M
from benchmarks import strategies as S
from benchmarks.common import (
    STL,
    MTLNet,
    Problem,
    STLNet,
    TaskSpec,
    delta_m_section,
    missing_note,
    progress,
    seed_everything,
    select_strategies,
    summarize,
)

NAME = "qm9"
TITLE = "QM9-lite (11 targets, Coulomb-matrix features, MLP)"

HARTREE_TO_MEV = 27211.386246
ELEMENTS = ("H", "C", "N", "O", "F")
Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
ANGSTROM_TO_BOHR = 1.8897261246
# Reference energies of the isolated atoms (Hartree; QM9's atomref, B3LYP/6-31G(2df,p)) for
# U0, U, H, G, in the order of ELEMENTS.
ATOMREF = {
    "U0": (-0.500273, -37.846772, -54.583861, -75.064579, -99.718730),
    "U": (-0.498857, -37.845355, -54.582445, -75.063162, -99.717314),
    "H": (-0.497912, -37.844411, -54.581501, -75.062219, -99.716370),
    "G": (-0.510927, -37.861317, -54.598897, -75.079532, -99.733544),
}
# (task name, CSV column, unit factor, atomref key or None, unit)
TARGETS: list[tuple[str, str, float, str | None, str]] = [
    ("mu", "Dipole_debye", 1.0, None, "D"),
    ("alpha", "Polarizability_bohr3", 1.0, None, "bohr³"),
    ("homo", "HOMO_au", HARTREE_TO_MEV, None, "meV"),
    ("lumo", "LUMO_au", HARTREE_TO_MEV, None, "meV"),
    ("r2", "R2_bohr2", 1.0, None, "bohr²"),
    ("zpve", "ZPVE_au", HARTREE_TO_MEV, None, "meV"),
    ("U0", "InternalEnergy_0K_au", HARTREE_TO_MEV, "U0", "meV"),
    ("U", "InternalEnergy_298K_au", HARTREE_TO_MEV, "U", "meV"),
    ("H", "Enthalphy_298K_au", HARTREE_TO_MEV, "H", "meV"),
    ("G", "GibbsFreeEnergy_298K_au", HARTREE_TO_MEV, "G", "meV"),
    ("cv", "Heatcapacity_Cv_cal_mol_K", 1.0, None, "cal/mol·K"),
]
MAX_ATOMS = 29


class MissingData(RuntimeError):
    """The optional data package is not installed."""


def data_files() -> list[pathlib.Path]:
    """The molecule CSVs of the installed ``qm9pack`` (``MissingData`` if it is absent)."""
    try:
        dist = importlib.metadata.distribution("qm9pack")
    except importlib.metadata.PackageNotFoundError as e:
        raise MissingData(
            "the qm9 suite needs the qm9pack wheel: pip install 'mtlbal[qm9]' (104 MB)"
        ) from e
    files = []
    for i in (1, 2, 3):
        p = pathlib.Path(str(dist.locate_file(f"qm9pack/data/qm9_part{i}.csv")))
        if not p.exists():
            raise MissingData(f"qm9pack is installed but {p} is missing")
        files.append(p)
    return files


def _floats(text: str) -> list[float]:
    """Numbers of a bracketed list as written in the qm9pack CSVs (``0.``, ``1.2*^-5``)."""
    body = text.replace("[", " ").replace("]", " ").replace("*^", "e")
    return [float(t) for t in body.split(",") if t.strip()]


def _num(text: str) -> float:
    return float(text.replace("*^", "e"))


def coulomb_eigenvalues(z: np.ndarray, xyz_bohr: np.ndarray, size: int = MAX_ATOMS) -> np.ndarray:
    """Sorted (descending) eigenvalues of the Coulomb matrix, zero-padded to ``size``."""
    n = len(z)
    diff = xyz_bohr[:, None, :] - xyz_bohr[None, :, :]
    dist = np.sqrt((diff**2).sum(-1))
    np.fill_diagonal(dist, 1.0)
    cm = np.outer(z, z) / dist
    np.fill_diagonal(cm, 0.5 * z.astype(np.float64) ** 2.4)
    ev = np.sort(np.linalg.eigvalsh(cm))[::-1]
    out = np.zeros(size)
    out[: min(n, size)] = ev[:size]
    return out


def parse_csv(path: pathlib.Path, rows: set[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[n, 34]`` and targets ``[n, 11]`` (physical units) of the molecules of one
    qm9pack CSV (only the data rows whose 0-based index is in ``rows``, when given)."""
    csv.field_size_limit(sys.maxsize)
    feats, targets = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for i, rec in enumerate(reader):
            if rows is not None and i not in rows:
                continue
            elements = [e.strip().strip("'\"") for e in rec["Elements"].strip("[]").split(",")]
            z = np.array([Z[e] for e in elements], dtype=np.float64)
            xyz = np.asarray(_floats(rec["XYZ_Ang"]), dtype=np.float64).reshape(-1, 3)
            if xyz.shape[0] != len(z):
                raise ValueError(f"{path.name} row {i}: {len(z)} elements but {xyz.shape[0]} atoms")
            counts = np.array([elements.count(e) for e in ELEMENTS], dtype=np.float64)
            feats.append(np.concatenate([coulomb_eigenvalues(z, xyz * ANGSTROM_TO_BOHR), counts]))
            t = []
            for _name, col, factor, ref, _unit in TARGETS:
                v = _num(rec[col])
                if ref is not None:
                    v -= float(np.dot(counts, ATOMREF[ref]))
                t.append(v * factor)
            targets.append(t)
    return np.asarray(feats), np.asarray(targets)


def load(n_molecules: int, *, data_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features and targets of ``n_molecules`` drawn at random (fixed by ``data_seed``) from the
    three parts, in a fixed order."""
    files = data_files()
    sizes = []
    for p in files:
        with open(p, "rb") as f:
            sizes.append(sum(1 for _ in f) - 1)  # rows have no embedded newlines
    total = sum(sizes)
    rng = np.random.default_rng(data_seed)
    pick = np.sort(rng.choice(total, size=min(n_molecules, total), replace=False))
    xs, ys = [], []
    start = 0
    for p, n in zip(files, sizes):
        local = {int(i - start) for i in pick if start <= i < start + n}
        if local:
            x, y = parse_csv(p, local)
            xs.append(x)
            ys.append(y)
        start += n
    return np.concatenate(xs), np.concatenate(ys)


@dataclass
class Splits:
    """The train/validation/test split of one QM9 subset, standardised with training
    statistics; ``problem`` holds train and test (what the summary reads), ``x_val``/``y_val``
    the validation molecules used for the schedule and the model selection."""

    problem: Problem
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def scales(self) -> np.ndarray:
        return np.array([t.scale for t in self.problem.tasks])


def make_problem(
    x: np.ndarray,
    y: np.ndarray,
    *,
    test_fraction: float = 0.1,
    val_fraction: float = 0.1,
    data_seed: int = 0,
) -> Splits:
    """Shuffle, cut test | validation | train (in that order, as the Nash-MTL trainer does
    with 10k | 10k | rest), standardise features and targets with the training statistics; the
    MAE is reported in physical units."""
    rng = np.random.default_rng(data_seed + 1)
    idx = rng.permutation(len(x))
    n_test = round(test_fraction * len(x))
    n_val = round(val_fraction * len(x))
    te, va, tr = idx[:n_test], idx[n_test : n_test + n_val], idx[n_test + n_val :]
    if min(len(te), len(va), len(tr)) < 1:
        raise ValueError(f"qm9: {len(x)} molecules are too few for a train/val/test split")
    xm, xs = x[tr].mean(0), x[tr].std(0) + 1e-8
    ym, ys = y[tr].mean(0), y[tr].std(0) + 1e-12

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32))

    tasks = [TaskSpec(name, "mse", "mae", scale=float(s)) for (name, *_), s in zip(TARGETS, ys)]
    problem = Problem(
        NAME,
        tasks,
        t((x[tr] - xm) / xs),
        t((y[tr] - ym) / ys),
        t((x[te] - xm) / xs),
        t((y[te] - ym) / ys),
        hidden=(256, 256),
    )
    return Splits(problem, t((x[va] - xm) / xs), t((y[va] - ym) / ys))


@dataclass(frozen=True)
class Protocol:
    """The training recipe (Nash-MTL's QM9 trainer, ``experiments/quantum_chemistry/trainer.py``
    at AvivNavon/nash-mtl@4508478, where it fits): Adam, ``ReduceLROnPlateau(mode="min",
    factor=0.7, patience=5, min_lr=1e-5)`` stepped on the validation Δm% after every epoch, the
    test metrics of the epoch with the best validation Δm% (``≤``: the latest tie wins)."""

    epochs: int = 20
    batch_size: int = 120
    lr: float = 1e-3
    plateau_factor: float = 0.7
    plateau_patience: int = 5
    min_lr: float = 1e-5


# Strategies built as their reference trains them on QM9 (the rest come from the registry):
# Nash-MTL's trainer clips the shared gradient to norm 1 after its backward (NashMTL's
# max_norm=1.0). The FAMO trainer calls clip_grad_norm_ *before* loss.backward() (a no-op on
# zeroed gradients), and the other methods of both trainers do not clip: no clipping for them.
REFERENCE_OVERRIDES: dict[str, Any] = {
    "NashMTL": lambda m, seed: S.Spec(
        aggregator=mtlbal.aggregation.NashMTL(on_failure="warn", max_norm=1.0)
    ),
}

# Published QM9 Δm% (lower is better; 11 targets, PyG QM9, the NNConv/Set2Set network, 300 epochs,
# 3 seeds): FAMO (Liu et al., NeurIPS 2023) Table 3, which repeats Nash-MTL (Navon et al., ICML
# 2022) Table 2 for the other methods. Quoted from the papers' tables as recorded in the
# project's research notes (not re-read from the PDFs in this session).
PUBLISHED_DELTA_M: dict[str, float] = {
    "Equal": 177.6,  # LS
    "SI": 77.8,
    "RLW": 203.8,
    "DWA": 175.3,
    "UW": 108.0,
    "MGDA": 120.5,
    "PCGrad": 125.7,
    "CAGrad": 112.8,
    "IMTLG": 77.2,
    "NashMTL": 62.0,
    "FAMO": 58.5,
}
PUBLISHED_SOURCE = (
    "FAMO (Liu et al., NeurIPS 2023) Table 3 / Nash-MTL (Navon et al., ICML 2022) Table 2"
)


def _spec(strategy: str, m: int, seed: int) -> S.Spec:
    if strategy in REFERENCE_OVERRIDES:
        spec: S.Spec = REFERENCE_OVERRIDES[strategy](m, seed)
        return spec
    return S.get(strategy)(m, seed)


@torch.no_grad()
def mae(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scales: np.ndarray) -> np.ndarray:
    """Per-target MAE ``[m]`` in physical units (``scales``: the training std of each target)."""
    model.eval()
    outs = [torch.cat(o, dim=-1) for o in (model(x[i : i + 4096]) for i in range(0, len(x), 4096))]
    model.train()
    pred = torch.cat(outs)
    err = (pred - y).abs().double().mean(0).cpu().numpy()
    return np.asarray(err * scales)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (average ranks for ties)."""
    from scipy.stats import spearmanr

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"spearman needs two lists of the same length ≥ 2, got {len(a)}, {len(b)}")
    return float(spearmanr(a, b).statistic)


def train_one(
    data: Splits,
    strategy: str,
    seed: int,
    proto: Protocol,
    *,
    val_base: np.ndarray | None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train ``strategy`` (or the single-task networks, :data:`STL`) with the protocol and
    return the test MAEs of the selected epoch, ``best_epoch``, ``solver_failures`` and
    ``val_mae`` (the selected epoch's validation MAEs, the Δm base of the other strategies).

    Multi-task runs select and schedule on the validation Δm% against ``val_base`` (the
    single-task networks' validation MAEs of the same seed). The single-task networks are
    trained together (disjoint parameters, one optimizer), scheduled on their mean
    standardised validation MAE, and each task's network is selected on its own validation
    MAE (as the reference selects each single-task run on its main task)."""
    problem = data.problem
    seed_everything(seed)
    m = problem.m
    scales = data.scales
    d_in = problem.x_train.shape[1]
    model: nn.Module
    balancer: mtlbal.Balancer | None = None
    if strategy == STL:
        model = STLNet(d_in, problem.hidden, [1] * m).to(device)
        opt: Any = torch.optim.Adam(model.parameters(), lr=proto.lr)
        sched_opt = opt
    else:
        if val_base is None:
            raise ValueError(f"qm9: {strategy} needs the single-task validation MAEs (val_base)")
        net = MTLNet(d_in, problem.hidden, [1] * m).to(device)
        model = net
        spec = _spec(strategy, m, seed)
        balancer = mtlbal.Balancer(
            net.trunk,
            weighting=spec.weighting,
            aggregator=spec.aggregator,
            at=net.trunk if spec.at == "cut" else "params",
        ).to(device)
        inner = torch.optim.Adam(net.parameters(), lr=proto.lr)
        opt = mtlbal.wrap(inner, balancer)
        sched_opt = inner
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        sched_opt,
        mode="min",
        factor=proto.plateau_factor,
        patience=proto.plateau_patience,
        min_lr=proto.min_lr,
    )
    names = [t.name for t in problem.tasks]
    x_tr = problem.x_train.to(device)
    y_tr = problem.y_train.to(device)
    x_va, y_va = data.x_val.to(device), data.y_val.to(device)
    x_te, y_te = problem.x_test.to(device), problem.y_test.to(device)
    gen = torch.Generator().manual_seed(seed)
    n = x_tr.shape[0]
    best_val = np.full(m, np.inf) if strategy == STL else np.inf
    best_test = np.full(m, np.nan)
    best_val_mae = np.full(m, np.nan)
    best_epoch: Any = [0] * m if strategy == STL else 0
    failures = 0
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(proto.epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            for i in range(0, n, proto.batch_size):
                idx = perm[i : i + proto.batch_size]
                preds = model(x_tr[idx])
                losses = [F.mse_loss(p.squeeze(-1), y_tr[idx, t]) for t, p in enumerate(preds)]
                opt.zero_grad(set_to_none=True)
                if balancer is None:
                    torch.stack(losses).sum().backward()
                else:
                    opt.backward(dict(zip(names, losses)))
                opt.step()
                if balancer is not None and callable(getattr(balancer.weighting, "update", None)):
                    with torch.no_grad():  # FAMO: the same batch after the step
                        after = [
                            F.mse_loss(p.squeeze(-1), y_tr[idx, t])
                            for t, p in enumerate(model(x_tr[idx]))
                        ]
                    balancer.update(dict(zip(names, after)))
            if balancer is not None:
                balancer.epoch_end()
            val = mae(model, x_va, y_va, scales)
            test = mae(model, x_te, y_te, scales)
            if strategy == STL:
                better = val <= best_val
                best_val = np.where(better, val, best_val)
                best_test = np.where(better, test, best_test)
                best_val_mae = np.where(better, val, best_val_mae)
                best_epoch = [epoch if b else e for b, e in zip(better, best_epoch)]
                sched.step(float(np.mean(val / scales)))
            else:
                assert val_base is not None
                val_dm = M.delta_m(val.tolist(), val_base.tolist(), [False] * m)
                if val_dm <= best_val:
                    best_val, best_test, best_val_mae, best_epoch = val_dm, test, val, epoch
                sched.step(val_dm)
        failures = sum(1 for w in caught if "solver" in type(w.message).__name__.lower())
    wall = time.perf_counter() - t0
    if balancer is not None:
        balancer.remove()
    row: dict[str, Any] = {"strategy": strategy, "seed": seed}
    for task, v in zip(problem.tasks, best_test):
        row[task.key] = float(v)
    row["best_epoch"] = best_epoch
    row["final_lr"] = float(sched_opt.param_groups[0]["lr"])
    row["solver_failures"] = failures
    row["steps"] = proto.epochs * -(-n // proto.batch_size)
    row["val_mae"] = [float(v) for v in best_val_mae]
    row["wall_s"] = round(wall, 3)
    return row


def run_protocol(
    data: Splits,
    strategies: list[str],
    seeds: list[int],
    proto: Protocol,
    *,
    device: str = "cpu",
    show_progress: bool = True,
    on_row: Any = None,
) -> list[dict[str, Any]]:
    """Per seed: the single-task networks first (their validation MAEs are the Δm base of the
    multi-task runs' schedule and selection), then every strategy."""
    rows: list[dict[str, Any]] = []
    jobs = [(s, seed) for seed in seeds for s in [STL, *strategies]]
    base: dict[int, np.ndarray] = {}
    for s, seed in progress(jobs, total=len(jobs), desc=NAME, enabled=show_progress):
        row = train_one(data, s, seed, proto, val_base=base.get(seed), device=device)
        if s == STL:
            base[seed] = np.asarray(row["val_mae"])
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def published_comparison(summary_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Spearman's ρ between this run's mean Δm% and the published Δm% over the strategies in
    both, with the two orderings."""
    ours = {r["strategy"]: r["delta_m"] for r in summary_rows if r["strategy"] != STL}
    common = [s for s in PUBLISHED_DELTA_M if s in ours]
    out: dict[str, Any] = {"strategies": common, "source": PUBLISHED_SOURCE}
    if len(common) < 3:
        out["spearman"] = None
        return out
    out["spearman"] = spearman([ours[s] for s in common], [PUBLISHED_DELTA_M[s] for s in common])
    out["ours"] = sorted(common, key=lambda s: ours[s])
    out["published"] = sorted(common, key=lambda s: PUBLISHED_DELTA_M[s])
    return out


def _comparison_md(cmp: dict[str, Any], summary_rows: list[dict[str, Any]]) -> str:
    if cmp["spearman"] is None:
        return ""
    ours = {r["strategy"]: r for r in summary_rows}
    lines = [
        "| strategy | Δm% here | rank here | published Δm% | published rank |",
        "|---|---|---|---|---|",
    ]
    for s in cmp["published"]:
        lines.append(
            f"| {s} | {ours[s]['delta_m']:.1f} ± {ours[s]['delta_m_std']:.1f} | "
            f"{cmp['ours'].index(s) + 1} | {PUBLISHED_DELTA_M[s]} | "
            f"{cmp['published'].index(s) + 1} |"
        )
    return (
        f"\nAgainst the published ordering ({cmp['source']}; GNN at 300 epochs, so compare "
        f"the order, not the values): Spearman ρ = {cmp['spearman']:+.2f} over "
        f"{len(cmp['strategies'])} strategies.\n\n" + "\n".join(lines) + "\n"
    )


# The published methods (and the Nash-MTL trainer's method list) are the default set.
DEFAULT_STRATEGIES = list(PUBLISHED_DELTA_M)


def run(
    *,
    strategies: list[str] | None,
    seeds: list[int],
    quick: bool,
    device: str = "cpu",
    out_dir: pathlib.Path | None = None,
    show_progress: bool = True,
    n_molecules: int | None = None,
    epochs: int | None = None,
    tiny: bool = False,
) -> dict[str, Any]:
    try:
        data_files()
    except MissingData as e:
        return {
            "name": NAME,
            "title": TITLE,
            "skipped": str(e),
            "rows": [],
            "markdown": (f"### {TITLE}\n\nSkipped: {e}.\n"),
            "plots": [],
        }
    names, missing = select_strategies(strategies if strategies is not None else DEFAULT_STRATEGIES)
    n = n_molecules if n_molecules is not None else (300 if tiny else 3000 if quick else 6000)
    x, y = load(n)
    data = make_problem(x, y)
    problem = data.problem
    n_epochs = 2 if tiny else 6 if quick else 20
    proto = Protocol(epochs=epochs if epochs is not None else n_epochs)
    on_row = None
    if out_dir is not None:  # each finished run appended at once: a long run can be inspected
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = out_dir / "qm9_rows.jsonl"
        partial.write_text("")

        def on_row(row: dict[str, Any]) -> None:
            with open(partial, "a") as f:
                f.write(json.dumps(row) + "\n")

    rows = run_protocol(
        data, names, seeds, proto, device=device, show_progress=show_progress, on_row=on_row
    )
    config = {
        "n_molecules": len(x),
        "n_train": problem.x_train.shape[0],
        "n_val": data.x_val.shape[0],
        "n_test": problem.x_test.shape[0],
        "epochs": proto.epochs,
        "batch_size": proto.batch_size,
        "lr": proto.lr,
        "seeds": seeds,
        "quick": quick,
    }
    return build_result(rows, config, out_dir=out_dir, missing=missing)


def build_result(
    rows: list[dict[str, Any]],
    config: dict[str, Any],
    *,
    out_dir: pathlib.Path | None = None,
    missing: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The suite's result from the rows of :func:`run_protocol` (also from saved rows, e.g. the
    ``qm9_rows.jsonl`` a run writes as it goes) and its configuration."""
    proto = Protocol(epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"])
    seeds = sorted({r["seed"] for r in rows})
    names = [s for s in dict.fromkeys(r["strategy"] for r in rows) if s != STL]
    tasks = [TaskSpec(name, "mse", "mae") for name, *_ in TARGETS]
    summ = summarize(tasks, rows, metric_digits=3, max_metric_columns=11)
    cmp = published_comparison(summ.rows)
    fails = {
        s: [r["solver_failures"] for r in rows if r["strategy"] == s]
        for s in names
        if any(r["solver_failures"] for r in rows if r["strategy"] == s)
    }
    steps = rows[0]["steps"] if rows else 0
    fail_md = "".join(
        f"\n{s}: the solver failed on {', '.join(map(str, v))} of {steps} steps (per seed) and "
        "kept its previous weights there (the reference does the same, silently).\n"
        for s, v in fails.items()
    )
    units = ", ".join(f"{name} {unit}" for name, _c, _f, _r, unit in TARGETS)
    md = (
        f"### {TITLE}\n\n{config['n_train']} training / {config['n_val']} validation "
        f"/ {config['n_test']} test molecules (random subset of QM9); MLP 34→256→256 + 11 "
        f"heads; Adam lr {proto.lr}, batch {proto.batch_size}, {proto.epochs} epochs, "
        f"ReduceLROnPlateau (×{proto.plateau_factor}, patience {proto.plateau_patience}) on the "
        "validation Δm%, test metrics of the best-validation epoch; Nash-MTL clips the shared "
        f"gradient to norm 1 as its reference; seeds {seeds}. Test MAE per target ({units}).\n\n"
        f"{summ.markdown}\n{fail_md}{_comparison_md(cmp, summ.rows)}"
    )
    figure, plots = delta_m_section(summ.rows if rows else [], out_dir, "qm9", TITLE)
    md += figure + missing_note(missing or {})
    return {
        "name": NAME,
        "title": TITLE,
        "config": config,
        "tasks": [t.key for t in tasks],
        "rows": rows,
        "summary": summ.rows,
        "published": cmp,
        "solver_failures": fails,
        "markdown": md,
        "plots": plots,
        "missing_strategies": missing or {},
    }
