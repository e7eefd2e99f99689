"""The step as a transaction: staged gradient writes and a snapshot of the strategies.

Two pieces make :meth:`mtlbal.Balancer.backward` all-or-nothing:

* :class:`~mtlbal.engine.base.GradWrites` stages every ``.grad`` the step will produce (direct
  per-tensor additions, and the autograd backward calls that write through the graph); only its
  ``commit`` touches ``.grad``. Nothing before the commit writes a gradient.
* :class:`StrategySnapshot` — taken when the step starts, it records (by reference, no copy) the
  declared state of every strategy module, its plain attributes, its parameters and their
  ``.grad``, and the state of its random generator. If anything refuses the step before the
  commit, :meth:`StrategySnapshot.restore` puts all of it back, bitwise.

A strategy whose step must update state in place (IGB v2 trains its SAC agent inside the step)
declares ``step_snapshot = "copy"`` instead: its whole ``state_dict`` is copied when the step
starts and loaded back on refusal (exact, since resume == uninterrupted holds for every strategy).

The contract that makes a by-reference snapshot exact: **before the commit, a strategy replaces
its state, it never mutates it in place** (``self.ema = b * self.ema + …``, not
``self.ema.mul_(b)``). :meth:`StrategySnapshot.verify` checks that contract on every step (tensor
version counters: no copy, no host sync) and names the strategy and the state that broke it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["StrategySnapshot"]

# nn.Module's own bookkeeping: restored through the dedicated lists below, not as attributes
_MODULE_SLOTS = frozenset(
    {
        "_parameters",
        "_buffers",
        "_modules",
        "_non_persistent_buffers_set",
        "training",
    }
)


class _ModuleRecord:
    __slots__ = ("attrs", "buffers", "generator", "grads", "module", "params", "versions")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.attrs = {k: v for k, v in module.__dict__.items() if k not in _MODULE_SLOTS}
        self.buffers = dict(module._buffers)
        self.params = {n: (p, p.detach()) for n, p in module._parameters.items() if p is not None}
        self.grads = {n: p.grad for n, p in module._parameters.items() if p is not None}
        self.versions = _versions(module)
        gen = getattr(module, "_generator", None)
        self.generator = gen.get_state() if isinstance(gen, torch.Generator) else None


def _versions(module: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, b in module._buffers.items():
        if b is not None:
            out[f"buffer {name!r}"] = b._version
    for name, p in module._parameters.items():
        if p is None:
            continue
        out[f"parameter {name!r}"] = p._version
        if p.grad is not None:
            out[f"the .grad of parameter {name!r}"] = p.grad._version
    return out


class StrategySnapshot:
    """Everything the strategies could change during a step, recorded by reference."""

    def __init__(self, strategies: Iterable[nn.Module]) -> None:
        seen: set[int] = set()
        self._records: list[_ModuleRecord] = []
        self._copies: list[tuple[nn.Module, dict[str, Any]]] = []
        for s in strategies:
            if getattr(s, "step_snapshot", "reference") == "copy":
                seen.update(id(mod) for mod in s.modules())
                self._copies.append((s, copy.deepcopy(s.state_dict())))
                continue
            for mod in s.modules():
                if id(mod) not in seen:
                    seen.add(id(mod))
                    self._records.append(_ModuleRecord(mod))

    def verify(self) -> None:
        """Raise if a strategy mutated its declared state in place since the snapshot."""
        for rec in self._records:
            now = _versions(rec.module)
            for what, v in rec.versions.items():
                if what in now and now[what] != v:
                    current = _current(rec.module, what)
                    saved = _saved(rec, what)
                    if current is saved or (isinstance(current, int) and current == saved):
                        raise RuntimeError(
                            f"{type(rec.module).__name__} changed its {what} in place during the "
                            "step: strategies must replace their state before the commit stage "
                            "(x = f(x), not x.op_()), so that a refused step can be rolled back"
                        )

    def restore(self) -> None:
        """Put every recorded attribute, buffer, parameter, ``.grad`` and generator back."""
        for module, state in self._copies:
            module.load_state_dict(state)
        for rec in self._records:
            mod = rec.module
            for k in [k for k in mod.__dict__ if k not in _MODULE_SLOTS and k not in rec.attrs]:
                del mod.__dict__[k]
            mod.__dict__.update(rec.attrs)
            mod._buffers.clear()
            mod._buffers.update(rec.buffers)
            for name, (param, data) in rec.params.items():
                mod._parameters[name] = param
                if param.data.data_ptr() != data.data_ptr() or param.shape != data.shape:
                    with torch.no_grad():
                        param.data = data
                param.grad = rec.grads[name]
            if rec.generator is not None:
                gen = mod.__dict__.get("_generator")
                if isinstance(gen, torch.Generator):
                    gen.set_state(rec.generator)


def _current(module: nn.Module, what: str) -> Any:
    name = what.split("'")[1]
    if what.startswith("buffer"):
        return module._buffers.get(name)
    p = module._parameters.get(name)
    if what.startswith("the .grad"):
        return None if p is None else p.grad
    return None if p is None else p.data.data_ptr()


def _saved(rec: _ModuleRecord, what: str) -> Any:
    name = what.split("'")[1]
    if what.startswith("buffer"):
        return rec.buffers.get(name)
    if what.startswith("the .grad"):
        return rec.grads.get(name)
    entry = rec.params.get(name)
    return None if entry is None else entry[1].data_ptr()
