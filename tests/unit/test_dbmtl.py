"""DB-MTL (gradient part): the paper's update in float64 and parity with LibMTL, the authors'
implementation (median-research-group/LibMTL @ 7b0f56a7ee61f9fc17738dd221bb017d04999832,
LibMTL/weighting/DB_MTL.py); the full method with a log-loss weighting through the Balancer."""

from __future__ import annotations

import pytest
import torch

import mtlbal
from mtlbal.aggregation import DBMTL
from mtlbal.weighting import LossContext, LossWeighting, WeightedLosses

from ._jacobians import F64, KINDS, MS, jacobian
from ._methods_helpers import TinyNet, check_resume, data


def _paper(jacs, beta: float, sigma: float, eps: float = 1e-8):
    # ĝ_t ← β_k ĝ_t + (1 − β_k) g_t; d = Σ_t (max_s ‖ĝ_s‖ / ‖ĝ_t‖) ĝ_t
    m, n = jacs[0].shape
    buf = torch.zeros(m, n, dtype=F64)
    out = []
    for k, jac in enumerate(jacs, start=1):
        bk = beta / k**sigma
        buf = bk * buf + (1 - bk) * jac
        norms = [float(buf[t].norm()) for t in range(m)]
        top = max(norms)
        out.append(sum(top / (norms[t] + eps) * buf[t] for t in range(m)))
    return out


def _libmtl(jacs, beta: float, sigma: float):
    # DB_MTL.backward after the log-loss gradients: grad_buffer = g + β/step^σ (buffer − g),
    # alpha = max‖·‖ / (‖·‖ + 1e-8), new_grads = Σ alpha_i buffer_i
    buffer = torch.zeros_like(jacs[0])
    out = []
    for step, batch_grads in enumerate(jacs, start=1):
        buffer = batch_grads + (beta / step**sigma) * (buffer - batch_grads)
        u = buffer.norm(dim=-1)
        alpha = u.max() / (u + 1e-8)
        out.append(sum(alpha[i] * buffer[i] for i in range(len(alpha))))
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", MS)
def test_paper_and_libmtl(kind: str, m: int) -> None:
    jacs = [jacobian(kind, m, seed=30 + k) for k in range(4)]
    for beta, sigma in [(0.9, 0.0), (0.8, 0.5)]:
        agg = DBMTL(beta=beta, beta_sigma=sigma)
        for jac, p, lib in zip(jacs, _paper(jacs, beta, sigma), _libmtl(jacs, beta, sigma)):
            d = agg(jac)
            torch.testing.assert_close(d, p, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(d, lib, rtol=1e-12, atol=1e-14)


def test_every_task_enters_with_the_largest_norm() -> None:
    jac = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.1]], dtype=F64)
    d = DBMTL(beta=0.0, eps=0.0)(jac)
    torch.testing.assert_close(d, torch.tensor([3.0, 3.0, 3.0], dtype=F64))
    torch.testing.assert_close(DBMTL(beta=0.0, eps=0.0, reduction="mean")(jac), d / 3)


def test_homogeneity_and_state() -> None:
    a, b = DBMTL(eps=0.0), DBMTL(eps=0.0)
    assert a.homogeneity == 1 and DBMTL().homogeneity is None
    for k in range(3):
        jac = jacobian("full", 3, seed=40 + k)
        torch.testing.assert_close(b(1e-5 * jac), 1e-5 * a(jac), rtol=1e-12, atol=0)
    assert a.buffer is not None and a.buffer.shape == (3, 24) and int(a.steps) == 3
    with pytest.raises(ValueError, match="must not change"):
        a(jacobian("full", 2, seed=0))


class _Log(LossWeighting):
    """log(L + 1e-8), the loss part of DB-MTL (a stand-in for mtlbal.weighting's)."""

    def current_weights(self, losses: torch.Tensor) -> torch.Tensor:
        return (1.0 / (losses + 1e-8)).detach()

    def objectives(self, losses: torch.Tensor, ctx: LossContext) -> WeightedLosses:
        return WeightedLosses(torch.log(losses + 1e-8), self.current_weights(losses))


def test_full_method_through_the_balancer() -> None:
    # Balancer(weighting=log transform, aggregator=DBMTL()) == LibMTL's DB_MTL on the trunk
    m = 3
    batches = data(m, 4)
    net = TinyNet(m)
    ref = TinyNet(m)
    bal = mtlbal.Balancer(net.trunk, weighting=_Log(), aggregator=DBMTL())
    trunk = list(ref.trunk.parameters())
    buffer = None
    for x, y in batches:
        for p in [*net.parameters(), *ref.parameters()]:
            p.grad = None
        bal.backward(net.losses(x, y))
        got = torch.cat([p.grad.flatten() for p in net.trunk.parameters()])
        losses = torch.stack(list(ref.losses(x, y).values()))
        rows = []
        for loss in losses:
            grads = torch.autograd.grad(torch.log(loss + 1e-8), trunk, retain_graph=True)
            rows.append(torch.cat([g.flatten() for g in grads]))
        g = torch.stack(rows).detach()
        buffer = torch.zeros_like(g) if buffer is None else buffer
        buffer = g + 0.9 * (buffer - g)
        u = buffer.norm(dim=-1)
        expect = ((u.max() / (u + 1e-8))[:, None] * buffer).sum(0)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7)
        with torch.no_grad():
            for p, q in zip(net.parameters(), ref.parameters()):
                p -= 0.05 * p.grad
                q.copy_(p)


def test_resume_default_configuration() -> None:
    check_resume(lambda: {"aggregator": DBMTL()})
