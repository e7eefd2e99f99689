"""GradNorm against the paper's algorithm, float64, written from the equations."""

from __future__ import annotations

import pytest
import torch

import mtlbal
from conftest import make_problem
from mtlbal.weighting import GradNorm


def _layer_norms(p, layer):  # type: ignore[no-untyped-def]
    losses = list(p.losses().values())
    out = []
    for v in losses:
        gs = torch.autograd.grad(v, list(layer.parameters()), retain_graph=True)
        out.append(torch.sqrt(sum(g.pow(2).sum() for g in gs)))
    return torch.stack(out), torch.stack([v.detach() for v in losses])


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_two_steps_match_the_paper(alpha: float) -> None:
    m, lr = 3, 0.1
    p = make_problem(m, dtype=torch.float64)
    gn = GradNorm(m, alpha=alpha)
    bal = mtlbal.Balancer(p.trunk, weighting=gn)
    # default layer W: the last module of the shared part with parameters (trunk[2])
    layer = p.trunk[2]
    assert [id(q) for q in gn.grad_norm_params()] == [id(q) for q in layer.parameters()]
    w_opt = torch.optim.SGD([gn.weights], lr=lr)
    net_opt = torch.optim.SGD(p.params(), lr=0.05)

    w = torch.ones(m, dtype=torch.float64)
    L0 = None
    for _step in range(2):
        # ---- reference (paper): renormalise w to sum m, G_t = w_t ‖∇_W L_t‖, target Ḡ r^α
        w = m * w / w.sum()
        n, L = _layer_norms(p, layer)
        L0 = L.clone() if L0 is None else L0
        G = w * n
        ratio = L / L0
        r = ratio / ratio.mean()
        target = G.mean() * r.pow(alpha)
        grad_w = torch.sign(G - target) * n
        # network gradient: Σ w_t L_t with w detached
        p.zero_grad()
        sum(w[i] * v for i, v in enumerate(p.losses().values())).backward()
        expected_net = [q.grad.clone() for q in p.trunk.parameters()]
        # ---- library
        p.zero_grad()
        w_opt.zero_grad()
        info = bal.backward(p.losses())
        torch.testing.assert_close(info.weights, w)
        torch.testing.assert_close(gn.weights.grad.double(), grad_w)
        for a, q in zip(expected_net, p.trunk.parameters()):
            torch.testing.assert_close(q.grad, a)
        w_opt.step()
        net_opt.step()
        w = w - lr * grad_w
    torch.testing.assert_close(gn.initial_losses.double(), L0)


def test_explicit_layer_and_validation() -> None:
    p = make_problem(2)
    gn = GradNorm(2, layer=p.trunk[0])
    mtlbal.Balancer(p.trunk, weighting=gn)
    assert [id(q) for q in gn.grad_norm_params()] == [id(q) for q in p.trunk[0].parameters()]
    with pytest.raises(ValueError, match="num_tasks"):
        GradNorm(0)
    with pytest.raises(ValueError, match="no parameter"):
        GradNorm(2, layer=torch.nn.ReLU())


def test_weights_stay_positive_and_sum_to_m() -> None:
    p = make_problem(3)
    gn = GradNorm(3)
    opt = mtlbal.wrap(
        torch.optim.SGD(p.params(), lr=0.01),
        mtlbal.Balancer(p.trunk, weighting=gn),
        balancer_lr=5.0,  # large steps push raw weights negative: the floor must hold
    )
    for _ in range(10):
        opt.zero_grad()
        info = opt.backward(p.losses())
        opt.step()
        assert (info.weights > 0).all()
        torch.testing.assert_close(info.weights.sum(), torch.tensor(3.0))
