"""Time MGDA's host-side solver (one ``MGDA(reduction="mean").weights(G)`` call) at m tasks.

Two kinds of float64 Gramians ``G = J Jᵀ``, ``J`` of shape ``[m, 4m + 64]``, 5 seeds each:
``indep`` (``J`` standard normal: the optimum uses almost every task) and ``shared`` (plus twice
a common standard-normal row: correlated tasks, the optimum on a small face). For each solver
(``line_search="paper"``, the default, and ``"reference"``) it prints the median over seeds of
the median process-CPU time over repeats, the slowest seed, and the worst relative duality gap
``2(f − min_t (G w)_t) / f`` of the returned ``w`` (``f = wᵀGw``; ≤ 1e-6 is what the default
certifies). Works against any tree that has ``mtlbal.aggregation.MGDA`` (use PYTHONPATH).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/mgda_solver.py
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/mgda_solver.py --tasks 4 16 --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

from mtlbal.aggregation import MGDA


def gramian(kind: str, m: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    n = 4 * m + 64
    jac = rng.normal(size=(m, n))
    if kind == "shared":
        jac = jac + 2.0 * rng.normal(size=(1, n))
    return torch.as_tensor(jac @ jac.T)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[4, 16, 64, 256])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--kinds", nargs="+", default=["indep", "shared"])
    p.add_argument("--solvers", nargs="+", default=["paper", "reference"])
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}, process CPU time")
    print("| solver | Gramian | m | median (ms) | slowest seed (ms) | worst gap/f |")
    print("|---|---|---|---|---|---|")
    for solver in args.solvers:
        agg = MGDA(reduction="mean", line_search=solver)
        for kind in args.kinds:
            for m in args.tasks:
                per_seed: list[float] = []
                worst = 0.0
                for seed in range(args.seeds):
                    g = gramian(kind, m, seed)
                    w = agg.weights(g)  # warm-up
                    repeats = max(3, min(25, int(0.05 / max(_one(agg, g), 1e-6))))
                    per_seed.append(statistics.median(_one(agg, g) for _ in range(repeats)))
                    gn, wn = g.numpy(), w.numpy()
                    f = float(wn @ gn @ wn)
                    worst = max(worst, 2.0 * (f - float((gn @ wn).min())) / f)
                print(
                    f"| {solver} | {kind} | {m} | {1e3 * statistics.median(per_seed):.2f} | "
                    f"{1e3 * max(per_seed):.2f} | {worst:.1e} |",
                    flush=True,
                )
    return 0


def _one(agg: MGDA, g: torch.Tensor) -> float:
    t0 = time.process_time()
    agg.weights(g)
    return time.process_time() - t0


if __name__ == "__main__":
    raise SystemExit(main())
