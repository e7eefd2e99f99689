"""Statistics of the benchmark's comparisons: seed-paired differences, t-intervals, Holm's
correction, groups that cannot be told apart, and the number of seeds a difference needs.

Every strategy of a suite is trained with the same seeds as the reference (equal weights), so a
strategy's result on seed ``s`` is compared with the reference's on the same seed:
``d_s = x_s − r_s``. With ``n`` seeds, ``d̄`` the mean and ``s_d`` the sample SD (``ddof = 1``):

* **95% interval** (paired t-interval): ``d̄ ± t_{0.975, n−1} · s_d / √n``.
* **p-value** (two-sided paired t-test of ``d̄ = 0``): ``2 · (1 − F_{n−1}(|d̄| √n / s_d))`` with
  ``F_ν`` the Student-t CDF (computed here from the regularised incomplete beta function, so that
  the benchmark needs no SciPy; the tests compare it with SciPy).
* **Holm's correction** over the ``k`` comparisons of a suite (Holm 1979): sort the p-values
  ``p_(1) ≤ … ≤ p_(k)``; the adjusted ``p̃_(i) = max_{j ≤ i} min(1, (k − j + 1) p_(j))``; a
  comparison is significant when ``p̃ ≤ α``. It controls the family-wise error at ``α`` whatever
  the dependence between the comparisons.
* **Verdict** (lower is better, as Δm%): ``"better"`` when significant and ``d̄ < 0``,
  ``"worse"`` when significant and ``d̄ > 0``, otherwise ``"indistinguishable"``.
* **Groups**: strategies sorted by their mean; every pair is compared (paired, Holm over all
  pairs); a group is a maximal run of consecutive strategies in which no pair differs. A strategy
  belongs to every group that contains it (letters ``a``, ``b``, … as in a compact letter
  display): two strategies that share no letter differ.
* **Seeds needed** (normal approximation of the paired t-test's power, Lehr's formula with the
  t quantiles): ``n`` seeds detect a true difference ``δ`` with power ``1 − β`` at level ``α``
  when ``δ ≥ (t_{1−α/2, n−1} + t_{1−β, n−1}) · σ_d / √n``; ``σ_d`` is estimated by the observed
  paired SD. With ``k`` comparisons Holm is at worst Bonferroni, so the level used is ``α / k``.

Example (hand-computed: d = (1, 2, 3), d̄ = 2, s_d = 1, t_{0.975,2} = 4.3027):
    >>> r = paired([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    >>> round(r.mean, 6), round(r.low, 4), round(r.high, 4)
    (2.0, -0.4841, 4.4841)
    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Paired",
    "compare_to_reference",
    "detectable_difference",
    "groups",
    "holm",
    "paired",
    "seeds_needed",
    "t_cdf",
    "t_ppf",
]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """The Student-t CDF ``F_ν(t)`` (``ν = df > 0``)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The Student-t quantile ``F_ν^{-1}(q)`` for ``0 < q < 1`` (bisection on :func:`t_cdf`)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Paired:
    """A seed-paired comparison: mean difference, its 95% (or ``level``) t-interval, the
    two-sided p-value, the sample SD of the differences and the number of pairs."""

    mean: float
    low: float
    high: float
    p: float
    sd: float
    n: int


def paired(x: Sequence[float], ref: Sequence[float], *, level: float = 0.95) -> Paired:
    """Compare ``x`` with ``ref`` seed by seed (``x[i]`` and ``ref[i]`` share a seed).

    With one pair the interval is ``(−∞, ∞)`` and ``p = 1``; with differences that are all equal
    (``s_d = 0``) the interval is the point and ``p`` is 1 (no difference) or 0.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired values need two 1-D arrays of one length, got {a.shape}, {b.shape}"
        )
    if a.size == 0:
        raise ValueError("no pair given")
    if not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
        raise ValueError("a paired value is not finite")
    d = a - b
    n = int(d.size)
    mean = float(d.mean())
    if n < 2:
        return Paired(mean, -math.inf, math.inf, 1.0, math.nan, n)
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        return Paired(mean, mean, mean, 1.0 if mean == 0.0 else 0.0, 0.0, n)
    se = sd / math.sqrt(n)
    half = t_ppf(0.5 + level / 2.0, n - 1) * se
    p = 2.0 * (1.0 - t_cdf(abs(mean) / se, n - 1))
    return Paired(mean, mean - half, mean + half, min(1.0, max(0.0, p)), sd, n)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given."""
    p = list(pvalues)
    k = len(p)
    order = sorted(range(k), key=lambda i: p[i])
    adj = [0.0] * k
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p[i]))
        adj[i] = running
    return adj


