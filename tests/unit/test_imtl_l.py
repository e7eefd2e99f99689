"""IMTLL (IMTL-L): the gradients of Σ_t e^{s_t}L_t − s_t in L and s from a 60-digit reference,
TorchJD 0.18's ``IMTLL`` and LibMTL's IMTL loss transform (median-research-group/LibMTL @4336804,
re-implemented: ``loss_scale.exp()*losses - loss_scale``), the equilibrium e^{s}L = 1, the
Balancer (parameters, IMTL-L + IMTL-G = LibMTL's IMTL), the clamp and the domain."""

from __future__ import annotations

import pytest
import torch
from torchjd.scalarization import IMTLL as TorchJDIMTLL

import mtlbal
from mtlbal.aggregation import IMTLG
from mtlbal.functional import imtl_l_objectives
from mtlbal.weighting import IMTLL, LossContext

from ._loss_level_helpers import (
    F64,
    KINDS,
    MS,
    SEEDS,
    D,
    Net,
    grad_wrt_losses,
    losses_of,
    refuse_check,
    to_tensor,
)


def with_scales(m: int, s: torch.Tensor, **kw: object) -> IMTLL:
    imtl = IMTLL(m, **kw).double()  # type: ignore[arg-type]
    with torch.no_grad():
        imtl.log_scales.copy_(s)
    return imtl


def scales(m: int, seed: int) -> torch.Tensor:
    return torch.randn(m, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("seed", SEEDS)
def test_gradients_are_the_papers(kind: str, m: int, seed: int) -> None:
    L = losses_of(kind, m, seed)
    s = scales(m, seed)
    imtl = with_scales(m, s)
    g, w = grad_wrt_losses(imtl, L)
    ref_w = to_tensor([D(x).exp() for x in s.tolist()])
    ref_s = to_tensor([D(x).exp() * D(v) - 1 for x, v in zip(s.tolist(), L.tolist())])
    torch.testing.assert_close(g, ref_w, rtol=1e-14, atol=0)
    torch.testing.assert_close(w, ref_w, rtol=1e-14, atol=0)
    out = imtl.objectives(L, LossContext())
    assert out.aux is not None
    (gs,) = torch.autograd.grad(out.objectives.sum() + out.aux, imtl.log_scales)
    torch.testing.assert_close(gs, ref_s, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("m", MS)
def test_parity_with_torchjd_and_libmtl(m: int) -> None:
    for kind in KINDS:
        for seed in SEEDS:
            L = losses_of(kind, m, seed).requires_grad_(True)
            s = scales(m, seed)
            theirs = TorchJDIMTLL(m).double()
            with torch.no_grad():
                theirs.log_scale.copy_(s)
            val = theirs(L)
            gl, gs = torch.autograd.grad(val, [L, theirs.log_scale])
            ours = with_scales(m, s)
            out = ours.objectives(L, LossContext())
            total = out.objectives.sum() + out.aux  # type: ignore[operator]
            ol, os_ = torch.autograd.grad(total, [L, ours.log_scales])
            torch.testing.assert_close(total, val, rtol=1e-14, atol=1e-14)
            torch.testing.assert_close(ol, gl, rtol=0, atol=0)
            torch.testing.assert_close(os_, gs, rtol=1e-14, atol=1e-14)
            # LibMTL's IMTL: losses = self.loss_scale.exp()*losses - self.loss_scale (per task)
            lib = s.exp() * L - s
            torch.testing.assert_close(out.objectives - s, lib, rtol=1e-15, atol=1e-15)


def test_balancer_gradients_and_parameters() -> None:
    net = Net(3)
    s = torch.tensor([0.3, -0.2, 0.7], dtype=F64)
    imtl = with_scales(3, s)
    bal = mtlbal.Balancer(net.trunk, weighting=imtl)
    assert list(bal.parameters()) == [imtl.log_scales]
    info = bal.backward(net.losses())
    got = [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]
    got_s = imtl.log_scales.grad.clone()  # type: ignore[union-attr]
    net.zero()
    L = torch.stack(net.loss_list())
    (s.exp() * L - s).sum().backward()
    for a, p in zip(got, net.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_s, s.exp() * L.detach() - 1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(info.weights, s.exp())


def test_with_imtlg_the_aggregator_sees_the_scaled_losses() -> None:
    # LibMTL's IMTL = IMTL-L's e^{s}L − s, then IMTL-G on the gradients of those terms
    net = Net(3)
    s = torch.tensor([0.3, -0.2, 0.7], dtype=F64)
    bal = mtlbal.Balancer(net.trunk, weighting=with_scales(3, s), aggregator=IMTLG())
    info = bal.backward(net.losses())
    shared = list(net.trunk.parameters())
    rows = []
    for t, v in enumerate(net.loss_list()):
        gs = torch.autograd.grad(s[t].exp() * v - s[t], shared, retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in gs]))
    J = torch.stack(rows)
    assert info.gramian is not None
    torch.testing.assert_close(info.gramian, J @ J.T, rtol=1e-12, atol=1e-15)


def test_equilibrium_scaled_losses_are_one() -> None:
    imtl = IMTLL(3).double()
    L = torch.tensor([0.2, 1.0, 5.0], dtype=F64)
    for _ in range(300):  # gradient descent on s alone, by hand
        out = imtl.objectives(L, LossContext())
        (g,) = torch.autograd.grad(out.objectives.sum() + out.aux, imtl.log_scales)  # type: ignore[operator]
        with torch.no_grad():
            imtl.log_scales -= 0.3 * g
    torch.testing.assert_close(imtl(L) * L, torch.ones(3, dtype=F64), rtol=1e-6, atol=0)


def test_clamp_and_reset() -> None:
    imtl = with_scales(2, torch.tensor([12.0, 0.0], dtype=F64))
    L = torch.tensor([1.0, 2.0], dtype=F64)
    torch.testing.assert_close(imtl(L), torch.tensor([10.0, 0.0], dtype=F64).exp())
    out = imtl.objectives(L, LossContext())
    (gs,) = torch.autograd.grad(out.objectives.sum() + out.aux, imtl.log_scales)  # type: ignore[operator]
    assert gs.tolist() == [0.0, 1.0]  # beyond the clamp no gradient; e^0·2 − 1 = 1
    free = with_scales(2, torch.tensor([12.0, 0.0], dtype=F64), max_log_scale=None)
    torch.testing.assert_close(free(L)[0], torch.tensor(12.0, dtype=F64).exp())
    imtl.reset()
    assert imtl.log_scales.tolist() == [0.0, 0.0]
    torch.testing.assert_close(imtl_l_objectives(L, torch.zeros(2, dtype=F64)), L)


def test_negative_loss_is_refused_zero_is_not() -> None:
    refuse_check(lambda: IMTLL(2), -1.0, "IMTLL minimises")
    out = IMTLL(2).objectives(torch.tensor([0.0, 1.0]), LossContext())
    assert out.domain is not None and out.domain[0].tolist() == [True, True]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_tasks"):
        IMTLL(0)
    with pytest.raises(ValueError, match="above max_log_scale"):
        IMTLL(2, init_log_scale=11.0)
    with pytest.raises(ValueError, match="built for 3 tasks"):
        IMTLL(3)(torch.ones(2))
