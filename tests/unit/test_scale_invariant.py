"""ScaleInvariant (SI, DB-MTL's loss part): the gradient of Σ c_t log(L_t + ε) from a 60-digit
reference, nash-mtl's SI baseline (AvivNavon/nash-mtl @cce1840,
``ScaleInvariantLinearScalarization``: ``sum(log(L) * task_weights)``) and LibMTL's DB-MTL log
transform (median-research-group/LibMTL @4336804: ``log(losses + 1e-8)``), re-implemented; the
per-task gradients an aggregator sees are those of log(L_t + 1e-8) (what DB-MTL's gradient part
balances); the domain."""

from __future__ import annotations

import math

import pytest
import torch

import mtlbal
from mtlbal.aggregation import UPGrad
from mtlbal.functional import scale_invariant_objectives
from mtlbal.weighting import LossContext, ScaleInvariant

from ._loss_level_helpers import (
    F64,
    KINDS,
    MS,
    SEEDS,
    D,
    Net,
    balancer_vs_reference,
    grad_wrt_losses,
    losses_of,
    refuse_check,
    to_tensor,
)


def reference(
    losses: torch.Tensor, eps: float, c: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_t·ln(L_t + ε), c_t/(L_t + ε)) in 60-digit decimals."""
    ls = [D(v) + D(eps) for v in losses.tolist()]
    return (
        to_tensor([D(ci) * x.ln() for ci, x in zip(c, ls)]),
        to_tensor([D(ci) / x for ci, x in zip(c, ls)]),
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("seed", SEEDS)
def test_objectives_and_gradient_are_the_log_losses(kind: str, m: int, seed: int) -> None:
    L = losses_of(kind, m, seed)
    c = (torch.rand(m, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5).tolist()
    for eps in (0.0, 1e-8):
        for weights in (None, c):
            ref_obj, ref_w = reference(L, eps, [1.0] * m if weights is None else weights)
            si = ScaleInvariant(m, eps=eps, weights=weights)
            g, w = grad_wrt_losses(si, L)
            torch.testing.assert_close(g, ref_w, rtol=1e-13, atol=0)
            torch.testing.assert_close(w, ref_w, rtol=1e-13, atol=0)
            out = si.objectives(L, LossContext())
            torch.testing.assert_close(out.objectives, ref_obj, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("m", MS)
def test_parity_with_nash_mtl_si_and_libmtl_db_mtl(m: int) -> None:
    for kind in KINDS:
        for seed in SEEDS:
            L = losses_of(kind, m, seed).requires_grad_(True)
            tw = torch.rand(m, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5
            # nash-mtl: torch.sum(torch.log(losses) * self.task_weights)
            (nash,) = torch.autograd.grad(torch.sum(torch.log(L) * tw), L)
            ours, _ = grad_wrt_losses(ScaleInvariant(eps=0.0, weights=tw.tolist()), L.detach())
            torch.testing.assert_close(ours, nash, rtol=1e-14, atol=0)
            # LibMTL DB_MTL: the per-task objectives are torch.log(losses + 1e-8)
            db = torch.log(L + 1e-8)
            out = ScaleInvariant().objectives(L, LossContext())
            torch.testing.assert_close(out.objectives, db, rtol=0, atol=0)


def test_aggregator_sees_the_gradients_of_the_log_losses() -> None:
    # DB-MTL = ScaleInvariant + aggregation.DBMTL: the Gramian handed to the gradient part is
    # that of ∇ log(L_t + 1e-8) at the shared parameters
    net = Net(3)
    bal = mtlbal.Balancer(net.trunk, weighting=ScaleInvariant(), aggregator=UPGrad())
    info = bal.backward(net.losses())
    shared = list(net.trunk.parameters())
    rows = []
    for v in net.loss_list():
        gs = torch.autograd.grad(torch.log(v + 1e-8), shared, retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in gs]))
    J = torch.stack(rows)
    assert info.gramian is not None
    torch.testing.assert_close(info.gramian, J @ J.T, rtol=1e-12, atol=1e-15)


def test_balancer_gradient_is_that_of_the_summed_log_losses() -> None:
    balancer_vs_reference(lambda: ScaleInvariant(eps=0.0), lambda L: torch.log(L).sum())
    balancer_vs_reference(
        lambda: ScaleInvariant(weights=[1.0, 0.5, 2.0]),
        lambda L: (torch.tensor([1.0, 0.5, 2.0], dtype=F64) * torch.log(L + 1e-8)).sum(),
    )


def test_scale_invariance() -> None:
    # multiplying a loss (hence its gradient) by c leaves its term of the update unchanged
    L = torch.tensor([0.3, 7.0], dtype=F64)
    w1 = ScaleInvariant(eps=0.0)(L)
    w2 = ScaleInvariant(eps=0.0)(L * torch.tensor([1.0, 1e6], dtype=F64))
    torch.testing.assert_close(w2 * torch.tensor([1.0, 1e6], dtype=F64), w1, rtol=1e-15, atol=0)


def test_kernel() -> None:
    obj, w = scale_invariant_objectives(torch.tensor([math.e, 1.0], dtype=F64), eps=0.0)
    torch.testing.assert_close(obj, torch.tensor([1.0, 0.0], dtype=F64))
    torch.testing.assert_close(w, torch.tensor([1 / math.e, 1.0], dtype=F64))


@pytest.mark.parametrize(("eps", "bad"), [(0.0, 0.0), (0.0, -1.0), (1e-8, -1.0)])
def test_outside_the_domain_is_refused_naming_the_task(eps: float, bad: float) -> None:
    refuse_check(lambda: ScaleInvariant(eps=eps), bad, "ScaleInvariant takes log")


def test_zero_loss_with_eps_and_overflow() -> None:
    out = ScaleInvariant().objectives(torch.tensor([0.0, 1.0]), LossContext())
    assert out.domain is not None and out.domain[0].tolist() == [True, True]
    torch.testing.assert_close(out.weights[0], torch.tensor(1e8))
    # eps=0 in float32: c/L = 1e10/1e-30 overflows, refused
    si = ScaleInvariant(eps=0.0, weights=[1e10, 1.0])
    out = si.objectives(torch.tensor([1e-30, 1.0]), LossContext())
    assert out.domain is not None and out.domain[0].tolist() == [False, True]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="eps"):
        ScaleInvariant(eps=-1.0)
    with pytest.raises(ValueError, match="weights has 2 entries"):
        ScaleInvariant(3, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite and ≥ 0"):
        ScaleInvariant(weights=[1.0, -2.0])
    with pytest.raises(ValueError, match="2 weights, got 3"):
        ScaleInvariant(weights=[1.0, 2.0])(torch.ones(3))
