"""The examples in examples/ run and learn."""

from __future__ import annotations

import importlib.util
import pathlib

import torch

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs_and_learns() -> None:
    quickstart = _load("quickstart")
    before = quickstart.main(steps=1)
    after = quickstart.main(steps=150)
    for task in ("price", "volume", "label"):
        assert torch.isfinite(torch.tensor(after[task]))
    assert after["price"] < before["price"]
    assert after["volume"] < before["volume"]
