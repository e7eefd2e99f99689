"""Time every aggregator's solver (one ``weights(G)`` call for a Gramian method, one
``aggregator(J)`` call for a Jacobian method, ``J`` of shape ``[m, 10⁴]``) at m = 4, 64, 256,
against TorchJD's implementation of the same method where TorchJD has it.

The issue-10 targets (not tests): ≤ 5 ms at m = 64 and ≤ 100 ms at m = 256 on this machine's CPU.

Method: one BLAS thread (``torch.set_num_threads(1)``: the problems are small, threads only add
contention), process CPU time (``time.process_time``; the machine is shared, wall time is
inflated by the other processes), rounds interleaved over the methods, the median per method.
Never assert on these numbers.

Run: ``PYTHONPATH=src python -m benchmarks.aggregator_solvers [--ms 4 64 256] [--reps 7]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mtlbal import aggregation as A
from mtlbal.aggregation.base import Aggregator, GramianAggregator

__all__ = ["SOLVERS", "Solver", "main", "time_solvers"]

N_PARAMS = 10_000


@dataclass(frozen=True)
class Solver:
    """One method to time: how to build ours (for ``m`` tasks) and TorchJD's, if it has one."""

    name: str
    ours: Callable[[int], Aggregator]
    torchjd: Callable[[int], object] | None = None  # built from torchjd.aggregation as ``tj``


def _tj(make: Callable[[Any, int], object]) -> Callable[[int], object]:
    """TorchJD's counterpart, built by ``make(torchjd.aggregation, m)`` (imported lazily)."""

    def build(m: int) -> object:
        import torchjd.aggregation as tj

        return make(tj, m)

    return build


# the issue-10 catalogue and the older solvers; TorchJD's counterpart at its default scale
# (our reduction="mean" where TorchJD's default is the mean: the same computation)
SOLVERS: list[Solver] = [
    Solver("UPGrad", lambda m: A.UPGrad(reduction="mean"), _tj(lambda tj, m: tj.UPGradWeighting())),
    Solver(
        "DualProj",
        lambda m: A.DualProj(reduction="mean"),
        _tj(lambda tj, m: tj.DualProjWeighting()),
    ),
    Solver(
        "CAGrad",
        lambda m: A.CAGrad(0.4, rescale=0, reduction="mean"),
        _tj(lambda tj, m: tj.CAGradWeighting(c=0.4)),
    ),
    Solver("MGDA", lambda m: A.MGDA(), _tj(lambda tj, m: tj.MGDAWeighting())),
    Solver("IMTLG", lambda m: A.IMTLG(reduction="mean"), _tj(lambda tj, m: tj.IMTLGWeighting())),
    Solver("AlignedMTL", lambda m: A.AlignedMTL(), _tj(lambda tj, m: tj.AlignedMTLWeighting())),
    Solver(
        "NashMTL", lambda m: A.NashMTL(on_failure="warn"), _tj(lambda tj, m: tj.NashMTL(n_tasks=m))
    ),
    Solver("PCGrad", lambda m: A.PCGrad(), _tj(lambda tj, m: tj.PCGradWeighting())),
    Solver("GradVac", lambda m: A.GradVac(), _tj(lambda tj, m: tj.GradVacWeighting())),
    Solver(
        "FairGrad",
        lambda m: A.FairGrad(on_failure="warn"),
        _tj(lambda tj, m: tj.FairGradWeighting(alpha=1.0)),
    ),
    Solver("Krum", lambda m: A.Krum(1), _tj(lambda tj, m: tj.KrumWeighting(n_byzantine=1))),
    Solver("PCD", lambda m: A.PCD(), None),
    Solver("MoDo", lambda m: A.MoDo(), None),
    Solver("SDMGrad", lambda m: A.SDMGrad(), None),
    Solver("CRMOGM(MGDA)", lambda m: A.CRMOGM(A.MGDA()), None),
    Solver("Sum", lambda m: A.Sum(), _tj(lambda tj, m: tj.SumWeighting())),
    Solver("Mean", lambda m: A.Mean(), _tj(lambda tj, m: tj.MeanWeighting())),
    Solver(
        "Constant",
        lambda m: A.Constant([1.0] * m),
        _tj(lambda tj, m: tj.ConstantWeighting(torch.ones(m))),
    ),
    Solver("Random", lambda m: A.Random(), _tj(lambda tj, m: tj.RandomWeighting())),
    # Jacobian methods: one aggregator(J) call
    Solver("ConFIG", lambda m: A.ConFIG(), _tj(lambda tj, m: tj.ConFIG())),
    Solver("MConFIG", lambda m: A.MConFIG(), None),
    Solver(
        "TrimmedMean", lambda m: A.TrimmedMean(1), _tj(lambda tj, m: tj.TrimmedMean(trim_number=1))
    ),
    Solver("GradDrop", lambda m: A.GradDrop(), _tj(lambda tj, m: tj.GradDrop())),
    Solver("MoCo", lambda m: A.MoCo(), None),
    Solver("ExcessMTL", lambda m: A.ExcessMTL(), None),
    Solver("DBMTL", lambda m: A.DBMTL(), None),
]


