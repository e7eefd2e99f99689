"""UWSO (UW-SO): the weights softmax(1/((L + ε)T)) from a 60-digit reference (Kirchdorfer et al.
2024, arXiv:2408.07985), the first author's implementation (lukaskirchdorfer/MTL4PPM @9376651,
``src/weighting/UW_SO.py``, re-implemented: ``softmax((1/(L.detach() + 1e-8))/T)``, then
``(w·L).sum().backward()``), its limits in T, the Balancer, and the domain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtlbal.functional import uw_so_weights
from mtlbal.weighting import UWSO, LossContext, ScaleInvariant

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

TEMPERATURES = (0.1, 1.0, 10.0)


def reference(losses: torch.Tensor, T: float, eps: float) -> torch.Tensor:
    """w_t = exp(a_t) / Σ_j exp(a_j), a_t = 1/((L_t + ε)·T), in 60-digit decimals (the common
    factor exp(−max a) taken out so that the decimals do not overflow)."""
    a = [1 / ((D(v) + D(eps)) * D(T)) for v in losses.tolist()]
    top = max(a)
    e = [(x - top).exp() for x in a]
    s = sum(e)
    return to_tensor([x / s for x in e])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("seed", SEEDS)
def test_weights_are_the_papers(kind: str, m: int, seed: int) -> None:
    L = losses_of(kind, m, seed)
    for T in TEMPERATURES:
        for eps in (1e-8, 0.0):
            ref = reference(L, T, eps)
            for reduction, k in (("mean", 1.0), ("sum", float(m))):
                g, w = grad_wrt_losses(UWSO(m, temperature=T, eps=eps, reduction=reduction), L)
                torch.testing.assert_close(w, k * ref, rtol=1e-12, atol=1e-300)
                torch.testing.assert_close(g, k * ref, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("m", MS)
def test_parity_with_the_authors_code(m: int) -> None:
    for kind in KINDS:
        for seed in SEEDS:
            for T in TEMPERATURES:
                L = losses_of(kind, m, seed).requires_grad_(True)
                logits = (1 / (L.detach() + 1e-8)) / T
                bw = F.softmax(logits, dim=-1)
                (theirs,) = torch.autograd.grad((bw * L).sum(), L)
                ours, w = grad_wrt_losses(UWSO(temperature=T, reduction="mean"), L.detach())
                # their logits carry a rounding error of |logit|·2⁻⁵² each (ours do not: see
                # test_weights_are_the_papers); a weight moves by at most twice that, relative
                tol = 1e-14 + 4 * float(logits.abs().max()) * 2.0**-52
                torch.testing.assert_close(ours, theirs, rtol=tol, atol=0)
                torch.testing.assert_close(w, bw, rtol=tol, atol=0)


def test_balancer_gradient() -> None:
    def total(L: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(1 / (L.detach() + 1e-8) / 0.5, dim=0)
        return 3 * (w * L).sum()

    balancer_vs_reference(lambda: UWSO(temperature=0.5), total)


def test_temperature_limits_and_equal_losses() -> None:
    L = torch.tensor([0.2, 1.0, 5.0], dtype=F64)
    # T → ∞: equal weights; T → 0: all the weight on the smallest loss
    torch.testing.assert_close(UWSO(temperature=1e12)(L), torch.ones(3, dtype=F64))
    torch.testing.assert_close(
        UWSO(temperature=1e-3)(L), torch.tensor([3.0, 0.0, 0.0], dtype=F64), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(UWSO()(torch.full((4,), 2.5, dtype=F64)), torch.ones(4, dtype=F64))
    # "mean" weights sum to one
    w = UWSO(reduction="mean")(L)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=F64))


def test_kernel_and_uw_o() -> None:
    L = torch.tensor([1.0, 0.5], dtype=F64)
    torch.testing.assert_close(
        uw_so_weights(L, 1.0, 0.0), torch.softmax(torch.tensor([1.0, 2.0], dtype=F64), 0)
    )
    # without the softmax the analytical weights 1/L are ScaleInvariant's (UW-O)
    torch.testing.assert_close(ScaleInvariant(eps=0.0)(L), 1 / L)


@pytest.mark.parametrize(("eps", "bad"), [(0.0, 0.0), (1e-8, -1.0)])
def test_outside_the_domain_is_refused_naming_the_task(eps: float, bad: float) -> None:
    refuse_check(lambda: UWSO(eps=eps), bad, "UWSO weights")


def test_tiny_losses_do_not_overflow() -> None:
    # float32, eps=0, T=0.01: 1/(L·T) = 1e39 would overflow; the weights are still exact
    # (normal numbers only: another test may have set flush-to-zero for subnormals)
    ws = UWSO(eps=0.0, temperature=0.01, reduction="mean")
    out = ws.objectives(torch.tensor([1e-37, 1.0]), LossContext())
    assert out.domain is not None and out.domain[0].tolist() == [True, True]
    torch.testing.assert_close(out.weights, torch.tensor([1.0, 0.0]))
    # two equal tiny losses: equal weights (no 0/0)
    w = UWSO(eps=0.0, temperature=0.01)(torch.tensor([1e-37, 1e-37, 1.0]))
    torch.testing.assert_close(w, torch.tensor([1.5, 1.5, 0.0]))


def test_bad_arguments() -> None:
    for T in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            UWSO(temperature=T)
    with pytest.raises(ValueError, match="eps"):
        UWSO(eps=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        UWSO(reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="built for 3 tasks"):
        UWSO(3)(torch.ones(2))
