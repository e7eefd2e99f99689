"""benchmarks/stats.py against hand-computed values and SciPy (when installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from benchmarks import stats as st


@pytest.mark.parametrize(
    ("q", "df", "table"),
    # printed t tables (two-sided 95 %: 0.975; power 0.8)
    [(0.975, 2, 4.302653), (0.975, 4, 2.776445), (0.975, 9, 2.262157), (0.8, 9, 0.883404)],
)
def test_t_quantiles_match_the_tables(q: float, df: int, table: float) -> None:
    assert st.t_ppf(q, df) == pytest.approx(table, abs=1e-6)
    assert st.t_cdf(st.t_ppf(q, df), df) == pytest.approx(q, abs=1e-12)
    assert st.t_ppf(1 - q, df) == pytest.approx(-table, abs=1e-6)


def test_t_distribution_matches_scipy() -> None:
    ss = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 29, 120):
        for t in (-4.0, -1.3, -0.2, 0.0, 0.7, 2.5, 9.0):
            assert st.t_cdf(t, df) == pytest.approx(ss.t.cdf(t, df), abs=1e-12)
        for q in (0.6, 0.8, 0.975, 0.9995):
            assert st.t_ppf(q, df) == pytest.approx(ss.t.ppf(q, df), rel=1e-9)


def test_paired_interval_by_hand() -> None:
    # d = (1, 2, 3): d̄ = 2, s_d = 1, se = 1/√3, t_{0.975,2} = 4.302653
    r = st.paired([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    half = 4.302653 / math.sqrt(3)
    assert (r.mean, r.sd, r.n) == (2.0, 1.0, 3)
    assert (r.low, r.high) == (pytest.approx(2 - half, abs=1e-6), pytest.approx(2 + half, abs=1e-6))
    # t = 2√3 = 3.4641 with 2 df: two-sided p = 0.07418 (printed tables / scipy)
    assert r.p == pytest.approx(0.0741799, abs=1e-6)


def test_paired_matches_scipy_ttest_rel() -> None:
    ss = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=7), rng.normal(size=7) + 0.3
    r = st.paired(list(x), list(y))
    ref = ss.ttest_rel(x, y)
    assert r.p == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (r.low, r.high) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))


def test_paired_edge_cases() -> None:
    one = st.paired([1.0], [0.0])
    assert one.p == 1.0 and one.low == -math.inf and one.high == math.inf
    same = st.paired([1.0, 2.0], [0.0, 1.0])  # every difference is 1: no spread
    assert (same.low, same.high, same.p) == (1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="one length"):
        st.paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="not finite"):
        st.paired([1.0, math.nan], [1.0, 2.0])


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.03, 0.04 → ×3, ×2, ×1 = 0.03, 0.06, 0.04 → running max 0.03, 0.06, 0.06
    assert st.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert st.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert st.holm([]) == []


def test_compare_to_reference_verdicts() -> None:
    seeds = range(6)
    noise = [0.3, -0.2, 0.1, -0.4, 0.25, -0.05]
    vals = {
        "Equal": {s: 10.0 + noise[s] for s in seeds},
        "good": {s: 8.0 + noise[s] + 0.01 * s for s in seeds},  # 2 lower, paired: clear
        "bad": {s: 12.0 + noise[s] - 0.01 * s for s in seeds},
        "same": {s: 10.0 + noise[s] + (0.05 if s % 2 else -0.05) for s in seeds},
    }
    out = st.compare_to_reference(vals, "Equal")
    assert [out[k]["verdict"] for k in ("good", "bad", "same")] == [
        "better",
        "worse",
        "indistinguishable",
    ]
    assert out["good"]["low"] < out["good"]["diff"] < out["good"]["high"] < 0
    assert out["same"]["low"] < 0 < out["same"]["high"]
    # Holm over the three comparisons: never below the raw p
    assert all(v["p_holm"] >= v["p"] for v in out.values())
    with pytest.raises(ValueError, match="reference"):
        st.compare_to_reference({"a": {0: 1.0}}, "Equal")


def test_groups_chain_and_split() -> None:
    seeds = range(8)
    rng = np.random.default_rng(1)
    base = rng.normal(size=8)
    # A and B indistinguishable, C far from both: groups {A, B}, {C}
    vals = {
        "A": {s: float(base[s]) for s in seeds},
        "B": {s: float(base[s] + 0.01 * (-1) ** s) for s in seeds},
        "C": {s: float(base[s] + 5 + 0.01 * s) for s in seeds},
    }
    assert st.groups(vals) == {"A": "a", "B": "a", "C": "b"}
    # a chain: A ~ B and B ~ C but A ≠ C → A "a", B "ab", C "b"
    wobble = [0.9, -0.8, 1.1, -1.0, 0.7, -1.2, 1.0, -0.9]
    chain = {
        "A": {s: 0.0 for s in seeds},
        "B": {s: 0.5 + wobble[s] for s in seeds},
        "C": {s: 1.0 for s in seeds},
    }
    assert st.groups(chain) == {"A": "a", "B": "ab", "C": "b"}


def test_detectable_difference_by_hand_and_seeds_needed() -> None:
    # (t_{0.975,9} + t_{0.8,9}) · 1/√10 = (2.262157 + 0.883404)/3.162278
    assert st.detectable_difference(1.0, 10) == pytest.approx(0.994714, abs=1e-5)
    assert st.detectable_difference(1.0, 1) == math.inf
    assert st.seeds_needed(1.0, 1.0) == 10
    # more comparisons (Holm ≤ Bonferroni) need more seeds; twice the SD needs more
    assert st.seeds_needed(1.0, 1.0, comparisons=10) > 10
    assert st.seeds_needed(1.0, 2.0) > 10
    with pytest.raises(ValueError):
        st.seeds_needed(0.0, 1.0)


def test_seeds_needed_reach_the_power_exactly_computed() -> None:
    ss = pytest.importorskip("scipy.stats")

    def power(delta: float, sd: float, n: int, k: int) -> float:
        a = 0.05 / k
        tc = ss.t.ppf(1 - a / 2, n - 1)
        nc = delta * math.sqrt(n) / sd
        return float(1 - ss.nct.cdf(tc, n - 1, nc) + ss.nct.cdf(-tc, n - 1, nc))

    # the approximation is within a few points of the exact power of the paired t-test
    for delta, sd, k in ((1.0, 1.0, 1), (0.5, 1.0, 1), (1.0, 1.0, 10), (2.0, 1.0, 30)):
        n = st.seeds_needed(delta, sd, comparisons=k)
        assert power(delta, sd, n, k) >= 0.78
        assert power(delta, sd, n - 1, k) < 0.8
