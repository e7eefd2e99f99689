"""VisATB: the official weighting script re-run (YanqiDai/VisATB @
409e8ebe5bf41b01f0c1a4d3558832b87299251a, weighting_visatb.py, its published LLaVA-v1 vectors),
a float64 reference in plain Python, the contribution matrix helper, missing tasks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mtlbal
from mtlbal.weighting import VisATB
from mtlbal.weighting.visatb import contributions, visatb_weights

OUT = [0.7601, 0.3496, 1.6727]
IN = [1.2890, 0.9779, 0.5156]
DIFF = [0.8636, 0.3534, 0.9593]


def test_official_script_core() -> None:
    t = 0.5
    out_c, in_c, d = torch.tensor(OUT), torch.tensor(IN), torch.tensor(DIFF)
    out_w = out_c.size(0) * F.softmax(out_c / t, dim=0)
    in_w = in_c.size(0) * F.softmax(-in_c / t, dim=0)
    d_w = d.size(0) * F.softmax((1 - d) / t, dim=0)
    final = ((out_w + in_w) / 2 + d_w) / 2
    torch.testing.assert_close(visatb_weights(out_c, in_c, d), final)


def test_float64_reference() -> None:
    def sm(x: list[float]) -> list[float]:
        e = [math.exp(v) for v in x]
        return [3 * v / sum(e) for v in e]

    wo, wi = sm([v / 0.5 for v in OUT]), sm([-v / 0.5 for v in IN])
    wd = sm([(1 - v) / 0.5 for v in DIFF])
    ref = [((a + b) / 2 + c) / 2 for a, b, c in zip(wo, wi, wd)]
    w = VisATB(OUT, IN, DIFF).double().weights
    torch.testing.assert_close(w, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=0)
    wm = VisATB(OUT, IN, DIFF, reduction="mean").double().weights
    torch.testing.assert_close(wm * 3, w)


def test_contributions_from_matrix() -> None:
    c = torch.tensor([[9.0, 1.0, 2.0], [3.0, 9.0, 5.0], [0.0, 4.0, 9.0]])
    out_c, in_c = contributions(c)
    torch.testing.assert_close(out_c, torch.tensor([1.5, 4.0, 2.0]))
    torch.testing.assert_close(in_c, torch.tensor([1.5, 2.5, 3.5]))
    with pytest.raises(ValueError, match="square"):
        contributions(torch.ones(2, 3))


def test_balancer_and_missing_tasks() -> None:
    torch.manual_seed(0)
    trunk = torch.nn.Linear(3, 4)
    heads = torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in range(3))
    v = VisATB(OUT, IN, DIFF)
    bal = mtlbal.Balancer(trunk, weighting=v, tasks=("a", "b", "c"))
    z = trunk(torch.randn(5, 3))
    losses = {n: heads[i](z).pow(2).mean() for i, n in enumerate("abc")}
    info = bal.backward(losses)
    torch.testing.assert_close(info.weights, v.weights.float())
    z = trunk(torch.randn(5, 3))
    info = bal.backward({"a": heads[0](z).pow(2).mean(), "c": heads[2](z).pow(2).mean()})
    torch.testing.assert_close(info.weights, v.weights[[0, 2]].float())
    with pytest.raises(ValueError, match="one value per task"):
        VisATB([1.0], [1.0, 2.0], [0.5])