def _call_ours(
    agg: Aggregator, gram: torch.Tensor, jac: torch.Tensor, losses: torch.Tensor
) -> Callable[[], object]:
    if isinstance(agg, GramianAggregator):
        return lambda: agg.weights(gram, losses=losses)
    return lambda: agg(jac, losses=losses)


def _call_theirs(obj: object, gram: torch.Tensor, jac: torch.Tensor) -> Callable[[], object]:
    from torchjd.aggregation import Aggregator as TjAggregator

    if isinstance(obj, TjAggregator):
        return lambda: obj(jac)
    return lambda: obj(gram)  # type: ignore[operator]


def time_solvers(
    ms: Sequence[int] = (4, 64, 256),
    *,
    reps: int = 7,
    names: Sequence[str] | None = None,
    torchjd: bool = True,
    budget_s: float = 3.0,
    seed: int = 0,
) -> dict[str, dict[int, tuple[float, float]]]:
    """``{method: {m: (ours ms, TorchJD ms)}}`` (NaN where not run). A callable whose first
    call takes over ``budget_s`` is timed once and not at larger m."""
    warnings.simplefilter("ignore")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        selected = [s for s in SOLVERS if names is None or s.name in names]
        out: dict[str, dict[int, tuple[float, float]]] = {s.name: {} for s in selected}
        slow: set[tuple[str, str]] = set()
        for m in ms:
            gen = torch.Generator().manual_seed(seed + m)
            j64 = torch.randn(m, N_PARAMS, generator=gen, dtype=torch.float64)
            gram = j64 @ j64.T
            gram = (gram + gram.T) / 2
            jac = j64.to(torch.float32)
            losses = torch.rand(m, generator=gen, dtype=torch.float64) + 0.5
            calls: dict[tuple[str, str], Callable[[], object]] = {}
            for s in selected:
                builds = [("ours", s.ours)] + ([("tj", s.torchjd)] if torchjd and s.torchjd else [])
                for who, build in builds:
                    if (s.name, who) in slow:
                        continue
                    try:
                        obj = build(m)
                        if who == "ours":
                            assert isinstance(obj, Aggregator)
                            f = _call_ours(obj, gram, jac, losses.to(jac.dtype))
                        else:
                            f = _call_theirs(obj, gram.to(torch.float32), jac)
                        t0 = time.process_time()
                        f()  # warm-up (and the budget check)
                        if time.process_time() - t0 > budget_s:
                            slow.add((s.name, who))
                        calls[(s.name, who)] = f
                    except Exception as exc:  # a method TorchJD lacks, or that refuses this m
                        print(f"# {s.name} ({who}) at m={m}: {type(exc).__name__}: {exc}")
            times: dict[tuple[str, str], list[float]] = {k: [] for k in calls}
            for r in range(reps):
                for k, f in calls.items():
                    if k in slow and r > 0:
                        continue
                    t0 = time.process_time()
                    f()
                    times[k].append(1e3 * (time.process_time() - t0))
            for s in selected:
                ours = times.get((s.name, "ours"))
                theirs = times.get((s.name, "tj"))
                out[s.name][m] = (
                    statistics.median(ours) if ours else math.nan,
                    statistics.median(theirs) if theirs else math.nan,
                )
        return out
    finally:
        torch.set_num_threads(threads)


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else (f"{x:.2f}" if x < 10 else f"{x:.0f}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--ms", type=int, nargs="+", default=[4, 64, 256])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--only", nargs="+", default=None)
    p.add_argument("--no-torchjd", action="store_true")
    a = p.parse_args(argv)
    res = time_solvers(a.ms, reps=a.reps, names=a.only, torchjd=not a.no_torchjd)
    head = " | ".join(f"m={m} ours / TorchJD (ms)" for m in a.ms)
    print(f"| method | {head} |")
    print("|---" * (len(a.ms) + 1) + "|")
    for name, row in res.items():
        cells = " | ".join(f"{_fmt(row[m][0])} / {_fmt(row[m][1])}" for m in a.ms)
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
