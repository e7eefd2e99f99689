"""Δm%, Δp, mean rank and mean ± std against values computed by hand."""

from __future__ import annotations

import math

import pytest
from benchmarks import metrics as M


def test_delta_m_hand_computed() -> None:
    # accuracy 0.9 vs 1.0 (higher better): −(0.9−1)/1 = +0.1 (10 % worse)
    # error 0.6 vs 0.5 (lower better): +(0.6−0.5)/0.5 = +0.2 (20 % worse)
    # Δm = 100·(0.1 + 0.2)/2 = 15
    assert M.delta_m([0.9, 0.6], [1.0, 0.5], [True, False]) == pytest.approx(15.0)


def test_delta_m_negative_when_better_than_baseline() -> None:
    # acc 0.8 → 0.88 is 10 % better, error 2 → 1.5 is 25 % better: Δm = −(10 + 25)/2
    assert M.delta_m([0.88, 1.5], [0.8, 2.0], [True, False]) == pytest.approx(-17.5)


def test_delta_m_averages_over_metrics_not_tasks() -> None:
    # task A has metrics +10 %, +30 % worse, task B one metric 20 % better
    vals, base, hib = [1.1, 1.3, 0.8], [1.0, 1.0, 1.0], [False, False, False]
    assert M.delta_m(vals, base, hib) == pytest.approx(100 * (0.1 + 0.3 - 0.2) / 3)
    # Δp: per task first (A: −20 %, B: +20 %), then over tasks → 0
    assert M.delta_p(vals, base, hib, ["A", "A", "B"]) == pytest.approx(0.0, abs=1e-12)


def test_delta_p_is_minus_delta_m_with_one_metric_per_task() -> None:
    vals, base, hib = [0.9, 0.6, 3.0], [1.0, 0.5, 2.0], [True, False, False]
    dm = M.delta_m(vals, base, hib)
    assert M.delta_p(vals, base, hib, ["a", "b", "c"]) == pytest.approx(-dm)
    # hand: gains −10 %, −20 %, −50 % → mean −26.67
    assert M.delta_p(vals, base, hib, ["a", "b", "c"]) == pytest.approx(-80 / 3)


def test_delta_checks_inputs() -> None:
    with pytest.raises(ValueError, match="one length"):
        M.delta_m([1.0], [1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="baseline metric is 0"):
        M.delta_m([1.0], [0.0], [True])
    with pytest.raises(ValueError, match="tasks has"):
        M.delta_p([1.0, 2.0], [1.0, 2.0], [True, True], ["a"])


def test_rankdata_ties_share_mean_rank() -> None:
    assert M.rankdata([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_mean_rank_hand_computed() -> None:
    # metric 0 higher is better: A 0.9 (1), B 0.8 (2.5), C 0.8 (2.5)
    # metric 1 lower is better:  A 3.0 (3), B 1.0 (1),   C 2.0 (2)
    table = {"A": [0.9, 3.0], "B": [0.8, 1.0], "C": [0.8, 2.0]}
    mr = M.mean_rank(table, [True, False])
    assert mr == pytest.approx({"A": 2.0, "B": 1.75, "C": 2.25})


def test_mean_std_is_sample_std() -> None:
    mean, std = M.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    # Σ(x − mean)² = (16 + 1 + 25)/9 = 42/9, / (n − 1) = 7/3
    assert std == pytest.approx(math.sqrt(7 / 3))
    assert M.mean_std([5.0]) == (5.0, 0.0)
