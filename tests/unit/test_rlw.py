"""RLW: weights are softmax of the seeded normal draw (reference drawn independently from the
same generator state), scales, reproducibility and resume."""

from __future__ import annotations

import math

import pytest
import torch

from mtlbal.weighting import RLW
from mtlbal.weighting.base import LossContext

from ._methods_helpers import check_resume


def test_matches_reference_draws() -> None:
    gen = torch.Generator().manual_seed(7)
    rlw = RLW(4, seed=7)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    for _ in range(5):
        eps = torch.randn(4, generator=gen, dtype=torch.float64).tolist()
        e = [math.exp(v) for v in eps]
        ref = torch.tensor([4 * v / sum(e) for v in e], dtype=torch.float64)
        out = rlw.objectives(losses, LossContext())
        torch.testing.assert_close(out.weights, ref)
        torch.testing.assert_close(out.objectives, ref * losses)


def test_mean_scale_and_sums() -> None:
    a = RLW(seed=1).objectives(torch.ones(5), LossContext()).weights
    b = RLW(seed=1, reduction="mean").objectives(torch.ones(5), LossContext()).weights
    torch.testing.assert_close(a, 5 * b)
    torch.testing.assert_close(b.sum(), torch.tensor(1.0))
    assert (b > 0).all()


def test_expected_weight_is_one_under_sum() -> None:
    rlw = RLW(seed=3)
    ws = torch.stack([rlw.objectives(torch.ones(3), LossContext()).weights for _ in range(4000)])
    # symmetric distribution: each mean is 1 up to Monte-Carlo error
    torch.testing.assert_close(ws.mean(0), torch.ones(3), atol=0.03, rtol=0)


def test_state_round_trip_and_reset() -> None:
    rlw = RLW(seed=11)
    rlw.objectives(torch.ones(3), LossContext())
    other = RLW(seed=99)
    other.load_state_dict(rlw.state_dict())
    a = rlw.objectives(torch.ones(3), LossContext()).weights
    b = other.objectives(torch.ones(3), LossContext()).weights
    torch.testing.assert_close(a, b)
    rlw.reset()
    torch.testing.assert_close(
        rlw.objectives(torch.ones(3), LossContext()).weights,
        RLW(seed=11).objectives(torch.ones(3), LossContext()).weights,
    )


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="reduction"):
        RLW(reduction="avg")  # type: ignore[arg-type]


def test_resume() -> None:
    check_resume(lambda: {"weighting": RLW(3, seed=4)})
