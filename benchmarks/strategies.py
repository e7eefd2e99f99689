"""Name → factory registry of the Balancer configurations the benchmark compares.

Each factory takes the number of tasks ``m`` and a seed and returns a :class:`Spec`: the loss
weighting, the gradient aggregator and where the gradients are taken (``"params"``, the shared
parameters, or ``"cut"``, the shared representation — the ``-UB`` variants). The benchmark builds
``mtlbal.Balancer(shared, weighting=..., aggregator=..., at="params" | cut_module)`` from it.

Methods that other parts of mtlbal add later are looked up by name
(``getattr(mtlbal.aggregation, "CAGrad", None)``): a strategy whose class is absent is simply not
available, and the benchmark runs without it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import mtlbal
from mtlbal.aggregation.base import Aggregator
from mtlbal.weighting.base import LossWeighting

__all__ = ["DESCRIPTIONS", "STRATEGIES", "Spec", "available", "get", "resolve"]


@dataclass
class Spec:
    """One strategy instance for ``m`` tasks."""

    weighting: LossWeighting | None = None
    aggregator: Aggregator | None = None
    at: Literal["params", "cut"] = "params"
    # strategies that need epoch statistics (IGB, DWA) have balancer.epoch_end() called anyway


Factory = Callable[[int, int], Spec]


def _lookup(name: str) -> type | None:
    for mod in (mtlbal.aggregation, mtlbal.weighting):
        cls = getattr(mod, name, None)
        if isinstance(cls, type):
            return cls
    return None


def _construct(cls: type, m: int, seed: int, **kwargs: Any) -> Any:
    """Build ``cls`` passing only the arguments its signature accepts (``num_tasks``, ``seed``)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kw: dict[str, Any] = {}
    if "num_tasks" in params or accepts_any:
        kw["num_tasks"] = m
    if "seed" in params:
        kw["seed"] = seed
    for k, v in kwargs.items():
        if k in params or accepts_any:
            kw[k] = v
        else:
            raise TypeError(f"{cls.__name__} does not accept {k}=")
    return cls(**kw)


def _dynamic(
    cls_name: str, *, role: Literal["weighting", "aggregator"], at: str = "params", **kw: Any
) -> Callable[[], Factory | None]:
    def resolve_factory() -> Factory | None:
        cls = _lookup(cls_name)
        if cls is None:
            return None

        def make(m: int, seed: int) -> Spec:
            obj = _construct(cls, m, seed, **kw)
            if role == "weighting":
                return Spec(weighting=obj, at=at)  # type: ignore[arg-type]
            return Spec(aggregator=obj, at=at)  # type: ignore[arg-type]

        return make

    return resolve_factory


def _igb(version: int) -> Callable[[], Factory | None]:
    """IGB v1/v2: a class ``IGBv1``/``IGBv2`` if mtlbal has one, else ``IGB`` with its version
    argument (``version``/``variant``/``mode``, given as ``1`` or ``"v1"``, whichever works)."""

    def resolve_factory() -> Factory | None:
        own = _lookup(f"IGBv{version}")
        if own is not None:
            return lambda m, seed: Spec(weighting=_construct(own, m, seed))
        cls = _lookup("IGB")
        if cls is None:
            return None
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            return None
        arg = next((a for a in ("version", "variant", "mode") if a in params), None)
        if arg is None:  # a single-version IGB: it is v1
            if version != 1:
                return None
            return lambda m, seed: Spec(weighting=_construct(cls, m, seed))

        def make(m: int, seed: int) -> Spec:
            err: Exception | None = None
            for value in (version, f"v{version}", str(version)):
                try:
                    return Spec(weighting=_construct(cls, m, seed, **{arg: value}))
                except (TypeError, ValueError) as e:
                    err = e
            raise ValueError(f"IGB does not accept {arg}={version!r} or 'v{version}': {err}")

        return make

    return resolve_factory


def _static(f: Factory) -> Callable[[], Factory | None]:
    return lambda: f


W = mtlbal.weighting
A = mtlbal.aggregation

