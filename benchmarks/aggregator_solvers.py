"""Time the host-side solvers of the Gramian aggregators (one ``weights(G)`` call) against
TorchJD's implementations of the same methods, where installed.

Median of interleaved repeats (the machine is shared; never assert on these numbers).
Run: ``PYTHONPATH=src python benchmarks/aggregator_solvers.py``
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch

from mtlbal import aggregation as A


def _ours(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    agg = {
        "UPGrad": A.UPGrad(reduction="mean"),
        "DualProj": A.DualProj(reduction="mean"),
        "CAGrad": A.CAGrad(0.4, rescale=0, reduction="mean"),
        "NashMTL": A.NashMTL(),
        "IMTLG": A.IMTLG(reduction="mean"),
        "GradVac": A.GradVac(),
    }[name]
    return lambda j: agg(j)


def _theirs(name: str, m: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        import torchjd.aggregation as tj

        agg = {
            "UPGrad": lambda: tj.UPGrad(),
            "DualProj": lambda: tj.DualProj(),
            "CAGrad": lambda: tj.CAGrad(c=0.4),
            "NashMTL": lambda: tj.NashMTL(n_tasks=m, max_norm=0.0),
            "IMTLG": lambda: tj.IMTLG(),
            "GradVac": lambda: tj.GradVac(),
        }[name]()
    except Exception:
        return None
    return lambda j: agg(j)


def main(repeats: int = 15) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)  # tiny matrices: threads only add contention
    names = ["UPGrad", "DualProj", "CAGrad", "NashMTL", "IMTLG", "GradVac"]
    print("| method | m | mtlbal (ms) | TorchJD (ms) |")
    print("|---|---|---|---|")
    for m in (3, 10, 30):
        gen = torch.Generator().manual_seed(m)
        jac = torch.randn(m, 2 * m + 10, generator=gen, dtype=torch.float64)
        for name in names:
            ours, theirs = _ours(name), _theirs(name, m)
            t_ours: list[float] = []
            t_theirs: list[float] = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                ours(jac)
                t_ours.append(time.perf_counter() - t0)
                if theirs is not None:
                    t0 = time.perf_counter()
                    theirs(jac)
                    t_theirs.append(time.perf_counter() - t0)
            a = f"{1e3 * statistics.median(t_ours):.2f}"
            b = f"{1e3 * statistics.median(t_theirs):.2f}" if t_theirs else "n/a"
            print(f"| {name} | {m} | {a} | {b} |")


if __name__ == "__main__":
    main()
