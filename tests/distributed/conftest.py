"""One pair of gloo processes for the whole distributed session: every selected test module that
defines ``_worker(rank)`` runs in it (spawning and importing torch twice is most of the cost)."""

from __future__ import annotations

from typing import Any

import pytest
from _harness import run_modules, spawn


@pytest.fixture(scope="session")
def ddp_session(request: pytest.FixtureRequest) -> dict[str, list[Any]]:
    modules = sorted(
        {
            item.module.__name__
            for item in request.session.items
            if isinstance(item, pytest.Function) and hasattr(item.module, "_worker")
        }
    )
    per_rank = spawn(run_modules, modules, deadline=120.0 + 120.0 * len(modules))
    return {m: [r[m] for r in per_rank] for m in modules}
