"""Shared by the PCD, MoDo and SDMGrad tests: the Jacobian families of the parity tests, an
independent simplex projection, and a Balancer run over independent samples."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import mtlbal
from mtlbal.aggregation import stack_samples

F64 = torch.float64
KINDS = ["full", "rank", "zero", "collinear"]
MS = [2, 3, 5, 8, 16]


def jacobian(kind: str, m: int, n: int, gen: torch.Generator) -> Tensor:
    """A random ``[m, n]`` Jacobian: full rank, rank ``⌈m/2⌉``, zero, or rows that are
    multiples (of both signs) of one vector."""
    if kind == "full":
        return torch.randn(m, n, dtype=F64, generator=gen)
    if kind == "rank":
        r = max(1, (m + 1) // 2)
        a = torch.randn(m, r, dtype=F64, generator=gen)
        return a @ torch.randn(r, n, dtype=F64, generator=gen)
    if kind == "zero":
        return torch.zeros(m, n, dtype=F64)
    if kind == "collinear":
        v = torch.randn(1, n, dtype=F64, generator=gen)
        return torch.randn(m, 1, dtype=F64, generator=gen) * v
    raise ValueError(kind)


def simplex_bisection(y: np.ndarray) -> np.ndarray:
    """Projection onto the simplex by bisection on the threshold θ of ``max(y − θ, 0)``, whose
    sum decreases in θ (a different algorithm from the sort-based one under test)."""
    lo, hi = float(y.min()) - 1.0, float(y.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(y - mid, 0.0).sum() > 1.0:
            lo = mid
        else:
            hi = mid
    return np.maximum(y - 0.5 * (lo + hi), 0.0)


class Net(nn.Module):
    def __init__(self, m: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh()).to(F64)
        self.heads = nn.ModuleList([nn.Linear(6, 1).to(F64) for _ in range(m)])

    def losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        z = self.trunk(x)
        return {
            f"t{i}": (h(z).squeeze(-1) - y[:, i]).pow(2).mean() * (i + 1)
            for i, h in enumerate(self.heads)
        }


def batches(m: int, steps: int, samples: int, seed: int = 1) -> list[list[tuple[Tensor, Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            (
                torch.randn(6, 4, generator=gen, dtype=F64),
                torch.randn(6, m, generator=gen, dtype=F64),
            )
            for _ in range(samples)
        ]
        for _ in range(steps)
    ]


def run(
    make: Callable[[], Any],
    m: int,
    data: list[list[tuple[Tensor, Tensor]]],
    *,
    net: Net | None = None,
    state: dict[str, Any] | None = None,
) -> tuple[Net, mtlbal.Balancer, list[Tensor]]:
    """SGD over ``data`` (one list of samples per step) with ``aggregator=make()``; the shared
    ``.grad`` of every step."""
    net = net if net is not None else Net(m)
    bal = mtlbal.Balancer(net.trunk, aggregator=make())
    if state is not None:
        bal.load_state_dict(copy.deepcopy(state))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    grads = []
    for step in data:
        opt.zero_grad()
        per = [net.losses(x, y) for x, y in step]
        bal.backward(per[0] if len(per) == 1 else stack_samples(*per))
        grads.append(torch.cat([p.grad.flatten() for p in net.trunk.parameters()]).clone())
        opt.step()
    return net, bal, grads


def check_resume_samples(make: Callable[[], Any], m: int, samples: int, k: int = 3) -> None:
    """k steps, save, restore into fresh objects, continue: equal to the uninterrupted run."""
    data = batches(m, 6, samples)
    _, _, full = run(make, m, data)
    net, bal, first = run(make, m, data[:k])
    fresh = Net(m)
    fresh.load_state_dict(net.state_dict())
    _, _, rest = run(make, m, data[k:], net=fresh, state=bal.state_dict())
    for a, b in zip(full, first + rest):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def per_sample_jacobians(net: Net, step: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """The trunk Jacobian ``[m, n]`` of every sample, by plain autograd (one task at a time)."""
    out = []
    params = list(net.trunk.parameters())
    for x, y in step:
        rows = []
        for loss in net.losses(x, y).values():
            g = torch.autograd.grad(loss, params, retain_graph=True)
            rows.append(torch.cat([t.flatten() for t in g]))
        out.append(torch.stack(rows))
    return out
