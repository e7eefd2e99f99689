"""Seeded Jacobian families for the parity tests: full rank, rank-deficient, zero, collinear."""

from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64
KINDS = ("full", "rank_deficient", "zero", "collinear")
MS = (2, 3, 5, 9, 16)


def jacobian(kind: str, m: int, n: int = 24, seed: int = 0, *, same_side: bool = False) -> Tensor:
    """A float64 ``[m, n]`` Jacobian of the given kind.

    ``same_side=True`` keeps every row in one open half-space (positive combinations of a few
    directions, positive multiples of one): no non-negative combination of the rows vanishes,
    the condition under which FairGrad's system has a solution.
    """
    gen = torch.Generator().manual_seed(seed * 1000 + m)
    if kind == "full":
        return torch.randn(m, n, generator=gen, dtype=F64)
    if kind == "zero":
        return torch.zeros(m, n, dtype=F64)
    if kind == "rank_deficient":
        r = max(1, m // 2)
        a = torch.randn(m, r, generator=gen, dtype=F64)
        if same_side:
            a = a.abs() + 0.1
        return a @ torch.randn(r, n, generator=gen, dtype=F64)
    if kind == "collinear":
        c = torch.rand(m, 1, generator=gen, dtype=F64) + 0.2
        if not same_side:
            c[::2] *= -1
        return c * torch.randn(1, n, generator=gen, dtype=F64)
    raise ValueError(kind)
