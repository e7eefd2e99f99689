"""Uncertainty weighting against the paper's objective, float64, written from the equations."""

from __future__ import annotations

import pytest
import torch

import mtlbal
from conftest import make_problem
from mtlbal.weighting import UncertaintyWeighting


@pytest.mark.parametrize(
    ("form", "types", "a", "b"),
    [
        ("kendall", ["regression", "classification", "regression"], [0.5, 1.0, 0.5], 0.5),
        ("simple", None, [1.0, 1.0, 1.0], 1.0),
        ("libmtl", None, [0.5, 0.5, 0.5], 0.5),
    ],
)
def test_gradients_match_the_paper_objective(form, types, a, b) -> None:  # type: ignore[no-untyped-def]
    p = make_problem(3, dtype=torch.float64)
    uw = UncertaintyWeighting(3, form=form, task_types=types, init_log_var=0.3)
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.3, -0.2, 0.7]))
    bal = mtlbal.Balancer(p.trunk, weighting=uw)
    p.zero_grad()
    info = bal.backward(p.losses())
    got_trunk = [q.grad.clone() for q in p.trunk.parameters()]
    got_s = uw.log_vars.grad.clone()

    # reference: total = Σ a_t exp(−s_t) L_t + b s_t, differentiated by hand
    s = torch.tensor([0.3, -0.2, 0.7], dtype=torch.float64)
    at = torch.tensor(a, dtype=torch.float64)
    p.zero_grad()
    losses = list(p.losses().values())
    L = torch.stack([v.detach() for v in losses])
    expected_s = -at * torch.exp(-s) * L + b
    torch.testing.assert_close(got_s.double(), expected_s)
    total = sum(at[i] * torch.exp(-s[i]) * losses[i] for i in range(3))
    total.backward()
    for g, q in zip(got_trunk, p.trunk.parameters()):
        torch.testing.assert_close(g, q.grad)
    torch.testing.assert_close(info.weights, at * torch.exp(-s))


def test_equilibrium_weight_is_b_over_loss() -> None:
    # minimising a e^{-s} L + b s over s gives weight a e^{-s*} = b / L for every form
    for form, b in (("kendall", 0.5), ("simple", 1.0)):
        uw = UncertaintyWeighting(2, form=form)
        L = torch.tensor([0.2, 5.0])
        opt = torch.optim.SGD(uw.parameters(), lr=0.05)
        for _ in range(4000):
            opt.zero_grad()
            wl = uw.objectives(L, mtlbal.weighting.LossContext())
            (wl.objectives.sum() + wl.aux).backward()
            opt.step()
        torch.testing.assert_close(uw(L), b / L, rtol=1e-3, atol=1e-4)


def test_validation() -> None:
    with pytest.raises(ValueError, match="form"):
        UncertaintyWeighting(2, form="other")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task_types"):
        UncertaintyWeighting(2, task_types=["regression"])
    with pytest.raises(ValueError, match="classification"):
        UncertaintyWeighting(1, task_types=["ranking"])  # type: ignore[list-item]


def test_reset_restores_initial_log_vars() -> None:
    uw = UncertaintyWeighting(2, init_log_var=-0.5)
    with torch.no_grad():
        uw.log_vars.add_(1.0)
    uw.reset()
    assert torch.equal(uw.log_vars.detach(), torch.full((2,), -0.5))
