"""What the step needs from ``torch.distributed``: every decision is global.

Under a process group, each rank holds a shard of the batch. The Balancer makes the ranks agree
before any per-task collective runs (same task names, same count, one canonical order), takes the
finiteness verdict globally (all ranks raise, or all skip: none is left waiting in a collective),
and gives the strategies the global losses (the rank mean, the loss of the concatenated batch
for equal shards), so that every strategy equals one process on the concatenated batch.

A step that one rank refuses while validating it (a bad loss, another task count, a task set
its strategies cannot take, a non-finite loss) is refused by every rank: the refusal travels in
the step's one agreement collective, and only then, on that (global) refusal path, the ranks
exchange their messages, so that each raises a message that names the rank that refused.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Verdict",
    "agree",
    "all_mean",
    "all_mean_or_refused",
    "check_same_names",
    "collective_device",
    "gather_objects",
    "raise_refused",
    "world_size",
]


def world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def _names_hash(names: Sequence[str]) -> int:
    # order-independent and stable across processes (Python's hash() is salted per process)
    return zlib.crc32("\x1f".join(sorted(names)).encode()) & 0x7FFFFFFF


def collective_device() -> torch.device:
    """Where this rank's small agreement tensors live: the current CUDA device under NCCL."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a collective and a host sync: only on paths every rank takes)."""
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def check_same_names(names: Sequence[str]) -> list[str]:
    """Raise on every rank unless all ranks have the same task set; return rank 0's order."""
    every = [list(x) for x in gather_objects(list(names))]
    sets = [sorted(x) for x in every]
    if any(s != sets[0] for s in sets[1:]) or any(len(x) != len(set(x)) for x in every):
        listing = "; ".join(f"rank {r}: {x}" for r, x in enumerate(every))
        hint = ""
        if all(set(x) <= set(every[0]) or set(x) >= set(every[0]) for x in every):
            hint = (
                ". Missing tasks under DDP: every rank must leave out the same tasks (a task "
                "whose labels are missing on some ranks only is refused: its global loss would "
                "be over part of the ranks); agree on the present tasks across ranks first, "
                "e.g. give a task None on every rank unless all ranks have its labels"
            )
        raise ValueError(
            f"the ranks disagree on the tasks of this step ({listing}): every rank must pass "
            f"the same task names (in any order){hint}"
        )
    return every[0]


class Verdict(NamedTuple):
    """The ranks' agreement on a step."""

    refused: bool  # some rank refused the step while validating it
    same_names: bool  # every rank has the same task set (and count)
    nonfinite: bool  # some rank saw a non-finite loss


def agree(names: Sequence[str] | None, nonfinite: Tensor | None, device: torch.device) -> Verdict:
    """One collective per step (a MAX all_reduce of six integers). ``names``: this rank's task
    names, ``None`` if this rank refused the step; ``nonfinite``: this rank's 0-d bool flag
    (``None``: not checked)."""
    refused = names is None
    names = () if names is None else names
    h = _names_hash(names)
    m = len(names)
    flag = (
        nonfinite.to(device=device, dtype=torch.int64).reshape(1)
        if nonfinite is not None
        else torch.zeros(1, dtype=torch.int64, device=device)
    )
    head = torch.tensor([int(refused)], dtype=torch.int64, device=device)
    vec = torch.cat([head, flag, torch.tensor([h, -h, m, -m], dtype=torch.int64, device=device)])
    torch.distributed.all_reduce(vec, op=torch.distributed.ReduceOp.MAX)
    v = vec.tolist()  # the step's host sync under a process group
    same = v[2] == h and v[3] == -h and v[4] == m and v[5] == -m
    return Verdict(refused=bool(v[0]), same_names=same, nonfinite=bool(v[1]))


def raise_refused(error: BaseException | None) -> None:
    """On the (global) refusal path: every rank raises; the ranks that refused re-raise their
    own error, the others a ``ValueError`` quoting theirs."""
    every = gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    listing = "; ".join(f"rank {r}: {msg}" for r, msg in enumerate(every) if msg is not None)
    raise ValueError(f"another rank refused this step ({listing}); every rank refuses it")


def all_mean(x: Tensor) -> Tensor:
    """The rank mean of ``x`` (a new tensor; ``x`` is untouched)."""
    out = x.detach().clone().contiguous()
    torch.distributed.all_reduce(out)
    return out / world_size()


def all_mean_or_refused(x: Tensor | None, m: int) -> Tensor | None:
    """The rank mean of the ``[m]`` vector ``x`` (in float64), or ``None`` on every rank if some
    rank passes ``x=None`` (it refused). One all_reduce: the refusal rides along."""
    device = collective_device() if x is None else x.device
    vec = torch.zeros(m + 1, dtype=torch.float64, device=device)
    if x is None:
        vec[m] = 1.0
    else:
        vec[:m] = x.detach().reshape(m).to(torch.float64)
    torch.distributed.all_reduce(vec)
    if bool(vec[m] > 0):  # the host sync of update()
        return None
    return vec[:m] / world_size()
