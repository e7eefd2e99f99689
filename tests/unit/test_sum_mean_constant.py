"""Sum, Mean and Constant: references from the definitions, TorchJD 0.18 parity."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tj

from mtlbal.aggregation import Constant, Mean, Sum
from mtlbal.functional import constant_weights, mean_weights, sum_weights

from ._agg1_jacobians import F64, cases, jacobian

CASES = cases()


def _rows_combined(jac: torch.Tensor, w: list[float]) -> torch.Tensor:
    out = torch.zeros(jac.shape[1], dtype=F64)
    for t, wt in enumerate(w):
        out = out + wt * jac[t]
    return out


@pytest.mark.parametrize(("kind", "m", "seed"), CASES)
def test_reference_and_torchjd_parity(kind: str, m: int, seed: int) -> None:
    jac = jacobian(kind, m, seed)
    ones = [1.0] * m
    w = [0.3 + 0.4 * t for t in range(m)]
    torch.testing.assert_close(Sum()(jac), _rows_combined(jac, ones), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Mean()(jac), _rows_combined(jac, ones) / m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Constant(w)(jac), _rows_combined(jac, w), rtol=1e-12, atol=1e-12)
    # TorchJD: Sum and Constant sum, Mean averages — the same defaults here
    torch.testing.assert_close(Sum()(jac), tj.Sum()(jac), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Mean()(jac), tj.Mean()(jac), rtol=1e-12, atol=1e-12)
    theirs = tj.Constant(torch.tensor(w, dtype=F64))(jac)
    torch.testing.assert_close(Constant(w)(jac), theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Constant(w, reduction="mean")(jac), theirs / m)


def test_sum_and_mean_are_one_method_with_two_scales() -> None:
    jac = jacobian("full", 4, 0)
    torch.testing.assert_close(Sum(reduction="mean")(jac), Mean()(jac))
    torch.testing.assert_close(Mean(reduction="sum")(jac), Sum()(jac))
    g = jac @ jac.T
    assert torch.equal(sum_weights(g), torch.ones(4, dtype=F64))
    assert torch.equal(mean_weights(g), torch.full((4,), 0.25, dtype=F64))
    assert torch.equal(Mean().weights(g), torch.full((4,), 0.25, dtype=F64))


def test_constant_refuses_bad_weights() -> None:
    with pytest.raises(ValueError, match="2 weights for 3 tasks"):
        Constant([1.0, 2.0])(jacobian("full", 3, 0))
    with pytest.raises(ValueError, match="2 weights for 3 tasks"):
        constant_weights(torch.eye(3), torch.ones(2))
    with pytest.raises(ValueError, match="finite"):
        Constant([1.0, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        Constant([])
    with pytest.raises(TypeError, match="sequence of floats"):
        Constant(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        Constant(torch.ones(2, 2))
    assert repr(Constant(torch.tensor([1.0, 0.5]))) == "Constant(weights=[1.0, 0.5])"


def test_constant_weights_follow_the_device_and_are_not_state() -> None:
    agg = Constant([1.0, 2.0])
    assert agg.state_dict().keys() == {"_extra_state"}
    agg.to(torch.float32)  # configuration stays exact: the weights are used in float64
    torch.testing.assert_close(agg.weights(torch.eye(2)), torch.tensor([1.0, 2.0], dtype=F64))
