"""Every ```python block of the docs runs.

The blocks of one page run in order, in one namespace (as one script), in a temporary working
directory. A fragment that is not meant to run (it uses your ``model``) is fenced
```` ```python notest ````; other languages (bash, toml) never run. The convention is documented
in docs/contributing-docs.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([*(ROOT / "docs").rglob("*.md"), ROOT / "README.md"])
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")


def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(first line number, info string, code)`` of every fenced block of a Markdown page."""
    blocks: list[tuple[int, str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, indent, info = m["fence"], len(m["indent"]), m["info"].strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence) and set(lines[j].strip()) == {fence[0]}
        ):
            body.append(lines[j][indent:])
            j += 1
        if j == len(lines):
            raise ValueError(f"unclosed code fence opened on line {i + 1}")
        blocks.append((i + 2, info, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def runnable(info: str) -> bool:
    return info.split() == ["python"]


def _pages_with_code() -> list[Path]:
    return [p for p in PAGES if any(runnable(b[1]) for b in code_blocks(p.read_text()))]


def test_the_fence_convention() -> None:
    """Python blocks are either run (``python``) or marked (``python notest``): nothing else."""
    for page in PAGES:
        for line, info, _ in code_blocks(page.read_text()):
            words = info.split()
            if words[:1] in (["python"], ["py"], ["python3"], ["pycon"]):
                assert words in (["python"], ["python", "notest"]), (
                    f"{page.relative_to(ROOT)}:{line}: fence '{info}': use 'python' (run by "
                    "the tests) or 'python notest' (a fragment)"
                )


def test_the_block_parser() -> None:
    text = "a\n```python\nx = 1\n```\n\n```python notest\nmodel\n```\n  ```bash\n  ls\n  ```\n"
    assert code_blocks(text) == [
        (3, "python", "x = 1\n"),
        (7, "python notest", "model\n"),
        (10, "bash", "ls\n"),
    ]


@pytest.mark.parametrize("page", _pages_with_code(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_page_code_runs(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    rel = str(page.relative_to(ROOT))
    for line, info, code in code_blocks(page.read_text()):
        if runnable(info):
            # padded so that a traceback points at the page's own line numbers
            exec(compile("\n" * (line - 1) + code, rel, "exec"), namespace)
