"""The report and the command's summary from hand-made suite results (no training), the plot
style, and the reference-heads option."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch
from benchmarks import common, report
from benchmarks import strategies as S

import mtlbal


def _row(s: str, diff: float, half: float, verdict: str, **kw: Any) -> dict[str, Any]:
    return {
        "strategy": s,
        "delta_m": 1.0 + diff,
        "vs_ref": diff,
        "vs_ref_low": diff - half,
        "vs_ref_high": diff + half,
        "verdict": verdict,
        "group": "a",
        **kw,
    }


def _results(n_strategies: int = 12) -> list[dict[str, Any]]:
    names = list(S.STRATEGIES)[1 : n_strategies + 1]
    a = [{"strategy": "Equal", "delta_m": 1.0, "vs_ref": 0.0, "verdict": "reference"}]
    a += [_row(s, -0.1 * i, 0.5, "indistinguishable") for i, s in enumerate(names)]
    b = [{"strategy": "Equal", "delta_m": 3.0, "vs_ref": 0.0, "verdict": "reference"}]
    b += [_row("UW", -2.0, 0.4, "better"), _row("MGDA", 3.0, 1.0, "worse")]
    b += [_row(s, 0.1, 0.5, "indistinguishable") for s in names if s not in ("UW", "MGDA")]
    cost_rows = [
        {"section": "step", "family": "f", "m": m, "strategy": cls, "at": at, "ratio": r}
        for m in (2, 8)
        for cls, at, r in (
            ("MGDA", "params", 1.8 * m / 2),
            ("MGDA", "cut", 1.2),
            ("UncertaintyWeighting", "params", 1.01),
        )
    ]
    return [
        {
            "name": "flat",
            "summary": a,
            "markdown": "### flat\n",
            "stats": {"seeds": 3, "detectable": 4.25},
        },
        {"name": "scaled", "summary": b, "markdown": "### scaled\n"},
        {
            "name": "cost",
            "rows": cost_rows,
            "markdown": "### cost\n\n### Targets\n\n| t | m |\n\n### next\n",
        },
        {"name": "toyish", "overview": {"title": "on the front", "cells": {"UW": "5/5"}}},
    ]


def test_overview_shows_intervals_verdicts_and_counts() -> None:
    table = report.overview(_results())
    assert "| UW |" in table and "-2.00 [-2.40, -1.60] better" in table
    assert "+3.00 [+2.00, +4.00] worse" in table
    assert "0 (ref.)" in table and "toyish: on the front" in table and "5/5" in table
    # the last row counts the strategies that differ after Holm, per suite
    last = table.splitlines()[-1]
    assert last.startswith("| *differ from Equal (Holm)*") and "| 0/12 | 2/12 |" in last, last
    assert table.splitlines()[2].startswith("| Equal |")  # the reference first


def test_advice_is_drawn_from_the_numbers() -> None:
    text = report.advice(_results())
    assert "*scaled*: better than Equal: UW; worse: MGDA" in text
    assert "Where no strategy beats Equal (flat)" in text
    assert (
        "MGDA: 1.20× at m=2, 1.20× at m=8 at the cut point against 1.80× at m=2, 7.20× at m=8"
        in text
    )
    assert "UncertaintyWeighting: 1.01× at m=2" in text
    assert "mtlbal.diagnostics.ConflictIncidence" in text
    # without results it says so instead of inventing numbers
    empty = report.advice([])
    assert "No accuracy suite" in empty and "did not run" in empty


def test_page_leaves_out_targets_and_summary_is_short(tmp_path: pathlib.Path) -> None:
    res = _results(30)
    page = report.build(res, {"command": "python -m benchmarks"}, tmp_path)
    assert "### Targets" not in page and "### next" in page
    assert page.index("## Overview") < page.index("## Choosing a balancer: what")
    res[2]["skipped"] = {"CAGrad@cut m=64": "too slow"}
    text = report.summary(res, tmp_path / "index.md", 12.0)
    assert "flat" in text and "3 seeds detect ≥ 4.2 points" in text
    assert "1 variant(s) not measured" in text
    assert len(text.splitlines()) <= 45 and "full report" in text


def test_every_strategy_has_its_own_colour_and_marker() -> None:
    names = [common.STL, *S.STRATEGIES]
    styles = [common.style(n) for n in names]
    assert len({(tuple(c), m) for c, m in styles}) == len(names)


def test_the_quick_rows_have_distinct_colours() -> None:
    # `make bench` plots these together: a colour shared by two of them reads as one strategy
    names = [common.STL, *S.QUICK]
    colours = [common.style(n)[0] for n in names]
    assert len(set(colours)) == len(names)


def test_forest_plot_is_written(tmp_path: pathlib.Path) -> None:
    rows = _results()[1]["summary"]
    path = tmp_path / "f.png"
    common.plot_delta_m(rows, path, "scaled")
    assert path.stat().st_size > 5000


def test_weight_heads_scales_each_head_by_its_gradient_weight() -> None:
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 6)
    heads = torch.nn.ModuleList([torch.nn.Linear(6, 1) for _ in range(2)])
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def losses() -> list[torch.Tensor]:
        z = trunk(x)
        return [(h(z)[:, 0] - y[:, t]).pow(2).mean() * (1 + 9 * t) for t, h in enumerate(heads)]

    # each head's own gradient, by autograd on its loss alone
    raw = [torch.autograd.grad(loss, list(h.parameters())) for loss, h in zip(losses(), heads)]
    balancer = mtlbal.Balancer(trunk, aggregator=mtlbal.aggregation.MGDA())
    info = balancer.backward(losses())
    w = info.grad_weights
    assert w is not None and not torch.allclose(w[0], w[1])
    for h, g in zip(heads, raw):  # mtlbal: the raw gradient
        for p, gp in zip(h.parameters(), g):
            torch.testing.assert_close(p.grad, gp)
    common.weight_heads(list(heads), info)
    for t, (h, g) in enumerate(zip(heads, raw)):  # the reference's: w_t ∇L_t
        for p, gp in zip(h.parameters(), g):
            torch.testing.assert_close(p.grad, w[t] * gp)


def test_weight_heads_leaves_loss_weightings_alone() -> None:
    head = torch.nn.Linear(2, 1)
    head.weight.grad = torch.ones_like(head.weight)

    class Info:
        grad_weights = None

    common.weight_heads([head], Info())
    assert torch.equal(head.weight.grad, torch.ones_like(head.weight))


@pytest.mark.parametrize("heads", ["raw", "reference"])
def test_train_one_with_reference_heads(heads: str) -> None:
    problem = common.Problem(
        "p",
        [common.TaskSpec("a", "mse", "mse"), common.TaskSpec("b", "ce", "acc", out_dim=3)],
        torch.randn(64, 5),
        torch.stack([torch.randn(64), torch.randint(0, 3, (64,)).float()], 1),
        torch.randn(16, 5),
        torch.stack([torch.randn(16), torch.randint(0, 3, (16,)).float()], 1),
        hidden=(8,),
    )
    cfg = common.TrainConfig(epochs=1, batch_size=32)
    a = common.train_one(problem, "NashMTL", 0, cfg, heads=heads)  # type: ignore[arg-type]
    b = common.train_one(problem, "NashMTL", 0, cfg, heads="raw")
    same = a["a/mse"] == b["a/mse"]
    assert same == (heads == "raw")
    # a strategy whose reference does not weight heads is unchanged by the option
    c = common.train_one(problem, "UPGrad", 0, cfg, heads="reference")
    d = common.train_one(problem, "UPGrad", 0, cfg, heads="raw")
    assert c["a/mse"] == d["a/mse"]


def test_report_only_refreshes_old_tables_once() -> None:
    from benchmarks import __main__ as cli

    rows = []
    for seed, (stl, eq, x) in enumerate([(0.9, 0.8, 0.85), (0.91, 0.82, 0.86), (0.9, 0.81, 0.9)]):
        rows += [
            {"strategy": s, "seed": seed, "a/acc": v, "b/mae": 1.0, "wall_s": 0.1}
            for s, v in (("STL", stl), ("Equal", eq), ("X", x))
        ]
    old = "### old\n\n| strategy | a/acc ↑ | MR ↓ |\n|---|---|---|\n| X | 0.8 | 1.0 |\n\ntail\n"
    res: dict[str, Any] = {"name": "old", "rows": rows, "markdown": old}
    cli.refresh_tables(res)
    cli.attach_stats(res)
    md = res["markdown"]
    assert "MR ↓" not in md and "Δm% − Equal [95% CI]" in md and md.endswith("tail\n")
    assert "Against Equal" in md and res["stats"]["seeds"] == 3
    x = next(r for r in res["summary"] if r["strategy"] == "X")
    # Δm% per seed against the mean STL accuracy (0.9033…): X − Equal in points of Δm% (÷ 2
    # metrics, the MAE is unchanged)
    base = (0.9 + 0.91 + 0.9) / 3
    diffs = [100 * (e - v) / base / 2 for e, v in ((0.8, 0.85), (0.82, 0.86), (0.81, 0.9))]
    assert x["vs_ref"] == pytest.approx(sum(diffs) / 3)
    cli.refresh_tables(res)  # a second refresh changes nothing
    assert res["markdown"] == md


def test_cost_suite_gets_the_classes_of_the_rows() -> None:
    from benchmarks import __main__ as cli

    assert cli.class_names(None) is None
    assert cli.class_names(["Equal", "UW", "DB-MTL", "MGDA-UB", "MGDA"]) == [
        "Equal",
        "UncertaintyWeighting",
        "ScaleInvariant",
        "DBMTL",
        "MGDA",
    ]
