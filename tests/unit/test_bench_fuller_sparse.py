"""Smoke tests of the multimodal and conflict benchmark suites (a few steps each)."""

from __future__ import annotations

import json
import pathlib

from benchmarks.suites import conflict, multimodal


def test_multimodal_suite_runs(tmp_path: pathlib.Path) -> None:
    res = multimodal.run(seeds=[0], quick=True, steps=3, out_dir=tmp_path)
    assert res["name"] == "multimodal"
    assert [r["strategy"] for r in res["rows"]] == multimodal.STRATEGIES
    assert res["markdown"].count("\n|") == len(multimodal.STRATEGIES) + 2  # header, rule, rows
    assert json.loads((tmp_path / "multimodal.json").read_text())["rows"] == res["rows"]
    json.dumps(res, allow_nan=False)
    fuller_row = res["rows"][-1]
    assert fuller_row["grad_ratio_B_A"] > 0  # the modality level ran and reported norms


def test_conflict_suite_runs() -> None:
    res = conflict.run(seeds=[0], quick=True, steps=3)
    assert res["name"] == "conflict"
    assert len(res["rows"]) == 2 * len(conflict.METHODS)
    for r in res["rows"]:
        assert 0.0 <= r["conflict_pct"] <= 100.0
        assert (r["trainable"] < 1.0) == (r["mask"] != "none")
    json.dumps(res, allow_nan=False)
