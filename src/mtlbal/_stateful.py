"""Declared, persistent state for every strategy (torchmetrics style).

A strategy subclasses :class:`Stateful` (an :class:`torch.nn.Module`) and declares each piece of
state once with :meth:`Stateful.add_state`. Declared state is

* saved by ``state_dict()`` and restored by ``load_state_dict()``, even when its shape was not
  known at construction (state that is created lazily on the first step, e.g. ``L(0)`` of
  GradNorm, starts as ``None`` and is restored with the shape it had when saved);
* put back to its default by ``reset()``;
* moved by ``.to(device, dtype)`` like any buffer, its default (what ``reset()`` restores) too.

Non-tensor state (a random generator, a replay buffer, Python counters) is kept by overriding
:meth:`Stateful.extra_state` / :meth:`Stateful.load_extra_state`; it travels in the same
``state_dict`` under ``_extra_state``, together with a record of which strategy saved it
(``"_strategy"``: the class's qualified name) and its configuration (``"_config"``: the
:meth:`Stateful.hparams` dict, plus ``num_tasks`` when the strategy has one, made of plain
Python values).

``load_state_dict`` checks the whole state before it assigns anything (see
:meth:`Stateful.check_state_dict`): a refused state leaves the strategy bitwise unchanged.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

__all__ = ["Stateful"]

# entries of ``_extra_state`` written by the base class (the rest is the subclass's extra_state)
_STRATEGY = "_strategy"
_CONFIG = "_config"
_GENERATOR = "_generator"
_RESERVED = (_STRATEGY, _CONFIG, _GENERATOR)
_EXTRA = "_extra_state"


class Stateful(nn.Module):
    """Base class of every strategy: weightings, aggregators and transforms.

    Attributes:
        needs: what the strategy needs from the step (a frozenset of
            :class:`mtlbal.step.Need`): the Balancer computes what its strategies declared and
            hands it over in one :class:`mtlbal.step.StepContext`.
        step_snapshot: how the Balancer makes a step all-or-nothing for this strategy.
            ``"reference"`` (default, free): before the commit stage the strategy *replaces*
            its state (``x = f(x)``), never mutates it in place, so the previous tensors can be
            put back; the Balancer checks this on every step. ``"copy"``: the strategy updates
            state in place during the step, so its ``state_dict`` is copied when a step starts
            and loaded back if the step is refused.
    """

    step_snapshot: str = "reference"
    #: what the strategy needs from the step (:class:`mtlbal.step.Need`); the Balancer computes
    #: exactly the union of its strategies' needs
    needs: frozenset[Any] = frozenset()

    #: entries of :meth:`config` that ``load_state_dict`` does not compare: a seed only says
    #: where a fresh (or reset) random stream starts, the saved generator state says where it is
    config_not_compared: tuple[str, ...] = ("seed",)

    #: whether a step may leave some tasks out (missing labels: see "Missing tasks" in the
    #: concepts page). ``True``: the strategy reads ``StepContext.present`` and touches only the
    #: present tasks' state; ``False``: such a step is refused, with :attr:`missing_tasks_note`
    #: as the reason; ``None`` (default): supported exactly when the strategy keeps no state
    #: (:attr:`is_stateful` is false), since it then only ever sees the present tasks' losses
    supports_missing_tasks: bool | None = None
    #: why a strategy that does not support missing tasks cannot (shown in the refusal)
    missing_tasks_note: str = "it keeps per-task state and does not declare supports_missing_tasks"

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
    def add_state(self, name: str, default: Tensor | None, *, per_task: bool = True) -> None:
        """Declare a persistent tensor state ``name`` with its ``default`` (``None`` = lazy).

        ``per_task=False``: a lazy state whose first dimension is not the task count (a
        history that grows: CoBa's validation losses); a loaded one may have any shape."""
        if name in self._state_defaults:
            raise ValueError(f"state {name!r} is declared twice")
        if not per_task:
            self.__dict__.setdefault("_free_shape_states", set()).add(name)
        self._state_defaults[name] = None if default is None else default.detach().clone()
        self.register_buffer(name, None if default is None else default.detach().clone())

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # .to(), .double(), .cuda(), … move the declared defaults with the state, so that
        # reset() restores them on the state's device and in its dtype
        out = super()._apply(fn, recurse)
        for name, default in self._state_defaults.items():
            if default is not None:
                self._state_defaults[name] = fn(default)
        return out

    @property
    def is_stateful(self) -> bool:
        """Whether the strategy carries state across steps (declared state or parameters)."""
        return bool(self._state_defaults) or any(True for _ in self.parameters())

    @property
    def handles_missing_tasks(self) -> bool:
        """Whether a step without some tasks' losses is accepted (``supports_missing_tasks``,
        or, when that is ``None``, a strategy without state)."""
        flag = self.supports_missing_tasks
        return (not self.is_stateful) if flag is None else bool(flag)

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
            state[_GENERATOR] = self._generator.get_state()
        state[_STRATEGY] = type(self).__qualname__
        state[_CONFIG] = self.config()
        return state

    def set_extra_state(self, state: Any) -> None:
        state = dict(state)
        state.pop(_STRATEGY, None)
        state.pop(_CONFIG, None)
        gen_state = state.pop(_GENERATOR, None)
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

    #: constructor arguments that are not configuration data (tensors or modules that pick what
    #: the strategy acts on, callables): :meth:`hparams` leaves them out, so ``repr`` does not
    #: show them and ``eval(repr(s))`` builds the strategy without them
    repr_omits: tuple[str, ...] = ()

    def extra_repr(self) -> str:
        """The constructor arguments that differ from their defaults, by name, in the
        constructor's order (an argument without a default is always shown), so that
        ``eval(repr(s))`` with the strategy classes in scope builds an equal strategy."""
        hp = self.hparams()
        parts = []
        shown = set()
        for name, param in inspect.signature(type(self).__init__).parameters.items():
            if name == "self" or name not in hp:
                continue
            shown.add(name)
            value = hp[name]
            default = param.default
            if default is not inspect.Parameter.empty and _plain(value) == _plain(default):
                continue
            parts.append(f"{name}={_repr_value(value)}")
        parts += [f"{k}={_repr_value(v)}" for k, v in hp.items() if k not in shown]
        return ", ".join(parts)

    def hparams(self) -> dict[str, Any]:
        """The configuration: every constructor argument (by its name) that is plain data
        (numbers, strings, ``None``, tuples and lists of them; not :attr:`repr_omits`), with
        its current value. ``repr`` shows the entries that differ from the constructor's
        defaults; ``state_dict`` records all of them (:meth:`config`). Subclasses override."""
        return {}

    def config(self) -> dict[str, Any]:
        """The configuration recorded in ``state_dict`` and checked by ``load_state_dict``:
        :meth:`hparams` (plus ``num_tasks`` when the strategy has that attribute), as plain
        Python values (tuples as lists, tensors as nested lists, dtypes and other objects as
        text)."""
        out = {str(k): _plain(v) for k, v in self.hparams().items()}
        if "num_tasks" not in out and hasattr(self, "num_tasks"):
            out["num_tasks"] = _plain(self.num_tasks)
        return out

    # ------------------------------------------------------------------ loading, checked
    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Restore a state saved by :meth:`state_dict`, after checking all of it.

        Everything is checked before anything is assigned (:meth:`check_state_dict`); when a
        check fails, a ``ValueError`` names the strategy, the key and the problem (all the
        problems found, one a line) and the strategy is left bitwise unchanged (parameters,
        buffers, declared state, generator, extra state).

        Args:
            state_dict: what :meth:`state_dict` returned (possibly through ``torch.save``).
            strict: as for :class:`torch.nn.Module`: missing and unexpected keys are errors,
                and so is a configuration (:meth:`config`) other than the saved one. With
                ``strict=False`` the keys present are loaded, the others are left as they are
                and reported, and a different configuration is tolerated; the strategy class,
                shapes, dtype categories, the generator state and the completeness of the
                extra state (a subclass's ``load_extra_state`` takes all of it) are checked
                either way. The entries of :attr:`config_not_compared` (the seed) are never
                compared: the saved generator state is what counts.
            assign: not supported (``True`` raises); present for signature compatibility.

        Returns:
            ``(missing_keys, unexpected_keys)`` like :meth:`torch.nn.Module.load_state_dict`
            (both empty under ``strict=True``). A missing or unexpected entry of the extra
            state is reported as ``"_extra_state['name']"``.
        """
        if assign:
            raise ValueError(
                f"{type(self).__qualname__}: load_state_dict(assign=True) is not supported"
            )
        keys = self.check_state_dict(state_dict, strict)
        snapshot = self._snapshot()
        try:
            self._assign_state(state_dict)
        except BaseException:
            self._restore(snapshot)
            raise
        return keys

    def check_state_dict(self, state_dict: Any, strict: bool = True) -> _IncompatibleKeys:
        """Check ``state_dict`` as :meth:`load_state_dict` would, without loading it.

        Checked: it is a mapping; the saved strategy class is this one; the configuration is
        the same (``strict``); the set of keys (``strict``); each tensor's shape (a declared
        state whose value is set, a parameter or a buffer must keep its shape; a lazily-shaped
        state that is still unset adopts the saved shape, which must have ``num_tasks`` entries
        along its first dimension when the strategy knows its task count); each tensor's dtype
        category (floating, complex, integer, bool: a float state cannot be loaded from an
        integer one; within the category a parameter or buffer is cast by the copy, a declared
        state adopts the saved tensor); the generator state (a valid state of the same size).
        Top-level tensors of the extra state are checked for their dtype category only.

        Raises:
            ValueError: listing every problem found.
        """
        errors, missing, unexpected = self._check_state(state_dict, strict)
        if errors:
            raise ValueError(_join(errors))
        return _IncompatibleKeys(missing, unexpected)

    def _check_state(self, state: Any, strict: bool) -> tuple[list[str], list[str], list[str]]:
        """The problems with ``state`` (errors, missing keys, unexpected keys); no side effect."""
        top = type(self).__qualname__
        if not isinstance(state, Mapping):
            return (
                [f"{top}: a state_dict must be a mapping, got {type(state).__name__}"],
                [],
                [],
            )
        errors: list[str] = []
        missing: list[str] = []
        unexpected: list[str] = []
        expected: set[str] = set()
        for prefix, mod in self.named_modules():
            pre = prefix + "." if prefix else ""
            who = top if not prefix else f"{top} ({prefix}: {type(mod).__qualname__})"
            declared = mod._state_defaults if isinstance(mod, Stateful) else {}
            num_tasks = getattr(mod, "num_tasks", None)
            if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
                num_tasks = None
            for name, param in mod._parameters.items():
                if param is None:
                    continue
                key = pre + name
                expected.add(key)
                if key not in state:
                    missing.append(key)
                    continue
                errors += _check_tensor(who, "parameter", key, state[key], param)
            for name, buf in mod._buffers.items():
                if name in mod._non_persistent_buffers_set:
                    continue
                key = pre + name
                if name in declared:
                    expected.add(key)
                    default = declared[name]
                    ref = buf if buf is not None else default
                    if key not in state:
                        if default is not None:  # absent means "unset" only for lazy state
                            missing.append(key)
                        continue
                    value = state[key]
                    if value is None and default is None:
                        continue
                    if ref is not None:
                        errors += _check_tensor(who, "state", key, value, ref)
                        continue
                    errors += _check_tensor(who, "state", key, value, None)
                    if (
                        isinstance(value, Tensor)
                        and num_tasks is not None
                        and name not in mod.__dict__.get("_free_shape_states", ())
                        and (value.dim() == 0 or value.shape[0] != num_tasks)
                    ):
                        errors.append(
                            f"{who}: state {key!r} has shape {_shape(value)}, expected "
                            f"{num_tasks} entries (num_tasks) along its first dimension"
                        )
                    continue
                if buf is None:
                    continue  # torch does not save a None buffer
                expected.add(key)
                if key not in state:
                    missing.append(key)
                    continue
                errors += _check_tensor(who, "buffer", key, state[key], buf)
            if type(mod).get_extra_state is not nn.Module.get_extra_state:
                key = pre + _EXTRA
                expected.add(key)
                if key not in state:
                    missing.append(key)
                elif isinstance(mod, Stateful):
                    e, mi, un = mod._check_extra(who, key, state[key], strict)
                    errors += e
                    missing += mi
                    unexpected += un
        unexpected += [str(k) for k in state if k not in expected]
        if strict:
            errors += [f"{top}: missing state {k!r}" for k in missing]
            errors += [f"{top}: unexpected state {k!r}" for k in unexpected]
        return errors, missing, unexpected

    def _check_extra(
        self, who: str, key: str, saved: Any, strict: bool
    ) -> tuple[list[str], list[str], list[str]]:
        if not isinstance(saved, Mapping):
            return [f"{who}: state {key!r} must be a mapping, got {type(saved).__name__}"], [], []
        errors: list[str] = []
        missing: list[str] = []
        unexpected: list[str] = []
        cls = saved.get(_STRATEGY)
        mine = type(self).__qualname__
        if cls is None:
            if strict:
                errors.append(
                    f"{who}: state {key!r} does not record which strategy saved it "
                    f"(no {_STRATEGY!r} entry): not a state_dict of this strategy"
                )
        elif cls != mine:
            errors.append(f"{who}: the state was saved by {cls}, not by {mine}")
            return errors, missing, unexpected  # the rest would only repeat it
        config = saved.get(_CONFIG)
        if config is None:
            if strict:
                errors.append(
                    f"{who}: state {key!r} does not record the configuration ({_CONFIG!r})"
                )
        elif not isinstance(config, Mapping):
            errors.append(f"{who}: the saved configuration is a {type(config).__name__}")
        elif strict:
            skip = type(self).config_not_compared
            a = {k: v for k, v in config.items() if k not in skip}
            b = {k: v for k, v in self.config().items() if k not in skip}
            if a != b:
                errors.append(f"{who}: the configuration differs: {_config_diff(a, b)}")
        gen = saved.get(_GENERATOR)
        if self._generator is not None:
            if gen is None:
                if strict:
                    errors.append(f"{who}: state {key!r} has no generator state ({_GENERATOR!r})")
                missing.append(f"{key}[{_GENERATOR!r}]")
            else:
                problem = _generator_problem(gen, self._generator)
                if problem:
                    errors.append(f"{who}: state {key!r} has an invalid generator state: {problem}")
        elif gen is not None:
            if strict:
                errors.append(
                    f"{who}: state {key!r} has a generator state, this strategy has no generator"
                )
            unexpected.append(f"{key}[{_GENERATOR!r}]")
        current = self.extra_state()
        entries = {k: v for k, v in saved.items() if k not in _RESERVED}
        for name in current:
            if name not in entries:
                # a subclass's load_extra_state cannot load a part of its extra state
                errors.append(f"{who}: state {key!r} lacks the entry {name!r}")
        for name, value in entries.items():
            if name not in current:
                unexpected.append(f"{key}[{name!r}]")
                if strict:
                    errors.append(f"{who}: state {key!r} has an unexpected entry {name!r}")
                continue
            ref = current[name]
            if isinstance(ref, Tensor):
                if not isinstance(value, Tensor):
                    errors.append(
                        f"{who}: state {key!r} entry {name!r} is a {type(value).__name__}, "
                        "expected a tensor"
                    )
                elif _category(value.dtype) != _category(ref.dtype):
                    errors.append(
                        f"{who}: state {key!r} entry {name!r} has dtype {value.dtype} "
                        f"({_category(value.dtype)}), expected a {_category(ref.dtype)} tensor "
                        f"({ref.dtype})"
                    )
        return errors, missing, unexpected

    def _assign_state(self, state: Mapping[str, Any]) -> None:
        """Load an already checked state (no check: call :meth:`check_state_dict` first)."""
        nn.Module.load_state_dict(self, state, strict=False)

    def _snapshot(self) -> dict[str, Any]:
        """A deep copy of the whole state, for :meth:`_restore` after a failed assignment."""
        return copy.deepcopy(dict(self.state_dict()))

    def _restore(self, snapshot: Mapping[str, Any]) -> None:
        # an unset lazy state is absent from the snapshot: loading it sets it back to None
        nn.Module.load_state_dict(self, snapshot, strict=False)


# ---------------------------------------------------------------------------- helpers
def _category(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return "integer"


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in t.shape)


def _check_tensor(who: str, kind: str, key: str, value: Any, ref: Tensor | None) -> list[str]:
    """Problems of a saved ``value`` for a tensor like ``ref`` (``None``: any shape/dtype)."""
    if not isinstance(value, Tensor):
        return [f"{who}: {kind} {key!r} is a {type(value).__name__}, expected a tensor"]
    if ref is None:
        return []
    out = []
    if value.shape != ref.shape:
        out.append(f"{who}: {kind} {key!r} has shape {_shape(value)}, expected {_shape(ref)}")
    if _category(value.dtype) != _category(ref.dtype):
        out.append(
            f"{who}: {kind} {key!r} has dtype {value.dtype} ({_category(value.dtype)}), "
            f"expected a {_category(ref.dtype)} tensor ({ref.dtype})"
        )
    return out


def _generator_problem(saved: Any, gen: torch.Generator) -> str | None:
    if not isinstance(saved, Tensor):
        return f"a {type(saved).__name__}, expected a uint8 tensor"
    current = gen.get_state()
    if saved.dtype != current.dtype or saved.shape != current.shape:
        return (
            f"a {saved.dtype} tensor of shape {_shape(saved)}, expected {current.dtype} "
            f"of shape {_shape(current)}"
        )
    try:
        torch.Generator().set_state(saved.cpu())  # a scratch generator: nothing is changed
    except (RuntimeError, ValueError, TypeError) as exc:
        return str(exc)
    return None


def _plain(value: Any) -> Any:
    """``value`` as plain Python data (what ``config`` records and compares)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    name = getattr(value, "__qualname__", None)
    if isinstance(name, str):  # a function or a class: its name (an address is no config)
        return f"{getattr(value, '__module__', '')}.{name}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def _repr_value(value: Any) -> str:
    """``value`` as it is written in a constructor call (a tensor as a list)."""
    if isinstance(value, Tensor):
        return repr(value.detach().cpu().tolist())
    return repr(value)


def _config_diff(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> str:
    parts = []
    for k in list(mine) + [k for k in saved if k not in mine]:
        a = saved.get(k, "<absent>")
        b = mine.get(k, "<absent>")
        if a != b:
            parts.append(f"{k}={a!r} saved, {b!r} here")
    return "; ".join(parts) if parts else f"{dict(saved)!r} saved, {dict(mine)!r} here"


def _join(errors: list[str]) -> str:
    if len(errors) == 1:
        return errors[0]
    return f"{len(errors)} problems with the state:\n" + "\n".join(f"  - {e}" for e in errors)
