"""Shared fixtures: a small trunk + heads model and its losses."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import settings
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(min(2, torch.get_num_threads()))

# Property tests draw a fixed sequence of examples: a run (CI's included) is reproducible, and a
# failure seen once is seen again. HYPOTHESIS_PROFILE=explore draws fresh examples instead.
settings.register_profile("default", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@dataclass
class Problem:
    trunk: nn.Module
    heads: nn.ModuleList
    x: Tensor
    ys: list[Tensor]

    def params(self) -> list[nn.Parameter]:
        return [*self.trunk.parameters(), *self.heads.parameters()]

    def losses(self, x: Tensor | None = None) -> dict[str, Tensor]:
        z = self.trunk(self.x if x is None else x)
        out = {}
        for t, (h, y) in enumerate(zip(self.heads, self.ys)):
            pred = h(z)
            # different scales per task: imbalance matters for the strategies
            out[f"task{t}"] = (t + 1.0) * (pred - y).pow(2).mean() + 0.1 * (t + 1)
        return out

    def zero_grad(self) -> None:
        for p in self.params():
            p.grad = None

    def grads(self) -> list[Tensor]:
        return [
            p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.params()
        ]


def make_problem(
    m: int = 3, *, seed: int = 0, dtype: torch.dtype = torch.float32, batch: int = 16
) -> Problem:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(10, 2) for _ in range(m)])
    trunk.to(dtype)
    heads.to(dtype)
    x = torch.randn(batch, 6, generator=g, dtype=dtype)
    ys = [torch.randn(batch, 2, generator=g, dtype=dtype) for _ in range(m)]
    return Problem(trunk, heads, x, ys)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested containers of tensors (dtype and shape included)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture
def problem_factory() -> Callable[..., Problem]:
    return make_problem


@pytest.fixture(scope="session")
def ddp_session(request: pytest.FixtureRequest) -> dict[str, list[Any]]:
    """One pair of gloo processes for the whole distributed session: every selected test module
    that defines ``_worker(rank)`` runs in it (spawning and importing torch twice is most of the
    cost). Lives here, not in ``distributed/conftest.py``: a second module named ``conftest``
    would shadow this one for ``from conftest import …``."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
    from _harness import run_modules, spawn

    modules = sorted(
        {
            item.module.__name__
            for item in request.session.items
            if isinstance(item, pytest.Function) and hasattr(item.module, "_worker")
        }
    )
    per_rank = spawn(run_modules, modules, deadline=120.0 + 120.0 * len(modules))
    return {m: [r[m] for r in per_rank] for m in modules}
