"""Krum / Multi-Krum: a reference from the paper's score on explicit vectors, the tie rule,
TorchJD 0.18 parity (torchjd/aggregation/_krum.py of the 0.18.0 wheel)."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tj

from mtlbal.aggregation import Krum
from mtlbal.functional import krum_weights

from ._agg1_jacobians import F64, cases, jacobian


def reference(jac: torch.Tensor, f: int, k: int) -> tuple[list[float], list[int], list[int]]:
    """The paper's scores from the rows themselves (not the Gramian); the rows surely selected
    and those tied at the boundary (scores within 1e-9 of the largest score)."""
    m = jac.shape[0]
    rows = [jac[i] for i in range(m)]
    scores = []
    for i in range(m):
        d = sorted(float(torch.linalg.norm(rows[i] - rows[j])) for j in range(m) if j != i)
        scores.append(sum(d[: m - f - 2]))
    boundary = sorted(scores)[k - 1]
    tol = 1e-9 * max(max(scores), 1e-300)
    below = [i for i in range(m) if scores[i] < boundary - tol]
    tied = [i for i in range(m) if abs(scores[i] - boundary) <= tol]
    return scores, below, tied


def _expected_weights(m: int, k: int, below: list[int], tied: list[int]) -> torch.Tensor:
    w = torch.zeros(m, dtype=F64)
    w[below] = 1.0 / k
    w[tied] = (k - len(below)) / (len(tied) * k)
    return w


KRUM_CASES = [
    (kind, m, seed, f, k)
    for kind, m, seed in cases(min_m=3)
    for f in sorted({0, m - 3})
    for k in sorted({1, 2})
]


@pytest.mark.parametrize(("kind", "m", "seed", "f", "k"), KRUM_CASES)
def test_reference_and_torchjd_parity(kind: str, m: int, seed: int, f: int, k: int) -> None:
    jac = jacobian(kind, m, seed)
    _, below, tied = reference(jac, f, k)
    expected = _expected_weights(m, k, below, tied)
    got = Krum(f, k, reduction="mean").weights(jac @ jac.T)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Krum(f, k)(jac), m * (expected @ jac), rtol=1e-10, atol=1e-12)
    theirs = tj.KrumWeighting(f, k)(jac @ jac.T)
    if len(below) + len(tied) == k:  # no tie at the boundary: the same selection
        torch.testing.assert_close(theirs, got, rtol=0, atol=0)
        torch.testing.assert_close(
            Krum(f, k, reduction="mean")(jac), tj.Krum(f, k)(jac), rtol=1e-10, atol=1e-12
        )
    else:  # TorchJD takes some of the tied rows; here they share the remaining selections
        chosen = set(torch.nonzero(theirs).flatten().tolist())
        assert set(below) <= chosen <= set(below) | set(tied)
        torch.testing.assert_close(theirs.sum(), torch.tensor(1.0, dtype=F64))


def test_mutual_nearest_neighbours_share() -> None:
    # m − f − 2 = 1: each score is the distance to the nearest row; rows 0 and 1 are each
    # other's nearest, so their scores are equal and both are the minimum
    jac = torch.tensor([[0.0, 0.0], [0.1, 0.0], [1.0, 1.0], [-2.0, 3.0]], dtype=F64)
    w = krum_weights(jac @ jac.T, n_byzantine=1)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64))
    # Multi-Krum with k = 2 takes both, each with weight 1/2: the same
    torch.testing.assert_close(krum_weights(jac @ jac.T, 1, 2), w)


def test_identical_rows_give_the_sum_with_equal_weights() -> None:
    g = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    jac = g.expand(5, 3).clone()
    torch.testing.assert_close(Krum(1).weights(jac @ jac.T), torch.ones(5, dtype=F64))
    torch.testing.assert_close(Krum(2, 3)(jac), 5 * g)


def test_an_outlier_is_never_selected() -> None:
    gen = torch.Generator().manual_seed(0)
    jac = torch.randn(7, 5, generator=gen, dtype=F64) * 0.1 + 1.0
    jac[3] = -50.0  # the adversary
    w = Krum(2, 3).weights(jac @ jac.T)
    assert w[3] == 0
    torch.testing.assert_close(w.sum(), torch.tensor(7.0, dtype=F64))


def test_refusals_name_the_problem() -> None:
    jac = jacobian("full", 4, 0)
    with pytest.raises(ValueError, match="needs at least n_byzantine \\+ 3 = 5 tasks"):
        Krum(2)(jac)
    with pytest.raises(ValueError, match="n_selected=5 is more than the 4 tasks"):
        Krum(0, 5)(jac)
    with pytest.raises(ValueError, match="n_byzantine must be an integer ≥ 0"):
        Krum(-1)
    with pytest.raises(ValueError, match="n_selected must be an integer ≥ 1"):
        Krum(0, 0)
