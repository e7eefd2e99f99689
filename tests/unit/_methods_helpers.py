"""Small shared helpers for the method tests: a tiny two-head model and a resume check."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import mtlbal


class TinyNet(nn.Module):
    def __init__(self, m: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(m)])

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {
            f"t{i}": (h(z).squeeze(-1) - y[:, i]).pow(2).mean() * (i + 1)
            for i, h in enumerate(self.heads)
        }


def data(m: int, steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 4, generator=gen), torch.randn(8, m, generator=gen)) for _ in range(steps)
    ]


def train(
    make: Callable[[], dict[str, Any]],
    m: int,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    epoch_every: int = 0,
    after: Callable[[mtlbal.Balancer, TinyNet, tuple[torch.Tensor, torch.Tensor]], None]
    | None = None,
    net: TinyNet | None = None,
    state: dict[str, Any] | None = None,
    start: int = 0,
) -> tuple[TinyNet, mtlbal.Balancer, torch.optim.Optimizer, list[torch.Tensor]]:
    """SGD on ``batches`` with the Balancer built from ``make()``; returns the trunk grads."""
    net = net if net is not None else TinyNet(m)
    bal = mtlbal.Balancer(net.trunk, **make())
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    if state is not None:
        bal.load_state_dict(copy.deepcopy(state))
    grads = []
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        bal.backward(net.losses(x, y))
        grads.append(torch.cat([p.grad.flatten() for p in net.trunk.parameters()]).clone())
        opt.step()
        bal.after_step()
        if after is not None:
            after(bal, net, (x, y))
        if epoch_every and (start + i + 1) % epoch_every == 0:
            bal.epoch_end()
    return net, bal, opt, grads


def check_resume(
    make: Callable[[], dict[str, Any]],
    m: int = 3,
    steps: int = 8,
    k: int = 5,
    *,
    epoch_every: int = 0,
    after: Callable[[mtlbal.Balancer, TinyNet, tuple[torch.Tensor, torch.Tensor]], None]
    | None = None,
) -> None:
    """k steps, save, load into fresh objects, continue == the uninterrupted run."""
    batches = data(m, steps)
    _, _, _, full = train(make, m, batches, epoch_every=epoch_every, after=after)
    net, bal, _, first = train(make, m, batches[:k], epoch_every=epoch_every, after=after)
    state = copy.deepcopy(bal.state_dict())
    fresh = TinyNet(m)
    fresh.load_state_dict(net.state_dict())
    _, _, _, rest = train(
        make, m, batches[k:], epoch_every=epoch_every, after=after, net=fresh, state=state, start=k
    )
    for a, b in zip(full, first + rest):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
