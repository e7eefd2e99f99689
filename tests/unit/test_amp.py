"""Mixed precision: GradScaler-scaled gradients with strategies seeing unscaled losses."""

from __future__ import annotations

import pytest
import torch

import mtlbal
from conftest import make_problem
from mtlbal.aggregation import MGDA, PCGrad
from mtlbal.weighting import GradNorm, UncertaintyWeighting


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"weighting": "uw"},
        {"weighting": "gn"},
        {"aggregator": "mgda"},
        {"aggregator": "pcgrad", "at": "cut"},
    ],
)
def test_scaled_gradients_are_scale_times_unscaled(kwargs: dict[str, str]) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def make(p):  # type: ignore[no-untyped-def]
        w = {"uw": UncertaintyWeighting(3), "gn": GradNorm(3), None: None}[kwargs.get("weighting")]
        a = {"mgda": MGDA(), "pcgrad": PCGrad(seed=0), None: None}[kwargs.get("aggregator")]
        at = p.trunk if kwargs.get("at") == "cut" else "params"
        return mtlbal.Balancer(p.trunk, weighting=w, aggregator=a, at=at)

    p = make_problem(3, dtype=torch.float64)
    make(p).backward(p.losses())
    ref = p.grads()
    p2 = make_problem(3, dtype=torch.float64)
    info = make(p2).backward(p2.losses(), scaler=scaler)
    for a, b in zip(ref, p2.grads()):
        torch.testing.assert_close(b, 1024.0 * a, rtol=1e-5, atol=1e-9)  # PCGrad: eps
    # the strategies saw the unscaled losses
    torch.testing.assert_close(info.losses, torch.stack([v.detach() for v in p.losses().values()]))


def test_wrapped_optimizer_with_scaler_step() -> None:
    p = make_problem(2)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    opt = mtlbal.wrap(torch.optim.SGD(p.params(), lr=0.1), mtlbal.Balancer(p.trunk))
    ref = make_problem(2)
    ref_opt = torch.optim.SGD(ref.params(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        opt.backward(p.losses(), scaler=scaler)
        scaler.step(opt)
        scaler.update()
        ref_opt.zero_grad()
        sum(ref.losses().values()).backward()
        ref_opt.step()
    for a, b in zip(p.params(), ref.params()):
        torch.testing.assert_close(a, b)
