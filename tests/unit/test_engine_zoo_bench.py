"""Smoke run of the engine zoo benchmark at toy size (not a timing)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchjd")

from benchmarks import engine_zoo


def test_engine_zoo_runs_at_toy_size() -> None:
    threads = torch.get_num_threads()
    try:
        table = engine_zoo.main(
            ["--quick", "--batch", "4", "--tasks", "2", "--rounds", "1", "--no-memory"]
        )
    finally:
        torch.set_num_threads(threads)
    rows = table.splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["mlp", "cnn", "transformer"]
    for r in rows:  # the engines agree with the per-task loop on the update
        assert float(r.split("|")[-2]) < 1e-4
