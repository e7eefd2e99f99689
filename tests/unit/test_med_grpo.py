"""MedGRPO normalisation: running medians against Python's statistics.median, the logistic map of
each task's median to 1/2, the loss weights c / median, absent tasks in a reward batch, and the
Balancer path (the weights follow the committed steps' losses)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import mtlbal
from mtlbal.weighting import MedGRPO


def test_reward_normalisation_reference() -> None:
    g = torch.Generator().manual_seed(0)
    med = MedGRPO(3, window=3, steepness=7.0).double()
    history: list[list[float]] = [[], [], []]
    for step in range(6):
        tasks = torch.randint(0, 3, (12,), generator=g)
        if step == 2:
            tasks = tasks.clamp(max=1)  # task 2 absent from this batch
        scale = torch.tensor([1.0, 0.2, 0.05], dtype=torch.float64)[tasks]
        rewards = scale * torch.rand(12, generator=g, dtype=torch.float64)
        out = med.normalize_rewards(rewards, tasks)
        for k in range(3):
            sel = [float(r) for r, t in zip(rewards, tasks) if int(t) == k]
            if sel:
                history[k] = (history[k] + [statistics.median(sel)])[-3:]
        for r, t, o in zip(rewards.tolist(), tasks.tolist(), out.tolist()):
            m = statistics.median(history[t])
            assert o == pytest.approx(1 / (1 + math.exp(-7.0 * (r - m))), abs=1e-12)


def test_median_maps_to_one_half_for_every_scale() -> None:
    med = MedGRPO(2, window=5)
    rewards = torch.tensor([0.9, 0.5, 0.1, 0.02, 0.01, 0.0])
    out = med.normalize_rewards(rewards, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert float(out[1]) == 0.5 and float(out[4]) == 0.5
    assert float(out[0]) > 0.5 > float(out[2]) and float(out[3]) > 0.5 > float(out[5])
    with pytest.raises(ValueError, match="without any observed reward"):
        MedGRPO(2).normalize_rewards(torch.ones(2), torch.zeros(2, dtype=torch.long), update=False)
    with pytest.raises(ValueError, match="task indices"):
        med.normalize_rewards(torch.ones(1), torch.tensor([2]))


def test_loss_weights_follow_the_running_median() -> None:
    torch.manual_seed(0)
    trunk = torch.nn.Linear(3, 4)
    heads = torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in range(2))
    params = [*trunk.parameters(), *heads.parameters()]
    med = MedGRPO(2, window=2, target=2.0)
    opt = mtlbal.wrap(torch.optim.SGD(params, lr=0.01), mtlbal.Balancer(trunk, weighting=med))
    seen: list[list[float]] = []
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(8, 3, generator=g)
        z = trunk(x)
        losses = {"a": heads[0](z).pow(2).mean() + 0.3, "b": 50 * heads[1](z).pow(2).mean() + 9}
        values = [float(v.detach()) for v in losses.values()]
        ref = values if not seen else [statistics.median(c) for c in zip(*seen[-2:])]
        opt.zero_grad()
        info = opt.backward(losses)
        opt.step()
        expected = torch.tensor([2.0 / r for r in ref])
        torch.testing.assert_close(info.weights, expected, rtol=1e-5, atol=0)
        seen.append(values)
    # the weighted losses sit near the common value 2 whatever the scale of the task
    assert all(1.0 < float(w * v) < 3.0 for w, v in zip(info.weights, seen[-1]))


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="window"):
        MedGRPO(2, window=0)
