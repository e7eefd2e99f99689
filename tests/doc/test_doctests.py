"""Every module's docstring examples run (the runnable example each method file carries)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import mtlbal

MODULES = sorted(m.name for m in pkgutil.walk_packages(mtlbal.__path__, prefix="mtlbal."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest failure(s) in {name}"
    parts = name.split(".")
    is_method_file = (
        len(parts) == 3
        and parts[1] in ("aggregation", "weighting", "transforms")
        and parts[2] != "base"
        and not parts[2].startswith("_")
    )
    if is_method_file:
        assert result.attempted > 0, f"{name} has no runnable example in its docstrings"
