"""What the step needs from ``torch.distributed``: every decision is global.

Under a process group, each rank holds a shard of the batch. The Balancer makes the ranks agree
before any per-task collective runs (same task names, same count, one canonical order), takes the
finiteness verdict globally (all ranks raise, or all skip: none is left waiting in a collective),
and gives the strategies the global losses (the rank mean, the loss of the concatenated batch
for equal shards), so that every strategy equals one process on the concatenated batch.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["agree", "all_mean", "gather_names", "world_size"]


def world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def _names_hash(names: Sequence[str]) -> int:
    # order-independent and stable across processes (Python's hash() is salted per process)
    return zlib.crc32("\x1f".join(sorted(names)).encode()) & 0x7FFFFFFF


def gather_names(names: Sequence[str]) -> list[list[str]]:
    """Every rank's task names (a collective and a host sync: first step and task-set changes)."""
    out: list[object] = [None] * world_size()
    torch.distributed.all_gather_object(out, list(names))
    return [list(x) for x in out]  # type: ignore[call-overload]


def check_same_names(names: Sequence[str]) -> list[str]:
    """Raise on every rank unless all ranks have the same task set; return rank 0's order."""
    every = gather_names(names)
    sets = [sorted(x) for x in every]
    if any(s != sets[0] for s in sets[1:]) or any(len(x) != len(set(x)) for x in every):
        listing = "; ".join(f"rank {r}: {x}" for r, x in enumerate(every))
        raise ValueError(
            f"the ranks disagree on the tasks of this step ({listing}): every rank must pass "
            "the same task names (in any order)"
        )
    return every[0]


def agree(
    names: Sequence[str], nonfinite: Tensor | None, device: torch.device
) -> tuple[bool, bool]:
    """One collective per step: ``(names agree on every rank, some rank saw a non-finite
    value)``. ``nonfinite`` is this rank's 0-d bool flag (``None``: not checked)."""
    h = _names_hash(names)
    m = len(names)
    flag = (
        nonfinite.to(torch.int64).reshape(1)
        if nonfinite is not None
        else torch.zeros(1, dtype=torch.int64, device=device)
    )
    vec = torch.cat(
        [flag.to(device), torch.tensor([h, -h, m, -m], dtype=torch.int64, device=device)]
    )
    torch.distributed.all_reduce(vec, op=torch.distributed.ReduceOp.MAX)
    v = vec.tolist()  # the step's host sync under a process group
    return (v[1] == h and v[2] == -h and v[3] == m and v[4] == -m), bool(v[0])


def all_mean(x: Tensor) -> Tensor:
    """The rank mean of ``x`` (a new tensor; ``x`` is untouched)."""
    out = x.detach().clone().contiguous()
    torch.distributed.all_reduce(out)
    return out / world_size()
