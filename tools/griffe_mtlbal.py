"""A griffe extension for the docs site (mkdocs.yml loads it): reads the library's docstrings as
written.

* ``Example:`` (the section name the method files use) is read as the Google ``Examples:``
  section, so its ``>>>`` lines render as code;
* Sphinx roles (``:class:`~mtlbal.step.Need```, ``:meth:`x```, …) render as inline code (the
  last component when the target starts with ``~``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|attr|mod|data|exc|obj):`(~?)([^`]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class MtlbalDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is None:
            return
        value = _EXAMPLE.sub(r"\1Examples:", doc.value)
        doc.value = _ROLE.sub(_role, value)
