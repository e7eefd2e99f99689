"""The losses a step is given: their forms, checks and canonical order (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["Losses", "Normalized", "given_tensors", "normalize_losses"]

Losses = Mapping[str, Tensor | None] | Sequence[Tensor | None]


class Normalized(NamedTuple):
    """A step's losses, checked: the present tasks and where they sit in the full task set."""

    names: tuple[str, ...]  # the present tasks, in the canonical order
    values: list[Tensor]  # their scalar losses (one dtype, one device)
    all_names: tuple[str, ...]  # every task, in the canonical order
    present: tuple[int, ...] | None  # indices of ``names`` in ``all_names``; None: all present


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
    declared: bool = False,
) -> Normalized:
    """Task names and scalar losses (one dtype, one device), checked.

    A dict is keyed by task name; a sequence or a 1-D tensor names its tasks ``"0"``, ``"1"``, ….
    ``expected``: the task count a strategy (``expected_by``) was built for. ``known``: the task
    names of the previous steps (or declared with ``Balancer(tasks=...)``): a dict with the same
    names in another order is put in that order; another task set is refused when a strategy
    keeps per-task state (``stateful``) or the tasks were ``declared``.

    Missing tasks: a dict or a sequence may hold ``None`` for a task without a loss in this
    step, and once the task set is known a dict may hold a subset of it. The present tasks keep
    the canonical order; :attr:`Normalized.present` indexes them into :attr:`Normalized.all_names`.
    """
    is_dict = isinstance(losses, Mapping)
    if isinstance(losses, Mapping):
        names = tuple(str(k) for k in losses)
        given: list[Any] = list(losses.values())
    elif isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(f"a tensor of losses must be 1-D [m], got shape {tuple(losses.shape)}")
        given = list(losses.unbind(0))
        names = tuple(str(i) for i in range(len(given)))
    elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
        given = list(losses)
        names = tuple(str(i) for i in range(len(given)))
    else:
        raise TypeError(
            f"losses must be a dict {{task: scalar}} or a sequence of scalars, "
            f"got {type(losses).__name__}"
        )
    if not given:
        raise ValueError("no losses were given")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {list(names)}")
    absent_given = tuple(n for n, v in zip(names, given) if v is None)
    if len(absent_given) == len(names):
        raise ValueError(
            f"every task of this step is absent (None): {list(names)}; a step needs at least "
            "one loss"
        )
    for n, v in zip(names, given):
        if v is None:
            continue
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
    values_by_name = {n: v for n, v in zip(names, given) if v is not None}
    tensors = list(values_by_name.values())
    dtypes = {v.dtype for v in tensors}
    devices = {v.device for v in tensors}
    if len(devices) > 1:
        raise ValueError(f"the losses are on several devices: {sorted(map(str, devices))}")
    wide = max(dtypes, key=lambda d: torch.finfo(d).bits)  # one dtype for the stacked vector
    values_by_name = {n: v.reshape(()).to(wide) for n, v in values_by_name.items()}

    # the full task set of this step, in the canonical order
    all_names = names
    if known is not None and names != known:
        if sorted(names) == sorted(known):
            all_names = known  # matched by name: the canonical order is the first step's
        elif is_dict and set(names) < set(known):
            all_names = known  # a subset of the known tasks: the others are absent
        elif stateful or declared or absent_given:
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(
                    f"the task set changed from {list(known)} to {list(names)}: unknown "
                    f"task(s) {', '.join(map(repr, unknown))}"
                    + (" (declared with Balancer(tasks=...))" if declared else "")
                    + ". Use the same tasks every step: a task without labels in this batch is "
                    "left out of the dict or given as None (or use a new Balancer)"
                )
            raise ValueError(
                f"the task set changed from {list(known)} to {list(names)}; the configured "
                "strategies keep per-task state. Use the same tasks every step (a sequence of "
                "losses gives None for a task without labels in this batch), or a new Balancer"
            )
        # else: a new task set for strategies without per-task state (as before)
    if expected is not None and len(all_names) != expected:
        hint = ""
        if known is None and is_dict:
            hint = (
                "; if some tasks have no labels in this batch, give them as None or declare "
                "every task with Balancer(tasks=...)"
            )
        raise ValueError(
            f"{expected_by} was built for {expected} tasks, "
            f"got {len(all_names)} losses ({', '.join(all_names)}){hint}"
        )
    present_names = tuple(n for n in all_names if n in values_by_name)
    values = [values_by_name[n] for n in present_names]
    present = None
    if len(present_names) < len(all_names):
        present = tuple(i for i, n in enumerate(all_names) if n in values_by_name)
    return Normalized(present_names, values, all_names, present)
