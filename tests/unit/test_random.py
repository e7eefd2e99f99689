"""Random: the paper's softmax of Gaussian noise, its own generator, TorchJD 0.18 parity."""

from __future__ import annotations

import math

import pytest
import torch
import torchjd.aggregation as tj

from mtlbal.aggregation import Random
from mtlbal.functional import random_weights

from ._agg1_jacobians import F64, cases, jacobian
from ._methods_helpers import check_resume


def _softmax_reference(noise: list[float]) -> list[float]:
    e = [math.exp(x) for x in noise]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize(("kind", "m", "seed"), cases())
def test_reference_and_torchjd_parity(kind: str, m: int, seed: int) -> None:
    jac = jacobian(kind, m, seed)
    gen = torch.Generator().manual_seed(seed)
    agg, mean = Random(seed=seed), Random(seed=seed, reduction="mean")
    for _ in range(2):  # two draws from the stream
        lam = _softmax_reference(torch.randn(m, generator=gen, dtype=F64).tolist())
        ref = sum((lam[t] * jac[t] for t in range(m)), torch.zeros(jac.shape[1], dtype=F64))
        torch.testing.assert_close(agg(jac), m * ref, rtol=1e-12, atol=1e-12)
        # TorchJD draws the same N(0, I) from the global generator, in the Jacobian's dtype
        torch.manual_seed(seed)
        theirs = tj.Random()(jac)
        torch.testing.assert_close(Random(seed=seed, reduction="mean")(jac), theirs)
        mean(jac)


def test_weights_sum_to_m_or_1() -> None:
    noise = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    assert math.isclose(float(random_weights(noise).sum()), 3.0)
    assert math.isclose(float(random_weights(noise, "mean").sum()), 1.0)


def test_draws_do_not_depend_on_the_gradients_dtype() -> None:
    jac = jacobian("full", 4, 1)
    w64 = Random(seed=5).weights(jac @ jac.T)
    w32 = Random(seed=5).weights((jac @ jac.T).float())
    assert torch.equal(w64, w32)


def test_state_dict_restores_the_stream() -> None:
    jac = jacobian("full", 3, 2)
    a = Random(seed=1)
    a(jac)
    sd = a.state_dict()
    expected = a(jac)
    b = Random(seed=2)
    b.load_state_dict(sd)
    torch.testing.assert_close(b(jac), expected, rtol=0, atol=0)
    b.reset()  # back to the seed
    torch.testing.assert_close(b(jac), Random(seed=2)(jac), rtol=0, atol=0)


def test_resume_equals_uninterrupted() -> None:
    check_resume(lambda: {"aggregator": Random(seed=3)})
