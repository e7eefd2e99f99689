"""GeometricMean (GLS): the gradient of (Π L)^{1/m} from a 60-digit reference, TorchJD 0.18's
``GeometricMean`` and LibMTL's ``GLS`` (median-research-group/LibMTL @4336804, re-implemented:
``pow(prod(L), 1/m)``), the Balancer against autograd of the same, and the domain."""

from __future__ import annotations

import math

import pytest
import torch
from torchjd.scalarization import GeometricMean as TorchJDGeometricMean

from mtlbal.functional import geometric_mean_weights
from mtlbal.weighting import GeometricMean, LossContext

from ._loss_level_helpers import (
    F64,
    KINDS,
    MS,
    SEEDS,
    D,
    balancer_vs_reference,
    grad_wrt_losses,
    losses_of,
    refuse_check,
    to_tensor,
)


def reference_weights(losses: torch.Tensor) -> torch.Tensor:
    """∂/∂L_t (Π_s L_s)^{1/m} = GM/(m·L_t), the product and root in 60-digit decimals."""
    ls = [D(v) for v in losses.tolist()]
    m = len(ls)
    prod = math.prod(ls, start=D(1.0))
    gm = prod ** (D(1.0) / m)
    return to_tensor([gm / (m * x) for x in ls])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("seed", SEEDS)
def test_gradient_is_the_paper_geometric_mean(kind: str, m: int, seed: int) -> None:
    L = losses_of(kind, m, seed)
    ref = reference_weights(L)
    for reduction, k in (("mean", 1.0), ("sum", float(m))):
        g, w = grad_wrt_losses(GeometricMean(m, reduction=reduction), L)
        torch.testing.assert_close(g, k * ref, rtol=1e-13, atol=0)
        torch.testing.assert_close(w, k * ref, rtol=1e-13, atol=0)
    # the objectives sum to the geometric mean itself, in value too
    out = GeometricMean(reduction="mean").objectives(L, LossContext())
    gm = math.exp(math.fsum(math.log(v) for v in L.tolist()) / m)
    assert math.isclose(float(out.objectives.sum()), gm, rel_tol=1e-13)
    assert bool(out.domain[0].all())  # type: ignore[index]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", MS)
def test_parity_with_torchjd(kind: str, m: int) -> None:
    for seed in SEEDS:
        L = losses_of(kind, m, seed).requires_grad_(True)
        (theirs,) = torch.autograd.grad(TorchJDGeometricMean()(L), L)
        ours, _ = grad_wrt_losses(GeometricMean(reduction="mean"), L.detach())
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=0)


@pytest.mark.parametrize("m", MS)
def test_parity_with_libmtl_gls(m: int) -> None:
    # LibMTL forms the product (it under/overflows for tiny or huge losses): moderate ones only
    for kind in ("moderate", "equal"):
        for seed in SEEDS:
            L = losses_of(kind, m, seed).requires_grad_(True)
            (theirs,) = torch.autograd.grad(torch.pow(L.prod(), 1.0 / m), L)
            ours, _ = grad_wrt_losses(GeometricMean(reduction="mean"), L.detach())
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


def test_balancer_gradient_is_that_of_the_geometric_mean() -> None:
    balancer_vs_reference(lambda: GeometricMean(reduction="mean"), lambda L: L.prod() ** (1 / 3))
    balancer_vs_reference(lambda: GeometricMean(), lambda L: 3 * L.prod() ** (1 / 3))


def test_kernel_and_equal_losses() -> None:
    w = geometric_mean_weights(torch.tensor([2.0, 8.0], dtype=F64))  # GM = 4
    torch.testing.assert_close(w, torch.tensor([1.0, 0.25], dtype=F64))
    # equal losses: w = 1 under the sum convention, whatever their value
    for v in (1e-30, 1.0, 1e30):
        torch.testing.assert_close(
            GeometricMean()(torch.full((5,), v, dtype=F64)), torch.ones(5, dtype=F64)
        )


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_non_positive_loss_is_refused_naming_the_task(bad: float) -> None:
    refuse_check(lambda: GeometricMean(2), bad, "GeometricMean")


def test_overflowing_weight_is_outside_the_domain() -> None:
    # float32: 1e-37 next to two losses of 1e38 gives a weight 3·e^115, beyond float32
    out = GeometricMean().objectives(torch.tensor([1e-37, 1e38, 1e38]), LossContext())
    assert out.domain is not None and out.domain[0].tolist() == [False, True, True]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="reduction"):
        GeometricMean(reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_tasks"):
        GeometricMean(0)
    with pytest.raises(ValueError, match="built for 3 tasks"):
        GeometricMean(3)(torch.ones(2))
