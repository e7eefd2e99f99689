"""The cost suite's plumbing on a toy model (no timing assertions: the machine is shared)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from benchmarks.suites import cost
from torch import Tensor

import mtlbal
from mtlbal.aggregation.base import GramianAggregator


def _tiny(**kw: object) -> cost.CostConfig:
    import dataclasses

    return dataclasses.replace(cost.CostConfig.tiny(), **kw)  # type: ignore[arg-type]


def test_discovers_the_shipped_strategies() -> None:
    names = {s.name for s in cost.discover_strategies()}
    assert {"Equal", "UncertaintyWeighting", "GradNorm", "MGDA", "PCGrad"} <= names
    assert not names & {"Aggregator", "GramianAggregator", "LossWeighting"}


def test_a_new_method_joins_without_editing_the_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    class HalfSum(GramianAggregator):
        def weights(self, gramian: Tensor) -> Tensor:
            return torch.full((gramian.shape[0],), 0.5, dtype=gramian.dtype)

    monkeypatch.setattr(mtlbal.aggregation, "HalfSum", HalfSum, raising=False)
    monkeypatch.setattr(mtlbal.aggregation, "__all__", [*mtlbal.aggregation.__all__, "HalfSum"])
    problem = cost.make_problem(3, batch=4, in_dim=5, hidden=6, depth=1, out_dim=2)
    runners = cost.build_variants(problem, strategies=["HalfSum"], torchjd=False)
    assert [r.name for r in runners] == ["plain", "HalfSum@cut", "HalfSum@params"]
    rows = cost.solver_times([4], device=torch.device("cpu"), reps=1, strategies=["HalfSum"])
    assert rows[0]["strategy"] == "HalfSum" and rows[0]["ms"] >= 0


def test_variants_take_the_same_first_step_as_plain_for_equal_weights() -> None:
    """Each variant owns a copy of the same model: equal weights must move it like plain."""
    problem = cost.make_problem(3, batch=4, in_dim=5, hidden=6, depth=2, out_dim=2)
    runners = {r.name: r for r in cost.build_variants(problem, strategies=["Equal"])}
    for r in runners.values():
        r.step()
    plain = dict(runners["plain"].model.named_parameters())
    for name, p in runners["Equal"].model.named_parameters():
        torch.testing.assert_close(p, plain[name], rtol=0, atol=0)


def test_memory_and_syncs_are_measured() -> None:
    problem = cost.make_problem(4, batch=16, in_dim=8, hidden=32, depth=2, out_dim=2)
    runners = {r.name: r for r in cost.build_variants(problem, strategies=["MGDA"], torchjd=False)}
    dev = torch.device("cpu")
    for r in runners.values():
        r.step()
    mem = {n: cost.peak_step_memory(r, dev)["alloc_peak_mib"] for n, r in runners.items()}
    # the per-task gradients of every trunk parameter (m copies) are live during the step
    assert mem["MGDA@params"] > mem["plain"] > 0
    syncs = {n: cost.count_host_syncs(r)["local_scalar_dense"] for n, r in runners.items()}
    assert syncs["plain"] == 0
    assert syncs["MGDA@params"] == 1  # the finiteness check (the NumPy copy is no event on CPU)


def test_run_returns_a_jsonable_report(tmp_path: Path) -> None:
    cfg = _tiny(ms=(2,), solver_ms=(4,), autogram=False)
    res = cost.run(
        strategies=["Equal", "MGDA", "torchjd"],
        seeds=[0],
        quick=True,
        out_dir=tmp_path,
        config=cfg,
        progress=False,
    )
    json.dumps(res)
    assert res["name"] == "cost"
    steps = [r for r in res["rows"] if r["section"] == "step"]
    variants = {r["variant"] for r in steps}
    assert {"plain", "Equal", "MGDA@cut", "MGDA@params"} <= variants
    for r in steps:
        if r["variant"] == "plain":
            assert r["ratio"] == 1.0
        assert r["ratio"] > 0 and math.isfinite(r["ms"])
    solvers = [r for r in res["rows"] if r["section"] == "solver"]
    assert [r["strategy"] for r in solvers] == ["MGDA"]
    # the issues' targets stay off the user's page; they are in res["targets"] (an internal note)
    assert "| variant |" in res["markdown"] and "Targets" not in res["markdown"]
    assert res["targets"] and "| target |" in cost.targets_markdown(res["rows"])
    assert Path(res["plots"]["scaling"]).stat().st_size > 0


def test_torchjd_rows_need_the_quadprog_projector(monkeypatch: pytest.MonkeyPatch) -> None:
    # TorchJD's UPGrad needs quadprog + qpsolvers (torchjd[quadprog_projector]): without them
    # the cost suite leaves its TorchJD rows out instead of failing in the middle of a run
    import sys

    # imported first, unblocked: blocking must not leave a crippled module behind for later tests
    import qpsolvers  # noqa: F401
    import torchjd.aggregation  # noqa: F401

    monkeypatch.setitem(sys.modules, "quadprog", None)
    assert not cost._has_torchjd()
    assert cost._torchjd_version() is None
    problem = cost.make_problem(2, batch=4, in_dim=5, hidden=6, depth=1, out_dim=2)
    names = [r.name for r in cost.build_variants(problem, strategies=["torchjd"])]
    assert names == ["plain"]
    monkeypatch.delitem(sys.modules, "quadprog")
    assert cost._has_torchjd()  # this environment has them: the rows come back
    names = [r.name for r in cost.build_variants(problem, strategies=["torchjd"])]
    assert "TorchJD UPGrad" in names


def test_every_shipped_strategy_is_built_for_the_cost_measurement() -> None:
    # classes with a required argument get its minimal value (COSMOS's λ, Constant's weights,
    # the robust aggregators' tolerance, CR-MOGM's wrapped method): none is left unmeasured
    for s in cost.discover_strategies():
        assert isinstance(s.build(4), torch.nn.Module), s.name
