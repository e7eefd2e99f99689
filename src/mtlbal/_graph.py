"""Walks of the autograd graph (no gradient is computed)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["reachable"]


def reachable(roots: Sequence[Tensor], stop: set[int]) -> tuple[list[Tensor], set[int]]:
    """Leaf tensors reached from ``roots`` (through ``grad_fn``), and which ids of ``stop`` (ids
    of leaf tensors or of graph nodes) were reached. The walk stops at leaves and at ``stop``."""
    leaves: dict[int, Tensor] = {}
    seen: set[int] = set()
    hit: set[int] = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    for r in roots:
        if r.grad_fn is None and r.requires_grad:
            leaves[id(r)] = r
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if id(fn) in stop:
            hit.add(id(fn))
            continue
        var = getattr(fn, "variable", None)
        if var is not None:
            leaves[id(var)] = var
            if id(var) in stop:
                hit.add(id(var))
            continue
        for nxt, _ in fn.next_functions:
            if nxt is not None and id(nxt) not in seen:
                stack.append(nxt)
    return list(leaves.values()), hit