# name → resolver (returns the factory, or None when the method is not in this mtlbal)
STRATEGIES: dict[str, Callable[[], Factory | None]] = {
    "Equal": _static(lambda m, s: Spec()),
    "UW": _static(lambda m, s: Spec(weighting=W.UncertaintyWeighting(m))),
    "GradNorm": _static(lambda m, s: Spec(weighting=W.GradNorm(m, alpha=1.5))),
    "MGDA": _static(lambda m, s: Spec(aggregator=A.MGDA())),
    "MGDA-UB": _static(lambda m, s: Spec(aggregator=A.MGDA(), at="cut")),
    "PCGrad": _static(lambda m, s: Spec(aggregator=A.PCGrad(seed=s))),
    "AlignedMTL": _dynamic("AlignedMTL", role="aggregator"),
    "AlignedMTL-UB": _dynamic("AlignedMTL", role="aggregator", at="cut"),
    "IGBv1": _igb(1),
    "IGBv2": _igb(2),
    "CAGrad": _dynamic("CAGrad", role="aggregator"),
    "IMTLG": _dynamic("IMTLG", role="aggregator"),
    "UPGrad": _dynamic("UPGrad", role="aggregator"),
    # the reference keeps the previous α when no solution exists (anti-parallel or zero task
    # gradients, e.g. on a Pareto front); the bench does the same, warned and counted
    "NashMTL": _dynamic("NashMTL", role="aggregator", on_failure="warn"),
    # a published leader (Cityscapes, CelebA); α = 2 as the official CelebA/QM9 scripts. No
    # solution exists at a Pareto-stationary point: warned (the last Newton iterate is used)
    "FairGrad": _dynamic("FairGrad", role="aggregator", alpha=2.0, on_failure="warn"),
    "FAMO": _dynamic("FAMO", role="weighting"),
    "DWA": _dynamic("DWA", role="weighting"),
    "RLW": _dynamic("RLW", role="weighting"),
    # log-loss and analytical-uncertainty baselines that several studies find hard to beat
    "SI": _dynamic("ScaleInvariant", role="weighting"),
    "UWSO": _dynamic("UWSO", role="weighting"),
    "GLS": _dynamic("GeometricMean", role="weighting"),
    "IMTLL": _dynamic("IMTLL", role="weighting"),
    "STCH": _dynamic("STCH", role="weighting"),
    # a published leader (NYUv2, QM9 in its paper); K = 2 groups (the official trainer's
    # default, 1, gives every task the same weight)
    "GO4Align": _dynamic("GO4Align", role="weighting", num_groups=2),
    "PCD": _dynamic("PCD", role="aggregator"),
    "MoDo": _dynamic("MoDo", role="aggregator"),
    "SDMGrad": _dynamic("SDMGrad", role="aggregator"),
    "Random": _dynamic("Random", role="aggregator"),
    "GradDrop": _dynamic("GradDrop", role="aggregator", at="cut"),
    "CRMOGM-MGDA": _static(lambda m, s: Spec(aggregator=A.CRMOGM(A.MGDA()))),
    # the rest of issue 10's catalogue (Jacobian methods at the shared parameters)
    "MoCo": _dynamic("MoCo", role="aggregator"),
    "ExcessMTL": _dynamic("ExcessMTL", role="aggregator"),
    "DB-MTL": _static(lambda m, s: Spec(weighting=W.ScaleInvariant(m), aggregator=A.DBMTL())),
    "ConFIG": _dynamic("ConFIG", role="aggregator"),
    "MConFIG": _dynamic("MConFIG", role="aggregator"),
    "LDC-MTL": _dynamic("LDCMTL", role="weighting"),
    "COSMOS": _dynamic("COSMOS", role="weighting", lambda_=1.0),
    "PBI": _dynamic("PBI", role="weighting"),
    # ---- issue 13 (a). CoBa reads validation losses: train_one holds out a tenth of the
    # training set for it and feeds one validation batch per step. MT-GRPO gets
    # balancer.update (its IWU step, rewards −L). VisATB needs contributions measured by pilot
    # runs on validation sets: not benchmarked.
    "CoBa": _dynamic("CoBa", role="weighting"),
    "MTGRPO": _dynamic("MTGRPO", role="weighting"),
    "MedGRPO": _dynamic("MedGRPO", role="weighting"),
}

