"""The losses a step is given: their forms, checks and canonical order (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["Losses", "given_tensors", "normalize_losses"]

Losses = Mapping[str, Tensor] | Sequence[Tensor]


def given_tensors(losses: Losses) -> list[Tensor]:
    """The tensors the user passed (for identity checks), whatever the container."""
    if isinstance(losses, Mapping):
        items = list(losses.values())
    elif isinstance(losses, Tensor):
        items = [losses]
    elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
        items = list(losses)
    else:
        items = []  # refused with a clear error by normalize_losses
    return [v for v in items if isinstance(v, Tensor)]


def normalize_losses(
    losses: Losses,
    *,
    expected: int | None,
    expected_by: str,
    known: tuple[str, ...] | None,
    stateful: bool,
) -> tuple[tuple[str, ...], list[Tensor]]:
    """Task names and scalar losses (one dtype, one device), checked.

    A dict is keyed by task name; a sequence or a 1-D tensor names its tasks ``"0"``, ``"1"``, ….
    ``expected``: the task count a strategy (``expected_by``) was built for. ``known``: the task
    names of the previous steps: a dict with the same names in another order is put in that
    order; another task set is refused when a strategy keeps per-task state (``stateful``).
    """
    is_dict = isinstance(losses, Mapping)
    if isinstance(losses, Mapping):
        names = tuple(str(k) for k in losses)
        values = list(losses.values())
    elif isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(f"a tensor of losses must be 1-D [m], got shape {tuple(losses.shape)}")
        values = list(losses.unbind(0))
        names = tuple(str(i) for i in range(len(values)))
    elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
        values = list(losses)
        names = tuple(str(i) for i in range(len(values)))
    else:
        raise TypeError(
            f"losses must be a dict {{task: scalar}} or a sequence of scalars, "
            f"got {type(losses).__name__}"
        )
    if not values:
        raise ValueError("no losses were given")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {list(names)}")
    for n, v in zip(names, values):
        if not isinstance(v, Tensor):
            raise TypeError(f"loss of task {n!r} is a {type(v).__name__}, not a tensor")
        if v.numel() != 1 or v.dim() > 1:
            raise ValueError(
                f"loss of task {n!r} must be a scalar, got shape {tuple(v.shape)} "
                "(reduce it, e.g. with .mean())"
            )
        if not v.is_floating_point():
            raise TypeError(f"loss of task {n!r} has dtype {v.dtype}, not a floating type")
        if not v.requires_grad:
            raise ValueError(f"loss of task {n!r} does not require grad (detached?)")
    dtypes = {v.dtype for v in values}
    devices = {v.device for v in values}
    if len(devices) > 1:
        raise ValueError(f"the losses are on several devices: {sorted(map(str, devices))}")
    values = [v.reshape(()) for v in values]
    if len(dtypes) > 1:  # one dtype for the stacked vector: the widest
        wide = max(dtypes, key=lambda d: torch.finfo(d).bits)
        values = [v.to(wide) for v in values]
    if expected is not None and len(values) != expected:
        raise ValueError(
            f"{expected_by} was built for {expected} tasks, "
            f"got {len(values)} losses ({', '.join(names)})"
        )
    if known is not None and names != known:
        if is_dict and sorted(names) == sorted(known):
            # matched by name: the canonical order is the first step's
            by_name = dict(zip(names, values))
            return known, [by_name[n] for n in known]
        if stateful:
            raise ValueError(
                f"the task set changed from {list(known)} to {list(names)}; the "
                "configured strategies keep per-task state. Use the same tasks every step "
                "(or a new Balancer)."
            )
    return names, values
