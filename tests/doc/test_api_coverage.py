"""Every public name has an entry in the API pages (docs/api/*.md), and every entry is public.

The public surface: ``mtlbal.__all__``, and the ``__all__`` of every public module (the modules
in ``mtlbal.__all__`` and ``mtlbal.logging``). An entry is a mkdocstrings directive
``::: module.Name``; each public module has its page ``docs/api/<module>.md`` in the site's nav.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import types
from pathlib import Path

import mtlbal

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "docs" / "api"
DIRECTIVE = re.compile(r"^:::\s+(\S+)\s*$", re.M)

_SUBMODULES = {
    f"mtlbal.{n}" for n in mtlbal.__all__ if isinstance(getattr(mtlbal, n), types.ModuleType)
}
MODULES = ["mtlbal", *sorted(_SUBMODULES | {"mtlbal.logging"})]
# the integrations whose framework is installed (the test extra installs them all)
if importlib.util.find_spec("lightning") is not None:
    MODULES.append("mtlbal.integrations.lightning")


def public_names() -> set[str]:
    names = set()
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for n in mod.__all__:
            if n == "__version__" or isinstance(getattr(mod, n), types.ModuleType):
                continue
            names.add(f"{mod_name}.{n}")
    return names


def directives() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for page in sorted(API.glob("*.md")):
        for target in DIRECTIVE.findall(page.read_text()):
            assert target not in found, f"{target} has two entries ({found[target]}, {page})"
            found[target] = page
    return found


def test_every_public_name_has_an_api_entry() -> None:
    missing = sorted(public_names() - set(directives()))
    assert not missing, (
        "public names without an entry in docs/api/*.md (add '::: <name>' to the module's "
        "page): " + ", ".join(missing)
    )


def test_every_api_entry_is_public() -> None:
    stale = sorted(set(directives()) - public_names())
    assert not stale, "API entries for names that are not public: " + ", ".join(stale)


def test_entries_are_on_their_module_page() -> None:
    for target, page in directives().items():
        module = target.rsplit(".", 1)[0]
        assert page.stem == module.rsplit(".", 1)[-1], f"{target} is on {page.name}"


def test_every_public_module_has_a_page_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for mod_name in MODULES:
        page = f"api/{mod_name.rsplit('.', 1)[-1]}.md"
        assert (ROOT / "docs" / page).is_file(), f"{mod_name}: no page docs/{page}"
        assert re.search(rf":\s*{re.escape(page)}\s*$", nav, re.M), f"{page} is not in the nav"
