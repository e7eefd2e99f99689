"""Saving and loading a :class:`~mtlbal.Balancer`'s state, checked before anything is assigned.

The saved dict (``FORMAT_VERSION`` 1)::

    {
        "format_version": 1,
        "step": int,                      # steps taken (Balancer.step_count)
        "tasks": list[str] | None,        # the task names of the last step (None: no step yet)
        "config": {
            "weighting": str,             # class qualified names
            "aggregator": str | None,
            "transforms": list[str],
            "at": "params" | "cut",
        },
        "weighting": dict,                # each strategy's Stateful.state_dict()
        "aggregator": dict | None,
        "transforms": list[dict],
        "amortise": dict,                 # only with Balancer(solve_every=k > 1): the stored
                                          # weights, their task names, the step of the last
                                          # solve, the schedule (mtlbal._amortise)
    }

Each strategy's own dict records its class and configuration (see :mod:`mtlbal._stateful`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import TYPE_CHECKING, Any

from torch.nn.modules.module import _IncompatibleKeys

from mtlbal._stateful import Stateful, _join

if TYPE_CHECKING:
    from mtlbal.balancer import Balancer

__all__ = ["FORMAT_VERSION", "balancer_state_dict", "load_balancer_state_dict"]

FORMAT_VERSION = 1
_KEYS = ("format_version", "step", "tasks", "config", "weighting", "aggregator", "transforms")


def _config(balancer: Balancer) -> dict[str, Any]:
    return {
        "weighting": type(balancer.weighting).__qualname__,
        "aggregator": (
            None if balancer.aggregator is None else type(balancer.aggregator).__qualname__
        ),
        "transforms": [type(t).__qualname__ for t in balancer.transforms],
        "at": "params" if isinstance(balancer.at, str) else "cut",
    }


def _keys(balancer: Balancer) -> tuple[str, ...]:
    return _KEYS + (("amortise",) if _amortiser(balancer) is not None else ())


def _amortiser(balancer: Balancer) -> Any:
    return getattr(balancer, "_amortiser", None)


def balancer_state_dict(balancer: Balancer) -> dict[str, Any]:
    """The state of ``balancer``: the format in this module's docstring."""
    out: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "step": balancer.step_count,
        "tasks": list(balancer.tasks) if balancer.tasks is not None else None,
        "config": _config(balancer),
        "weighting": balancer.weighting.state_dict(),
        "aggregator": None if balancer.aggregator is None else balancer.aggregator.state_dict(),
        "transforms": [t.state_dict() for t in balancer.transforms],
    }
    amortiser = _amortiser(balancer)
    if amortiser is not None:
        out["amortise"] = amortiser.state_dict()
    return out


