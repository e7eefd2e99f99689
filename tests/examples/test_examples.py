"""Every script in examples/ runs as a user runs it (a subprocess), briefly, and passes its own
checks (each script asserts what it shows and prints ``<name>: OK`` at the end).

To add an example: append a :class:`Script` to ``SCRIPTS`` (the last test fails for a script in
examples/ that is not listed).
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Script:
    file: str
    args: tuple[str, ...] = ()  # the short CI run
    needs: tuple[str, ...] = ()  # packages (from the test extra) without which it is skipped
    torchrun: bool = False  # run with torchrun, 2 processes

    @property
    def marker(self) -> str:
        return f"{Path(self.file).stem}: OK"


SCRIPTS = [
    Script("quickstart.py", ("--steps", "50")),
    Script("plain_loop.py", ("--epochs", "3")),
    Script("lightning_module.py", ("--steps", "20"), needs=("lightning",)),
    Script("hf_trainer.py", ("--steps", "10"), needs=("transformers", "accelerate")),
    Script("ddp_torchrun.py", ("--steps", "10"), torchrun=True),
    Script("amp.py", ("--steps", "20")),
    Script("accumulation.py", ("--steps", "5")),
    Script("grpo_toy.py", ("--steps", "100")),
]

# gloo's loopback transport occasionally aborts a worker at teardown on a loaded machine (see
# tests/distributed/_harness.py): torchrun then reports the signal; such a run is retried once
_KILLED = re.compile(r"Signal \d+ \(SIG[A-Z]+\) received by PID")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the checkout's mtlbal, whether or not it is installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def _run(cmd: list[str]) -> tuple[int, str]:
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout ends torchrun's workers too
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {TIMEOUT_S} s; output:\n{out}")
    return proc.returncode, out


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.file)
def test_example_runs(script: Script) -> None:
    for package in script.needs:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (it is in the test extra)")
    path = str(EXAMPLES / script.file)
    if script.torchrun:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        cmd = [sys.executable, *launcher, path, *script.args]
    else:
        cmd = [sys.executable, path, *script.args]
    rc, out = _run(cmd)
    if script.torchrun and rc != 0 and _KILLED.search(out):
        rc, out = _run(cmd)
    assert rc == 0, f"{' '.join(cmd)} exited with {rc}; output:\n{out}"
    assert script.marker in out, f"no {script.marker!r} in the output:\n{out}"


def test_every_example_is_listed() -> None:
    on_disk = {p.name for p in EXAMPLES.glob("*.py")}
    listed = {s.file for s in SCRIPTS}
    assert on_disk == listed, f"in examples/ but not in SCRIPTS: {sorted(on_disk - listed)}"
