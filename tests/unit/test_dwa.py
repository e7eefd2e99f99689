"""DWA: independent reference (LibMTL-style epoch-average buffer, written as a loop), the
first-two-epochs rule, state round trip and resume."""

from __future__ import annotations

import math

import pytest
import torch

from mtlbal.weighting import DWA
from mtlbal.weighting.base import LossContext

from ._methods_helpers import check_resume


def reference(epoch_losses: list[list[list[float]]], tau: float) -> list[list[float]]:
    """Weights used during each epoch, from per-step losses grouped by epoch."""
    means: list[list[float]] = []
    out = []
    for steps in epoch_losses:
        m = len(steps[0])
        if len(means) >= 2:
            r = [means[-1][k] / means[-2][k] for k in range(m)]
            e = [math.exp(x / tau) for x in r]
            out.append([m * v / sum(e) for v in e])
        else:
            out.append([1.0] * m)
        means.append([sum(s[k] for s in steps) / len(steps) for k in range(m)])
    return out


@pytest.mark.parametrize("tau", [2.0, 0.5])
def test_matches_reference(tau: float) -> None:
    gen = torch.Generator().manual_seed(0)
    epochs = [
        [(torch.rand(3, generator=gen) + 0.1).tolist() for _ in range(n)] for n in (3, 2, 4, 1, 5)
    ]
    expected = reference(epochs, tau)
    dwa = DWA(3, temperature=tau)
    for steps, w_ref in zip(epochs, expected):
        for s in steps:
            out = dwa.objectives(torch.tensor(s, dtype=torch.float64), LossContext())
            torch.testing.assert_close(out.weights, torch.tensor(w_ref, dtype=torch.float64))
            torch.testing.assert_close(
                out.objectives, out.weights * torch.tensor(s, dtype=torch.float64)
            )
            dwa.observe(torch.tensor(s))
        dwa.epoch_end()


def test_equal_rates_give_ones_and_sum_m() -> None:
    dwa = DWA()
    for v in (4.0, 2.0, 1.0):
        dwa.observe(torch.full((3,), v))
        dwa.epoch_end()
    torch.testing.assert_close(dwa(torch.ones(3)), torch.ones(3))


def test_empty_epoch_is_ignored_and_state_round_trip() -> None:
    dwa = DWA()
    dwa.epoch_end()
    dwa.observe(torch.tensor([1.0, 3.0]))
    dwa.epoch_end()
    dwa.epoch_end()
    dwa.observe(torch.tensor([0.5, 3.0]))
    dwa.epoch_end()
    other = DWA()
    other.load_state_dict(dwa.state_dict())
    torch.testing.assert_close(other(torch.ones(2)), dwa(torch.ones(2)))
    assert not torch.allclose(dwa(torch.ones(2)), torch.ones(2))
    dwa.reset()
    torch.testing.assert_close(dwa(torch.ones(2)), torch.ones(2))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="temperature"):
        DWA(temperature=0.0)
    dwa = DWA()
    dwa.observe(torch.ones(2))
    with pytest.raises(ValueError, match="accumulates 2 tasks"):
        dwa.observe(torch.ones(3))


def test_resume() -> None:
    check_resume(lambda: {"weighting": DWA(3)}, steps=10, k=5, epoch_every=2)


def test_zero_epoch_mean_gives_a_neutral_rate_not_nan() -> None:
    """Documented policy: a task whose epoch mean L̄(e−2) is 0 has rate 1 (no NaN)."""
    dwa = DWA()
    for epoch in ([0.0, 2.0], [0.0, 1.0]):
        dwa.observe(torch.tensor(epoch))
        dwa.epoch_end()
    w = dwa(torch.tensor([1.0, 1.0]))
    rates = [1.0, 0.5]
    e = [math.exp(r / 2.0) for r in rates]
    ref = torch.tensor([2 * x / sum(e) for x in e])
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=0)