DESCRIPTIONS: dict[str, str] = {
    "STL": "single-task baselines: one network per task, same architecture and budget",
    "Equal": "sum of the losses (no balancing)",
    "UW": "`weighting.UncertaintyWeighting(m)` (Kendall et al. 2018, learnable log-variances)",
    "GradNorm": "`weighting.GradNorm(m, alpha=1.5)` at the last shared layer",
    "MGDA": "`aggregation.MGDA()` on the per-task gradients of the shared parameters",
    "MGDA-UB": "`aggregation.MGDA()` at the shared representation (cut point)",
    "PCGrad": "`aggregation.PCGrad(seed=seed)` at the shared parameters",
    "AlignedMTL": "`aggregation.AlignedMTL()` at the shared parameters",
    "AlignedMTL-UB": "`aggregation.AlignedMTL()` at the shared representation (cut point)",
    "IGBv1": "`weighting.IGB(version=1)` (improvable-gap balancing, heuristic)",
    "IGBv2": "`weighting.IGB(version=2)` (improvable-gap balancing, SAC agent)",
    "CAGrad": "`aggregation.CAGrad()` at the shared parameters",
    "IMTLG": "`aggregation.IMTLG()` at the shared parameters",
    "UPGrad": "`aggregation.UPGrad()` at the shared parameters",
    "NashMTL": '`aggregation.NashMTL(on_failure="warn")` at the shared parameters',
    "FairGrad": '`aggregation.FairGrad(alpha=2.0, on_failure="warn")` at the shared parameters',
    "FAMO": "`weighting.FAMO()`",
    "DWA": "`weighting.DWA()` (epoch-level loss ratios)",
    "RLW": "`weighting.RLW()` (random loss weights)",
    "SI": "`weighting.ScaleInvariant()` (Σ log(L + 1e-8): the scale-invariant baseline)",
    "UWSO": "`weighting.UWSO()` (softmax of the inverse losses, T = 1)",
    "GLS": "`weighting.GeometricMean()` (geometric mean of the losses, × m)",
    "IMTLL": "`weighting.IMTLL(m)` (learnable loss scales e^s·L − s)",
    "STCH": "`weighting.STCH()` (smooth Tchebycheff of log(L/z); Σ log L until epoch 5)",
    "GO4Align": "`weighting.GO4Align(m, num_groups=2)` (K-means groups of risk-guided indicators)",
    "PCD": "`aggregation.PCD()` at the shared parameters (the first task is the primary)",
    "MoDo": "`aggregation.MoDo()` at the shared parameters (one batch: the biased variant)",
    "SDMGrad": "`aggregation.SDMGrad()` at the shared parameters (one batch: the biased variant)",
    "Random": "`aggregation.Random(seed=seed)` (random weights on the shared gradients)",
    "GradDrop": "`aggregation.GradDrop(seed=seed)` at the shared representation (cut point)",
    "MoCo": "`aggregation.MoCo()` at the shared parameters (tracked gradients y, λ on the simplex)",
    "ExcessMTL": "`aggregation.ExcessMTL()` at the shared parameters (excess-risk weights)",
    "DB-MTL": "`weighting.ScaleInvariant()` + `aggregation.DBMTL()` (log losses, max-norm EMA)",
    "ConFIG": "`aggregation.ConFIG()` at the shared parameters (conflict-free direction)",
    "MConFIG": "`aggregation.MConFIG()` at the shared parameters (momentum ConFIG)",
    "LDC-MTL": "`weighting.LDCMTL(m)` (router softmax + loss-discrepancy penalty)",
    "COSMOS": "`weighting.COSMOS(lambda_=1.0)` (cosine-penalised linear scalarization, r = 1/m)",
    "PBI": "`weighting.PBI()` (penalty boundary intersection, uniform preference)",
    "CRMOGM-MGDA": "`aggregation.CRMOGM(MGDA())` (EMA of MGDA's weights, alpha=0.9)",
    "CoBa": "`weighting.CoBa(m)` (validation-slope weights; a tenth of train held out for them)",
    "MTGRPO": "`weighting.MTGRPO(m)` (IWU task weights from −L and its decrease per step)",
    "MedGRPO": "`weighting.MedGRPO(m)` (c / running median of each task's loss)",
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
    "Nash-MTL": "NashMTL",
    "ScaleInvariant": "SI",
    "LogLoss": "SI",
    "UW-SO": "UWSO",
    "GeometricMean": "GLS",
    "IMTL-L": "IMTLL",
}


def resolve(name: str) -> str:
    """The registry name of ``name`` (aliases and case accepted); ``KeyError`` if unknown."""
    if name in STRATEGIES:
        return name
    if name in ALIASES:
        return ALIASES[name]
    low = {k.lower(): k for k in [*STRATEGIES, *ALIASES]}
    key = low.get(name.lower())
    if key is None:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return ALIASES.get(key, key)


def get(name: str) -> Factory:
    """The factory of strategy ``name``; ``LookupError`` when mtlbal does not have it yet."""
    key = resolve(name)
    factory = STRATEGIES[key]()
    if factory is None:
        raise LookupError(f"strategy {key!r} is not available in this version of mtlbal")
    return factory


def available(names: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Split ``names`` (default: every registered strategy) into those this mtlbal provides and
    can build for two tasks, and ``{name: reason}`` for the others. A name given explicitly
    that cannot be built raises instead (``LookupError``), so a typo never goes unnoticed."""
    out: list[str] = []
    missing: dict[str, str] = {}
    explicit = names is not None
    for n in names if names is not None else list(STRATEGIES):
        key = resolve(n)
        factory = STRATEGIES[key]()
        if factory is None:
            if explicit:
                raise LookupError(f"strategy {key!r} is not available in this version of mtlbal")
            missing[key] = "not in this version of mtlbal"
            continue
        try:
            factory(2, 0)
        except Exception as e:
            if explicit:
                raise LookupError(f"strategy {key!r} cannot be built: {e}") from e
            missing[key] = f"cannot be built: {type(e).__name__}: {e}"
            continue
        if key not in out:
            out.append(key)
    return out, missing
