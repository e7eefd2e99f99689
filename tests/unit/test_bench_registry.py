"""The one strategy registry (benchmarks/registry.py): the battery's view, the benchmark's rows,
the code the report shows, and the cost suite's configurations."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from benchmarks import registry as R
from benchmarks import strategies as S

import mtlbal
import registry as battery_view
from mtlbal.aggregation.base import Aggregator, GramianAggregator
from mtlbal.weighting.base import Equal, LossWeighting


def _shipped() -> list[type]:
    out = []
    for mod, base in ((mtlbal.weighting, LossWeighting), (mtlbal.aggregation, Aggregator)):
        for n in mod.__all__:
            obj = getattr(mod, n)
            if not (isinstance(obj, type) and issubclass(obj, base)) or inspect.isabstract(obj):
                continue
            if obj not in (Aggregator, GramianAggregator, LossWeighting):
                out.append(obj)
    return out


def test_battery_view_leaves_out_benchmark_only_rows() -> None:
    names = [e.name for e in battery_view.REGISTRY]
    assert len(names) == len(set(names))
    assert "UW+UPGrad" not in names and "CRMOGM-MGDA" not in names
    assert {"Equal", "UncertaintyWeighting", "MGDA", "UW+PCGrad"} <= set(names)
    assert all(e.battery for e in battery_view.REGISTRY)
    assert [e for e in R.REGISTRY if e.battery] == battery_view.REGISTRY


@pytest.mark.parametrize("name", list(S.STRATEGIES))
def test_every_row_builds_and_its_shown_code_is_that_configuration(name: str) -> None:
    types = ["classification", "regression", "classification"]
    spec = S.get(name)(3, 5, task_types=types)
    assert spec.weighting is None or isinstance(spec.weighting, LossWeighting)
    assert spec.aggregator is None or isinstance(spec.aggregator, Aggregator)
    assert spec.at == R.BENCH[name].at
    # the report's code, run as written (Balancer replaced by a recorder), builds the same
    seen: dict[str, Any] = {}

    def balancer(shared: object, **kw: Any) -> None:
        seen.update(kw)

    scope = {
        "Balancer": balancer,
        "shared": object(),
        "trunk": "trunk",
        "weighting": mtlbal.weighting,
        "aggregation": mtlbal.aggregation,
        "transforms": mtlbal.transforms,
        "m": 3,
        "seed": 5,
        "task_types": types,
    }
    eval(S.code_of(name), scope)
    assert repr(seen.get("weighting")) == repr(spec.weighting)
    assert repr(seen.get("aggregator")) == repr(spec.aggregator)
    assert seen.get("at", "params") == ("trunk" if spec.at == "cut" else "params")
    assert S.DESCRIPTIONS[name].startswith(f"`{S.code_of(name)}`")
    for m in (2, 5):
        S.get(name)(m, 0)


def test_rows_the_issue_named() -> None:
    assert type(S.get("FAMO")(2, 0).weighting).__name__ == "FAMO"  # `weighting.FAMO()` did not
    uw = S.get("UW")(2, 0, task_types=["classification", "regression"]).weighting
    assert uw is not None and uw.a.tolist() == [1.0, 0.5]  # Kendall's classification form
    combo = S.get("UW+PCGrad")(2, 0)
    assert type(combo.weighting).__name__ == "UncertaintyWeighting"
    assert type(combo.aggregator).__name__ == "PCGrad"
    assert type(S.get("UW+UPGrad")(2, 0).aggregator).__name__ == "UPGrad"
    assert S.get("NashMTL")(2, 0).reference_heads and not S.get("UPGrad")(2, 0).reference_heads
    assert S.get("MGDA-UB")(3, 0).at == "cut"
    assert set(S.QUICK) < set(S.STRATEGIES) and "Equal" in S.QUICK


def test_names_and_aliases() -> None:
    assert S.resolve("UncertaintyWeighting") == "UW" and S.resolve("mgda-ub") == "MGDA-UB"
    assert S.resolve("nash-mtl") == "NashMTL"
    with pytest.raises(KeyError, match="unknown strategy"):
        S.resolve("NoSuchMethod")
    with pytest.raises(LookupError):
        S.available(["NoSuchMethod"])
    have, missing = S.available()
    assert have == list(S.STRATEGIES) and missing == {}
    dup = R.Entry("X", lambda m: {}, bench=(R.Bench("Equal", ""),))
    with pytest.raises(ValueError, match="declared twice"):
        R.bench_rows([*R.REGISTRY, dup])


def test_bad_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="task_types has 1 entries for 2 tasks"):
        R.build_bench(R.BENCH["UW"], 2, 0, ["regression"])
    with pytest.raises(ValueError, match="unknown Balancer arguments"):
        R.build_bench(R.Bench("bad", "at='cut'"), 2, 0)


def test_every_shipped_class_has_a_registry_configuration() -> None:
    # the battery and the cost suite measure every shipped method from the registry
    for cls in _shipped():
        if cls is Equal:
            continue
        obj = R.build_alone(cls, 4)
        assert type(obj) is cls, cls.__name__
    assert R.build_alone(int, 2) is None
