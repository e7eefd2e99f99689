"""Benchmark metrics: Δm% (Nash-MTL convention), LibMTL's Δp, mean rank, mean ± std.

Definitions (``M_{s,k}``: metric ``k`` of method ``s``; ``B_k``: the single-task baseline;
``δ_k = 1`` when higher is better, else 0; ``K`` metrics):

* **Δm%** (Navon et al. 2022, reused by FAMO): ``Δm = (100/K) Σ_k (−1)^{δ_k} (M_{s,k} − B_k)/B_k``.
  *Lower is better*; negative means better than the single-task baseline. Averaged over
  *metrics* (every metric counts once, whatever task it belongs to).
* **Δp** (LibMTL's ``count_improvement``): ``Δp = (100/T) Σ_t (1/K_t) Σ_{k∈t} (−1)^{1−δ_k}
  (M_{s,k} − B_k)/B_k``. *Higher is better*; averaged over the metrics of each task first, then
  over the ``T`` tasks. With one metric per task ``Δp = −Δm``.
* **Mean rank** (MR): rank the compared methods on each metric (1 = best in that metric's
  direction, ties get the average of the ranks they span), then average a method's ranks over
  the metrics. Lower is better; it depends on the set of methods compared.

Example (accuracy 0.9 against 1.0 is 10 % worse, the error is unchanged):
    >>> round(delta_m([0.9, 0.5], [1.0, 0.5], [True, False]), 6)
    5.0
    >>> round(delta_p([0.9, 0.5], [1.0, 0.5], [True, False], ["a", "b"]), 6)
    -5.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["delta_m", "delta_p", "mean_rank", "mean_std", "rankdata"]


def _check(
    values: Sequence[float], base: Sequence[float], hib: Sequence[bool]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)
    b = np.asarray(base, dtype=np.float64)
    h = np.asarray(hib, dtype=bool)
    if v.ndim != 1 or v.shape != b.shape or v.shape != h.shape:
        raise ValueError(
            f"values, base and higher_is_better must be 1-D of one length, got shapes "
            f"{v.shape}, {b.shape}, {h.shape}"
        )
    if v.size == 0:
        raise ValueError("no metric given")
    if np.any(b == 0):
        raise ValueError("a baseline metric is 0: the relative change is undefined")
    return v, b, h


def delta_m(
    values: Sequence[float], base: Sequence[float], higher_is_better: Sequence[bool]
) -> float:
    """Δm% of ``values`` against ``base`` (Nash-MTL sign: lower is better), over metrics."""
    v, b, h = _check(values, base, higher_is_better)
    sign = np.where(h, -1.0, 1.0)
    return float(100.0 * np.mean(sign * (v - b) / b))


def delta_p(
    values: Sequence[float],
    base: Sequence[float],
    higher_is_better: Sequence[bool],
    tasks: Sequence[str],
) -> float:
    """LibMTL's Δp (positive is better): per-task mean of the signed relative gains, then the
    mean over tasks. ``tasks[k]`` names the task metric ``k`` belongs to."""
    v, b, h = _check(values, base, higher_is_better)
    if len(tasks) != v.size:
        raise ValueError(f"tasks has {len(tasks)} entries for {v.size} metrics")
    gain = np.where(h, 1.0, -1.0) * (v - b) / b
    per_task: dict[str, list[float]] = {}
    for t, g in zip(tasks, gain):
        per_task.setdefault(t, []).append(float(g))
    return float(100.0 * np.mean([np.mean(gs) for gs in per_task.values()]))


def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` in increasing order; ties get the average rank they span."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    ranks = np.empty(a.size, dtype=np.float64)
    i = 0
    while i < a.size:
        j = i
        while j + 1 < a.size and a[order[j + 1]] == a[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def mean_rank(
    table: Mapping[str, Sequence[float]], higher_is_better: Sequence[bool]
) -> dict[str, float]:
    """Mean rank of each method; ``table[method][k]`` is its value on metric ``k``."""
    names = list(table)
    if not names:
        return {}
    mat = np.asarray([table[n] for n in names], dtype=np.float64)  # [methods, K]
    h = np.asarray(higher_is_better, dtype=bool)
    if mat.ndim != 2 or mat.shape[1] != h.size:
        raise ValueError(f"every method needs {h.size} metric values, got shape {mat.shape}")
    ranks = np.empty_like(mat)
    for k in range(mat.shape[1]):
        col = -mat[:, k] if h[k] else mat[:, k]
        ranks[:, k] = rankdata(col)
    return {n: float(r) for n, r in zip(names, ranks.mean(axis=1))}


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and *sample* standard deviation (``ddof=1``; 0 for a single value)."""
    a = np.asarray(xs, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no value given")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0
