"""Shared inputs for the loss-level method tests (GLS, SI, UW-SO, IMTL-L, STCH): seeded loss
vectors (moderate, tiny, huge, equal, mixed), a high-precision reference arithmetic, and a tiny
model whose losses take prescribed values."""

from __future__ import annotations

import decimal
from collections.abc import Callable, Sequence
from decimal import Decimal

import torch
from torch import Tensor, nn

import mtlbal
from mtlbal.weighting import LossContext, LossWeighting

F64 = torch.float64
MS = (2, 3, 5, 16)
SEEDS = (0, 1, 2)
KINDS = ("moderate", "tiny", "huge", "equal", "mixed")

decimal.getcontext().prec = 60


def losses_of(kind: str, m: int, seed: int) -> Tensor:
    """A positive float64 loss vector ``[m]`` of the given kind."""
    g = torch.Generator().manual_seed(1000 * m + seed)
    u = torch.rand(m, generator=g, dtype=F64)
    if kind == "moderate":
        return 0.1 + 10 * u
    if kind == "tiny":
        return 10 ** (-30 + 10 * u)  # 1e-30 … 1e-20
    if kind == "huge":
        return 10 ** (20 + 10 * u)  # 1e20 … 1e30
    if kind == "equal":
        return torch.full((m,), 0.1 + 10 * float(u[0]), dtype=F64)
    if kind == "mixed":
        return 10 ** (-8 + 16 * u)  # eight orders of magnitude either side of 1
    raise ValueError(kind)


def D(x: float) -> Decimal:
    return Decimal(repr(float(x)))


def dexp(x: Decimal) -> Decimal:
    return x.exp()


def dlog(x: Decimal) -> Decimal:
    return x.ln()


def to_tensor(values: Sequence[Decimal]) -> Tensor:
    return torch.tensor([float(v) for v in values], dtype=F64)


def grad_wrt_losses(w: LossWeighting, losses: Tensor) -> tuple[Tensor, Tensor]:
    """``(∂(Σℓ + aux)/∂L, reported weights)`` of a weighting at ``losses`` (float64 leaves)."""
    L = losses.clone().requires_grad_(True)
    out = w.objectives(L, LossContext())
    total = out.objectives.sum() if out.aux is None else out.objectives.sum() + out.aux
    (g,) = torch.autograd.grad(total, L)
    return g, out.weights


class Net(nn.Module):
    """A trunk and ``m`` heads in float64; ``losses()`` are positive, differently scaled, and
    ``losses(values)`` takes prescribed values (each scaled to the given number)."""

    def __init__(self, m: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh()).to(F64)
        self.heads = nn.ModuleList(nn.Linear(6, 1).to(F64) for _ in range(m))
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(8, 4, generator=g, dtype=F64)
        self.y = torch.randn(8, m, generator=g, dtype=F64)

    def loss_list(self) -> list[Tensor]:
        z = self.trunk(self.x)
        return [
            (t + 1.0) * (h(z).squeeze(-1) - self.y[:, t]).pow(2).mean() + 0.05
            for t, h in enumerate(self.heads)
        ]

    def losses(self) -> dict[str, Tensor]:
        return {f"t{i}": v for i, v in enumerate(self.loss_list())}

    def trunk_grads(self) -> list[Tensor]:
        return [p.grad.detach().clone() for p in self.trunk.parameters()]  # type: ignore[union-attr]

    def zero(self) -> None:
        for p in self.parameters():
            p.grad = None


def balancer_vs_reference(
    make: Callable[[], LossWeighting],
    reference_total: Callable[[Tensor], Tensor],
    m: int = 3,
    seed: int = 0,
) -> None:
    """One Balancer step: the trunk and head gradients equal those of ``reference_total(L)``
    (a scalar built from the stacked losses by the test), in float64."""
    net = Net(m, seed)
    bal = mtlbal.Balancer(net.trunk, weighting=make().double())
    net.zero()
    bal.backward(net.losses())
    got = [p.grad.detach().clone() for p in net.parameters()]  # type: ignore[union-attr]
    net.zero()
    reference_total(torch.stack(net.loss_list())).backward()
    for a, b in zip(got, net.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-12, atol=1e-14)


def refuse_check(make: Callable[[], LossWeighting], bad: float, pattern: str) -> None:
    """A Balancer with ``make()`` refuses a step whose task ``'depth'`` has loss ``bad``,
    naming it, and writes no gradient."""
    lin = nn.Linear(3, 2).double()
    bal = mtlbal.Balancer(lin, weighting=make().double())
    y = lin(torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0)))
    losses = {"seg": y[:, 0].pow(2).mean() + 0.5, "depth": y[:, 1].sum() * 0 + bad}
    import pytest

    with pytest.raises(ValueError, match=pattern + r".*'depth' \(L = "):
        bal.backward(losses)
    assert bal.step_count == 0
    assert all(p.grad is None for p in lin.parameters())
    assert all(p.grad is None for p in bal.parameters())
