"""Declared, persistent state for every strategy (torchmetrics style).

A strategy subclasses :class:`Stateful` (an :class:`torch.nn.Module`) and declares each piece of
state once with :meth:`Stateful.add_state`. Declared state is

* saved by ``state_dict()`` and restored by ``load_state_dict()``, even when its shape was not
  known at construction (state that is created lazily on the first step, e.g. ``L(0)`` of
  GradNorm, starts as ``None`` and is restored with the shape it had when saved);
* put back to its default by ``reset()``;
* moved by ``.to(device)`` like any buffer.

Non-tensor state (a random generator, a replay buffer, Python counters) is kept by overriding
:meth:`Stateful.extra_state` / :meth:`Stateful.load_extra_state`; it travels in the same
``state_dict`` under ``_extra_state``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Stateful"]


class Stateful(nn.Module):
    """Base class of every strategy: weightings, aggregators and transforms.

    Attributes:
        step_snapshot: how the Balancer makes a step all-or-nothing for this strategy.
            ``"reference"`` (default, free): before the commit stage the strategy *replaces*
            its state (``x = f(x)``), never mutates it in place, so the previous tensors can be
            put back; the Balancer checks this on every step. ``"copy"``: the strategy updates
            state in place during the step, so its ``state_dict`` is copied when a step starts
            and loaded back if the step is refused.
    """

    step_snapshot: str = "reference"

    def __init__(self) -> None:
        super().__init__()
        self._state_defaults: dict[str, Tensor | None] = {}
        self._generator: torch.Generator | None = None
        self._generator_seed: int | None = None

    # ------------------------------------------------------------------ randomness
    def add_generator(self, seed: int | None) -> torch.Generator:
        """Declare the strategy's random generator (CPU), seeded by ``seed`` (``None``: from
        the OS). Its state travels in ``state_dict`` and ``reset()`` reseeds it."""
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        self._generator, self._generator_seed = gen, seed
        return gen

    # ------------------------------------------------------------------ declared tensor state
    def add_state(self, name: str, default: Tensor | None) -> None:
        """Declare a persistent tensor state ``name`` with its ``default`` (``None`` = lazy)."""
        if name in self._state_defaults:
            raise ValueError(f"state {name!r} is declared twice")
        self._state_defaults[name] = None if default is None else default.detach().clone()
        self.register_buffer(name, None if default is None else default.detach().clone())

    @property
    def is_stateful(self) -> bool:
        """Whether the strategy carries state across steps (declared state or parameters)."""
        return bool(self._state_defaults) or any(True for _ in self.parameters())

    def reset(self) -> None:
        """Put every declared state back to its default. Parameters are left to the subclass."""
        for name, default in self._state_defaults.items():
            value = None if default is None else default.clone()
            current = getattr(self, name)
            if value is not None and current is not None:
                value = value.to(current.device)
            setattr(self, name, value)
        if self._generator is not None and self._generator_seed is not None:
            self._generator.manual_seed(self._generator_seed)
        self.reset_extra()

    def reset_extra(self) -> None:
        """Reset non-tensor state; subclasses with extra state override this."""

    # ------------------------------------------------------------------ extra (non-tensor) state
    def extra_state(self) -> dict[str, Any]:
        """Non-tensor state to save; subclasses override."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned; subclasses override."""

    def get_extra_state(self) -> Any:
        state = dict(self.extra_state())
        if self._generator is not None:
            state["_generator"] = self._generator.get_state()
        return state

    def set_extra_state(self, state: Any) -> None:
        state = dict(state)
        gen_state = state.pop("_generator", None)
        if self._generator is not None and gen_state is not None:
            self._generator.set_state(gen_state)
        self.load_extra_state(state)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Lazily-shaped state: adopt the saved tensor (shape included) instead of copying into
        # a buffer whose shape may still be unknown.
        for name in self._state_defaults:
            key = prefix + name
            if key in state_dict:
                value = state_dict.pop(key)
                current = getattr(self, name)
                device = current.device if current is not None else None
                setattr(self, name, None if value is None else value.detach().clone().to(device))
            elif self._state_defaults[name] is None:
                # saved while still unset: a resumed run must also see it unset
                setattr(self, name, None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for name in self._state_defaults:
            key = prefix + name
            if key in missing_keys:
                missing_keys.remove(key)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())

    def hparams(self) -> dict[str, Any]:
        """Hyper-parameters shown in ``repr``; subclasses override."""
        return {}