def _verdict(mean: float, p_adj: float, alpha: float) -> str:
    if p_adj <= alpha and mean < 0:
        return "better"
    if p_adj <= alpha and mean > 0:
        return "worse"
    return "indistinguishable"


def compare_to_reference(
    values: Mapping[str, Mapping[int, float]],
    reference: str,
    *,
    alpha: float = 0.05,
) -> dict[str, dict[str, float | str | int]]:
    """Each strategy against ``reference`` (lower is better), paired on the seeds both have.

    ``values[strategy][seed]`` is the suite's primary metric (Δm%). Returns, per strategy other
    than the reference: ``diff``, ``low``, ``high`` (95% t-interval), ``p``, ``p_holm`` (Holm over
    all the suite's strategies), ``verdict``, ``sd`` and ``n``.
    """
    if reference not in values:
        raise ValueError(f"no {reference!r} rows: the comparison needs its reference")
    ref = values[reference]
    out: dict[str, dict[str, float | str | int]] = {}
    for s, by_seed in values.items():
        if s == reference:
            continue
        seeds = sorted(set(by_seed) & set(ref))
        if not seeds:
            raise ValueError(f"{s!r} shares no seed with {reference!r}")
        r = paired([by_seed[i] for i in seeds], [ref[i] for i in seeds])
        out[s] = {"diff": r.mean, "low": r.low, "high": r.high, "p": r.p, "sd": r.sd, "n": r.n}
    adj = holm([float(v["p"]) for v in out.values()])
    for v, pa in zip(out.values(), adj):
        v["p_holm"] = pa
        v["verdict"] = _verdict(float(v["diff"]), pa, alpha)
    return out


def groups(values: Mapping[str, Mapping[int, float]], *, alpha: float = 0.05) -> dict[str, str]:
    """The letters of the groups each strategy belongs to (see the module docstring).

    Strategies are sorted by their mean (lower first); every pair is compared with a paired
    t-test on the seeds both have, Holm-corrected over all pairs. Group ``a`` starts at the
    lowest mean.
    """
    names = sorted(values, key=lambda s: (float(np.mean(list(values[s].values()))), s))
    k = len(names)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    ps = []
    for i, j in pairs:
        a, b = values[names[i]], values[names[j]]
        seeds = sorted(set(a) & set(b))
        ps.append(paired([a[s] for s in seeds], [b[s] for s in seeds]).p if seeds else 1.0)
    adj = holm(ps) if ps else []
    differ = {pr for pr, pa in zip(pairs, adj) if pa <= alpha}
    intervals: list[tuple[int, int]] = []
    for i in range(k):
        j = i
        while j + 1 < k and all((h, j + 1) not in differ for h in range(i, j + 1)):
            j += 1
        if not any(a <= i and j <= b for a, b in intervals):
            intervals.append((i, j))
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = {n: "" for n in names}
    for g, (i, j) in enumerate(intervals):
        for h in range(i, j + 1):
            out[names[h]] += letters[g % 26]
    return out


def detectable_difference(
    sd: float, n: int, *, comparisons: int = 1, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest true difference ``n`` paired seeds detect with probability ``power``
    (paired SD ``sd``, ``comparisons`` Holm-corrected tests: level ``alpha / comparisons``)."""
    if n < 2:
        return math.inf
    a = alpha / max(1, comparisons)
    return (t_ppf(1 - a / 2, n - 1) + t_ppf(power, n - 1)) * sd / math.sqrt(n)


def seeds_needed(
    delta: float,
    sd: float,
    *,
    comparisons: int = 1,
    alpha: float = 0.05,
    power: float = 0.8,
    max_seeds: int = 1000,
) -> int:
    """The fewest paired seeds that detect a true difference ``delta`` (see
    :func:`detectable_difference`); ``max_seeds + 1`` when even ``max_seeds`` do not."""
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    if sd == 0:
        return 2
    for n in range(2, max_seeds + 1):
        if detectable_difference(sd, n, comparisons=comparisons, alpha=alpha, power=power) <= delta:
            return n
    return max_seeds + 1
