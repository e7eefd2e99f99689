"""MultiDigits: two overlapping handwritten digits; classify the left one, read the right one
as a number. Two heterogeneous tasks on different loss scales: something to balance.

Built from scikit-learn's bundled ``load_digits`` (1797 8×8 images, no download) with the
MultiMNIST recipe scaled to 8×8: each image ("left") is placed at the top-left of a 10×10
canvas, a random partner ("right") at offset (2, 2), overlapping pixels take the maximum, and
the canvas is scaled to [0, 1]. The digits are split into train and test *before* pairing, so no
test digit is ever seen in training; every digit is paired with ``pairs_per_image`` partners.

Tasks:

* ``left`` — classification of the left digit: cross-entropy over 10 classes, metric accuracy.
* ``right`` — regression of the right digit's value (0–9) as a number: one output, MSE in
  digit² units, metric MAE (digits).

The imbalance (documented, measured at seed 0): at the start the regression loss is about 13×
the cross-entropy (MSE ≈ 29.6 digit² of an untrained output against CE ≈ 2.31), so the sum of
the losses follows the regression task and the classification starves under equal weights;
MGDA, which equalises gradient norms, leans to the task with the smaller gradient. The
symmetric two-classification version had nothing to balance (no pair of 17 strategies differed
after a Holm correction, with 3 or 10 seeds); here 37 of 55 pairs of 11 strategies differ (5
seeds, quick sizes; ``benchmarks/results/multidigits.md``), in the direction the literature
reports: scale-aware methods win, MGDA keeps the classification and gives up the regression.

Model: an MLP trunk 100→256→64 (ReLU) and two linear heads (10 logits; 1 value); Adam; the
single-task baselines use the same architecture, one network per task.
"""

from __future__ import annotations

import pathlib
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

NAME = "multidigits"
TITLE = "MultiDigits (left digit class + right digit value, two scales)"


def make_problem(
    *, pairs_per_image: int = 4, test_fraction: float = 0.2, data_seed: int = 0
) -> Problem:
    """The MultiDigits train/test pairs (fixed by ``data_seed``, independent of the run seed)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # [1797, 8, 8], values 0..16
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(data_seed)
    idx = rng.permutation(len(labels))
    n_test = round(test_fraction * len(labels))
    splits = {"test": idx[:n_test], "train": idx[n_test:]}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, ids in splits.items():
        img, lab = images[ids], labels[ids]
        n = len(ids)
        xs, ys = [], []
        for _ in range(pairs_per_image):
            # a random partner that is never the image itself: shift a permutation by a derangement
            partner = rng.permutation(n)
            same = partner == np.arange(n)
            partner[same] = (partner[same] + 1) % n
            canvas = np.zeros((n, 10, 10), dtype=np.float32)
            canvas[:, :8, :8] = img
            canvas[:, 2:, 2:] = np.maximum(canvas[:, 2:, 2:], img[partner])
            xs.append(canvas.reshape(n, 100))
            ys.append(np.stack([lab, lab[partner]], axis=1))
        out[name] = (
            torch.from_numpy(np.concatenate(xs)),
            torch.from_numpy(np.concatenate(ys).astype(np.float32)),
        )
    tasks = [
        TaskSpec("left", "ce", "acc", out_dim=10),
        TaskSpec("right", "mse", "mae", out_dim=1),
    ]
    return Problem(NAME, tasks, *out["train"], *out["test"], hidden=(256, 64))


def run(
    *,
    strategies: list[str] | None,
    seeds: list[int],
    quick: bool,
    device: str = "cpu",
    out_dir: pathlib.Path | None = None,
    show_progress: bool = True,
    epochs: int | None = None,
    tiny: bool = False,
) -> dict[str, Any]:
    names, missing = select_strategies(strategies)
    problem = make_problem(pairs_per_image=1 if tiny else 3 if quick else 5)
    n_epochs = 1 if tiny else 8 if quick else 20
    cfg = TrainConfig(epochs=epochs if epochs is not None else n_epochs, batch_size=128, lr=1e-3)
    rows = run_problem(problem, names, seeds, cfg, device=device, show_progress=show_progress)
    summ = summarize(problem.tasks, rows)
    n_train, n_test = problem.x_train.shape[0], problem.x_test.shape[0]
    intro = (
        f"{n_train} training pairs, {n_test} test pairs; left digit: 10-class cross-entropy "
        "(accuracy); right digit: its value regressed as a number (MSE in digit², metric MAE "
        "in digits), a loss about 13× the cross-entropy at the start; MLP 100→256→64 + 2 "
        "heads; Adam lr "
        f"{cfg.lr}, batch {cfg.batch_size}, {cfg.epochs} epochs; seeds {seeds}."
    )
    md = f"### {TITLE}\n\n{intro}\n\n{summ.markdown}\n"
    figure, plots = delta_m_section(summ.rows if rows else [], out_dir, "multidigits", TITLE)
    md += figure + missing_note(missing)
    return {
        "name": NAME,
        "title": TITLE,
        "config": {
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "n_train": n_train,
            "n_test": n_test,
            "seeds": seeds,
            "quick": quick,
        },
        "tasks": [t.key for t in problem.tasks],
        "rows": rows,
        "summary": summ.rows,
        "markdown": md,
        "missing_strategies": missing,
        "plots": plots,
    }
