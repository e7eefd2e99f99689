"""Test Jacobians for the parity tests: full-rank, rank-deficient, zero and collinear."""

from __future__ import annotations

import torch

F64 = torch.float64
KINDS = ("full", "rank_deficient", "zero", "collinear")
MS = (2, 3, 5, 8, 16)


def jacobian(kind: str, m: int, seed: int, n: int | None = None) -> torch.Tensor:
    """An ``[m, n]`` float64 Jacobian of the given kind (``n = m + 3`` by default)."""
    g = torch.Generator().manual_seed(1000 * m + seed)
    n = m + 3 if n is None else n
    if kind == "full":
        return torch.randn(m, n, generator=g, dtype=F64)
    if kind == "rank_deficient":
        r = max(1, m // 2)
        return torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)
    if kind == "zero":
        return torch.zeros(m, n, dtype=F64)
    if kind == "collinear":  # multiples of one vector, of both signs
        return torch.randn(m, 1, generator=g, dtype=F64) * torch.randn(1, n, generator=g, dtype=F64)
    raise ValueError(kind)


def cases(seeds: int = 2, ms: tuple[int, ...] = MS, min_m: int = 2) -> list[tuple[str, int, int]]:
    return [(k, m, s) for k in KINDS for m in ms if m >= min_m for s in range(seeds)]