def load_balancer_state_dict(
    balancer: Balancer, state: Any, strict: bool = True
) -> _IncompatibleKeys:
    """Restore what :func:`balancer_state_dict` saved, checking all of it first.

    Checked before anything is assigned: ``state`` is a mapping with the keys of the format
    (``strict``); the format version; the configuration (``strict``: the weighting's, the
    aggregator's and each transform's class, and ``at``); the task names (``None`` or a list
    of distinct strings, as many as a strategy that knows its ``num_tasks`` expects); the step
    (an integer ≥ 0); and every strategy's state (:meth:`Stateful.check_state_dict`). All the
    problems found are raised in one ``ValueError`` and the Balancer is left unchanged; once
    everything is checked, every strategy is loaded, then the step and the task names (a
    strategy whose loading still fails is rolled back with the ones loaded before it).

    With ``strict=False``, missing and unexpected keys are left alone and reported (prefixed
    by the strategy's place: ``"weighting."``, ``"aggregator."``, ``"transforms.0."``; a
    strategy saved without its counterpart here, or missing from the state, as its place), a
    different configuration is tolerated (a strategy is still refused the state of another
    class), and the strategies present on both sides are loaded.

    Returns:
        ``(missing_keys, unexpected_keys)`` like :meth:`torch.nn.Module.load_state_dict`.
    """
    if not isinstance(state, Mapping):
        raise ValueError(
            f"Balancer: a state_dict must be a mapping (what Balancer.state_dict() returns), "
            f"got {type(state).__name__}"
        )
    errors: list[str] = []
    keys = _keys(balancer)
    missing = [k for k in keys if k not in state]
    unexpected = [str(k) for k in state if k not in keys]
    if strict:
        errors += [f"Balancer: missing key {k!r}" for k in missing]
        errors += [f"Balancer: unexpected key {k!r}" for k in unexpected]

    if "format_version" in state and state["format_version"] != FORMAT_VERSION:
        errors.append(
            f"Balancer: state format version {state['format_version']!r}, this version of "
            f"mtlbal reads {FORMAT_VERSION}"
        )
    if "config" in state:
        saved_config = state["config"]
        mine = _config(balancer)
        if not isinstance(saved_config, Mapping):
            errors.append(
                f"Balancer: 'config' must be a mapping, got {type(saved_config).__name__}"
            )
        elif strict:
            for k, v in mine.items():
                other = saved_config.get(k, "<absent>")
                if other != v:
                    errors.append(
                        f"Balancer: configuration differs: {k} {other!r} saved, {v!r} here"
                    )

    tasks = state.get("tasks")
    if "tasks" in state and tasks is not None:
        if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
            errors.append(f"Balancer: 'tasks' must be None or a list of str, got {tasks!r}")
            tasks = None
        elif len(set(tasks)) != len(tasks):
            errors.append(f"Balancer: 'tasks' has a repeated name: {list(tasks)}")
        else:
            for s in balancer.strategies:
                n = getattr(s, "num_tasks", None)
                if isinstance(n, int) and not isinstance(n, bool) and n != len(tasks):
                    errors.append(
                        f"{type(s).__qualname__}: configured for {n} tasks, the state was saved "
                        f"for {len(tasks)} ({', '.join(tasks)})"
                    )
    step = state.get("step")
    if "step" in state and (
        isinstance(step, bool) or not isinstance(step, Integral) or int(step) < 0
    ):
        errors.append(f"Balancer: 'step' must be an integer ≥ 0, got {step!r}")

    # every strategy with its saved state: checked all, before any is loaded
    pairs: list[tuple[str, Stateful, Any]] = []
    if "weighting" in state:
        pairs.append(("weighting", balancer.weighting, state["weighting"]))
    if "aggregator" in state:
        saved_agg = state["aggregator"]
        if balancer.aggregator is None and saved_agg is not None:
            unexpected.append("aggregator")
            if strict:
                errors.append(
                    "Balancer: the state has an aggregator's state, this Balancer has none"
                )
        elif balancer.aggregator is not None and saved_agg is None:
            missing.append("aggregator")
            if strict:
                errors.append(
                    f"Balancer: the state has no aggregator's state, this Balancer has "
                    f"{type(balancer.aggregator).__qualname__}"
                )
        elif balancer.aggregator is not None:
            pairs.append(("aggregator", balancer.aggregator, saved_agg))
    if "transforms" in state:
        saved_t = state["transforms"]
        if not isinstance(saved_t, Sequence) or isinstance(saved_t, (str, bytes)):
            errors.append(f"Balancer: 'transforms' must be a list, got {type(saved_t).__name__}")
        else:
            n_mine, n_saved = len(balancer.transforms), len(saved_t)
            if n_mine != n_saved:
                if strict:
                    errors.append(
                        f"Balancer: the state has {n_saved} transform(s), this Balancer has "
                        f"{n_mine}"
                    )
                missing += [f"transforms.{i}" for i in range(n_saved, n_mine)]
                unexpected += [f"transforms.{i}" for i in range(n_mine, n_saved)]
            for i, (t, st) in enumerate(zip(balancer.transforms, saved_t)):
                pairs.append((f"transforms.{i}", t, st))
    for place, strategy, saved in pairs:
        e, mi, un = strategy._check_state(saved, strict)
        errors += e
        missing += [f"{place}.{k}" for k in mi]
        unexpected += [f"{place}.{k}" for k in un]
    amortiser = _amortiser(balancer)
    load_amortise = amortiser is not None and "amortise" in state
    if load_amortise:
        errors += amortiser.check_state(state["amortise"])
    if errors:
        raise ValueError(_join(errors))

    # everything checked: assign (a failure here is a bug of a strategy's load_extra_state;
    # the strategies already loaded are put back)
    snapshots = [strategy._snapshot() for _, strategy, _ in pairs]
    done = 0
    try:
        for _, strategy, saved in pairs:
            done += 1
            strategy._assign_state(saved)
    except BaseException:
        for (_, strategy, _), snap in zip(pairs[:done], snapshots):
            strategy._restore(snap)
        raise
    if "step" in state:
        balancer.step_count = int(step)  # type: ignore[arg-type]
    if "tasks" in state:
        balancer.tasks = tuple(tasks) if tasks is not None else None
    if load_amortise:
        amortiser.load(state["amortise"])
    return _IncompatibleKeys(missing, unexpected)
