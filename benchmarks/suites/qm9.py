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
import pathlib
import sys
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    Problem,
    TaskSpec,
    TrainConfig,
    delta_m_section,
    missing_note,
    run_problem,
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


def make_problem(
    x: np.ndarray, y: np.ndarray, *, test_fraction: float = 0.2, data_seed: int = 0
) -> Problem:
    """Split, standardise features and targets; the MAE is reported in physical units."""
    rng = np.random.default_rng(data_seed + 1)
    idx = rng.permutation(len(x))
    n_test = round(test_fraction * len(x))
    te, tr = idx[:n_test], idx[n_test:]
    xm, xs = x[tr].mean(0), x[tr].std(0) + 1e-8
    ym, ys = y[tr].mean(0), y[tr].std(0) + 1e-12

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32))

    tasks = [TaskSpec(name, "mse", "mae", scale=float(s)) for (name, *_), s in zip(TARGETS, ys)]
    return Problem(
        NAME,
        tasks,
        t((x[tr] - xm) / xs),
        t((y[tr] - ym) / ys),
        t((x[te] - xm) / xs),
        t((y[te] - ym) / ys),
        hidden=(256, 256),
    )


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
    names, missing = select_strategies(strategies)
    n = n_molecules if n_molecules is not None else (300 if tiny else 6000 if quick else 30000)
    x, y = load(n)
    problem = make_problem(x, y)
    n_epochs = 1 if tiny else 8 if quick else 25
    cfg = TrainConfig(epochs=epochs if epochs is not None else n_epochs, batch_size=128, lr=1e-3)
    rows = run_problem(problem, names, seeds, cfg, device=device, show_progress=show_progress)
    summ = summarize(problem.tasks, rows, metric_digits=3, max_metric_columns=11)
    units = ", ".join(f"{name} {unit}" for name, _c, _f, _r, unit in TARGETS)
    md = (
        f"### {TITLE}\n\n{problem.x_train.shape[0]} training / {problem.x_test.shape[0]} test "
        f"molecules (random subset of QM9); MLP 34→256→256 + 11 heads; Adam lr {cfg.lr}, batch "
        f"{cfg.batch_size}, {cfg.epochs} epochs; seeds {seeds}. Test MAE per target ({units}).\n\n"
        f"{summ.markdown}\n"
    )
    figure, plots = delta_m_section(summ.rows if rows else [], out_dir, "qm9", TITLE)
    md += figure + missing_note(missing)
    return {
        "name": NAME,
        "title": TITLE,
        "config": {"n_molecules": len(x), "epochs": cfg.epochs, "seeds": seeds, "quick": quick},
        "tasks": [t.key for t in problem.tasks],
        "rows": rows,
        "summary": summ.rows,
        "markdown": md,
        "plots": plots,
        "missing_strategies": missing,
    }
