"""TrimmedMean: a per-coordinate reference on Python lists, TorchJD 0.18 parity."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tj

import mtlbal
from mtlbal.aggregation import TrimmedMean
from mtlbal.functional import trimmed_mean

from ._agg1_jacobians import F64, cases, jacobian


def reference(jac: torch.Tensor, b: int) -> torch.Tensor:
    m, n = jac.shape
    out = []
    for k in range(n):
        col = sorted(float(x) for x in jac[:, k])
        kept = col[b : m - b]
        out.append(sum(kept) / len(kept))
    return torch.tensor(out, dtype=F64)


TM_CASES = [
    (kind, m, seed, b)
    for kind, m, seed in cases()
    for b in sorted({0, 1, (m - 1) // 2})
    if 2 * b < m
]


@pytest.mark.parametrize(("kind", "m", "seed", "b"), TM_CASES)
def test_reference_and_torchjd_parity(kind: str, m: int, seed: int, b: int) -> None:
    jac = jacobian(kind, m, seed)
    ref = reference(jac, b)
    torch.testing.assert_close(TrimmedMean(b, reduction="mean")(jac), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(TrimmedMean(b)(jac), m * ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        TrimmedMean(b, reduction="mean")(jac), tj.TrimmedMean(b)(jac), rtol=1e-12, atol=1e-12
    )


def test_median_ignores_an_outlier() -> None:
    jac = torch.tensor([[1.0, -1.0], [2.0, 0.0], [30.0, 5.0]], dtype=F64)
    torch.testing.assert_close(trimmed_mean(jac, 1), torch.tensor([2.0, 0.0], dtype=F64))


def test_refusals_name_the_problem() -> None:
    with pytest.raises(ValueError, match="needs at least 2 \\* trim_number \\+ 1 = 5 tasks"):
        TrimmedMean(2)(jacobian("full", 4, 0))
    with pytest.raises(ValueError, match="trim_number must be an integer ≥ 0"):
        TrimmedMean(-1)


def test_through_the_balancer_at_a_cut_point() -> None:
    # the aggregator receives the representation Jacobian: the trunk's gradient is the
    # backward of the trimmed mean of the per-task representation gradients
    torch.manual_seed(0)
    trunk = torch.nn.Linear(3, 4).double()
    heads = [torch.nn.Linear(4, 1).double() for _ in range(3)]
    x = torch.randn(5, 3, dtype=F64)
    bal = mtlbal.Balancer(trunk, at=trunk, aggregator=TrimmedMean(1))
    z = trunk(x)
    losses = [(i + 1.0) * h(z).pow(2).mean() for i, h in enumerate(heads)]
    bal.backward(losses)
    ref_trunk = torch.nn.Linear(3, 4).double()  # a copy without the Balancer's hook
    ref_trunk.load_state_dict(trunk.state_dict())
    zz = ref_trunk(x)
    rows = [
        torch.autograd.grad((i + 1.0) * h(zz).pow(2).mean(), zz, retain_graph=True)[0].flatten()
        for i, h in enumerate(heads)
    ]
    direction = 3 * reference(torch.stack(rows), 1).reshape(zz.shape)
    expected = torch.autograd.grad(zz, ref_trunk.weight, direction)[0]
    torch.testing.assert_close(trunk.weight.grad, expected, rtol=1e-12, atol=1e-14)
