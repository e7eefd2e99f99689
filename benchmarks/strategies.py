"""The benchmark's view of the strategy registry: name → factory of Balancer configurations.

The rows are declared in :mod:`benchmarks.registry` (one declaration per strategy, shared with
the test battery); this module resolves names and aliases and builds a :class:`Spec` for ``m``
tasks: the loss weighting, the gradient aggregator, the transforms and where the gradients are
taken (``"params"``, the shared parameters, or ``"cut"``, the shared representation — the ``-UB``
rows). The suites build ``mtlbal.Balancer(shared, weighting=..., aggregator=..., at=...)`` from it.

Example:
    >>> spec = get("MGDA-UB")(3, 0)
    >>> type(spec.aggregator).__name__, spec.at
    ('MGDA', 'cut')
    >>> get("UW")(2, 0, task_types=["regression", "classification"]).weighting.a.tolist()
    [0.5, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from benchmarks.registry import BENCH, Bench, TaskType, build_bench
from mtlbal.aggregation.base import Aggregator
from mtlbal.weighting.base import LossWeighting

__all__ = [
    "ALIASES",
    "DESCRIPTIONS",
    "QUICK",
    "STRATEGIES",
    "Spec",
    "available",
    "code_of",
    "get",
    "resolve",
]


@dataclass
class Spec:
    """One strategy instance for ``m`` tasks."""

    weighting: LossWeighting | None = None
    aggregator: Aggregator | None = None
    at: Literal["params", "cut"] = "params"
    transforms: Any = None
    # the method's reference weights the task heads' gradients (registry.Bench.reference_heads)
    reference_heads: bool = False
    closure: bool = False  # the step needs backward(losses, closure=...) (F-MTL)
    # amortised balancing: Balancer(solve_every=k) (the "<name>-k<k>" variants)
    solve_every: int = 1
    # strategies that need epoch statistics (IGB, DWA) have balancer.epoch_end() called anyway


class Factory:
    """``factory(m, seed, task_types=None) → Spec`` for one benchmark row."""

    def __init__(self, row: Bench, solve_every: int = 1) -> None:
        self.row = row
        self.solve_every = solve_every

    def __call__(self, m: int, seed: int, task_types: Sequence[TaskType] | None = None) -> Spec:
        kw = build_bench(self.row, m, seed, task_types)
        return Spec(
            weighting=kw.get("weighting"),
            aggregator=kw.get("aggregator"),
            at=self.row.at,
            transforms=kw.get("transforms"),
            reference_heads=self.row.reference_heads,
            closure=self.row.closure,
            solve_every=self.solve_every,
        )


# name → row, in registry order
STRATEGIES: dict[str, Bench] = dict(BENCH)
# the rows `make bench` runs
QUICK: list[str] = [n for n, b in STRATEGIES.items() if b.quick]


def code_of(name: str) -> str:
    """The Balancer call of row ``name`` as a user writes it (``m`` tasks, ``seed``)."""
    key = resolve(name)
    if key in STRATEGIES:
        return _code(STRATEGIES[key])
    base, _, k = key.rpartition("-k")
    return _code(STRATEGIES[base])[:-1] + f", solve_every={int(k)})"


def _code(b: Bench) -> str:
    args = ", ".join(a for a in ("shared", b.code, "at=trunk" if b.at == "cut" else "") if a)
    return f"Balancer({args})"


def _description(b: Bench) -> str:
    return f"`{_code(b)}`" + (f" ({b.note})" if b.note else "")


DESCRIPTIONS: dict[str, str] = {
    "STL": "single-task baselines: one network per task, same architecture and budget",
    **{n: _description(b) for n, b in STRATEGIES.items()},
}

ALIASES = {
    "EW": "Equal",
    "UncertaintyWeighting": "UW",
    "MGDAUB": "MGDA-UB",
    "Aligned-MTL": "AlignedMTL",
    "Aligned-MTL-UB": "AlignedMTL-UB",
    "IGB": "IGBv1",
    "IGB-v1": "IGBv1",
    "IGB-v2": "IGBv2",
    "IMTL-G": "IMTLG",
    "IMTL-L": "IMTLL",
    "Nash-MTL": "NashMTL",
    "ScaleInvariant": "SI",
    "LogLoss": "SI",
    "UW-SO": "UWSO",
    "GeometricMean": "GLS",
    "DBMTL": "DB-MTL",
    "LDCMTL": "LDC-MTL",
}


def resolve(name: str) -> str:
    """The registry name of ``name`` (aliases and case accepted); ``KeyError`` if unknown."""
    if name in STRATEGIES:
        return name
    base, sep, k = name.rpartition("-k")
    if sep and k.isdigit() and int(k) >= 1:  # amortised: <name>-k<k>
        return f"{resolve(base)}-k{int(k)}"
    if name in ALIASES:
        return ALIASES[name]
    low = {k.lower(): k for k in [*STRATEGIES, *ALIASES]}
    key = low.get(name.lower())
    if key is None:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return ALIASES.get(key, key)


def get(name: str) -> Callable[..., Spec]:
    """The factory of strategy ``name``: ``get(name)(m, seed, task_types=None) → Spec``.

    ``<name>-k<k>`` (e.g. ``UPGrad-k10``) is row ``name`` with amortised balancing,
    ``Balancer(solve_every=k)``: asked for by name only, never in the default set.
    """
    key = resolve(name)
    if key in STRATEGIES:
        return Factory(STRATEGIES[key])
    base, _, k = key.rpartition("-k")
    return Factory(STRATEGIES[base], solve_every=int(k))


def available(names: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Split ``names`` (default: every registered row) into those that build for two tasks, and
    ``{name: reason}`` for the others. A name given explicitly that cannot be built raises
    instead (``LookupError``), so a typo never goes unnoticed."""
    out: list[str] = []
    missing: dict[str, str] = {}
    explicit = names is not None
    for n in names if names is not None else list(STRATEGIES):
        try:
            key = resolve(n)
        except KeyError as e:
            raise LookupError(str(e)) from e
        try:
            get(key)(2, 0)
        except Exception as e:
            if explicit:
                raise LookupError(f"strategy {key!r} cannot be built: {e}") from e
            missing[key] = f"cannot be built: {type(e).__name__}: {e}"
            continue
        if key not in out:
            out.append(key)
    return out, missing
