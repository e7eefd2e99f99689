"""``mtlbal.wrap(optimizer, balancer)``: a drop-in optimizer that also balances.

The wrapper *is* a :class:`torch.optim.Optimizer` (so LR schedulers, Lightning and Hugging Face
accept it) whose ``param_groups``, ``state`` and ``defaults`` are those of the optimizer it
wraps. It adds ``backward(losses)``, steps the balancer's own learnable parameters (uncertainty
weighting's log-variances, GradNorm's weights) with a separate optimizer unless you already put
them in yours, and carries the balancer's state in its ``state_dict`` so one checkpoint restores
both.

Torch's optimizer hooks fire on the wrapper as on any optimizer: the step pre/post hooks (per
instance and global) around :meth:`BalancedOptimizer.step`, the ``state_dict`` and
``load_state_dict`` pre/post hooks around those methods. Hooks registered on the wrapped
optimizer keep firing too, when the wrapper calls it (so a *global* step hook sees both the
wrapper's step and, nested in it, the wrapped optimizer's).

Mixed precision: ``opt.backward(losses, scaler=scaler)`` then ``scaler.step(opt)``. The scaler
unscales and checks the wrapped optimizer's gradients and skips :meth:`~BalancedOptimizer.step`
if they overflowed; inside ``step`` the wrapper unscales the strategy parameters' gradients with
``scaler.unscale_(balancer_optimizer)`` (so ``scaler.update()`` sees their overflows too) and
skips the whole step — model, strategy parameters, their optimizer state — if they are not
finite.
"""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from mtlbal.balancer import Balancer, Losses, StepInfo

__all__ = ["BalancedOptimizer", "wrap"]

_KEY = "mtlbal"

# optimizer -> the BalancedOptimizer that wraps it (weak both ways: a wrapper that was dropped
# frees its optimizer for a new one)
_OWNERS: weakref.WeakKeyDictionary[Optimizer, weakref.ref[BalancedOptimizer]] = (
    weakref.WeakKeyDictionary()
)

# attributes that make up a wrapper's pickled/deep-copied state; hooks, the pending scaler and
# the step patch an LR scheduler installs are left out, as torch's Optimizer leaves them out
_STATE_KEYS = ("optimizer", "balancer", "balancer_optimizer", "_initial_lr")


def _claim(optimizer: Optimizer, wrapper: BalancedOptimizer) -> None:
    if isinstance(optimizer, BalancedOptimizer):
        raise TypeError(
            "this optimizer is already a BalancedOptimizer: wrap the plain torch optimizer once "
            "(one Balancer per optimizer)"
        )
    ref = _OWNERS.get(optimizer)
    owner = None if ref is None else ref()
    if owner is not None and owner is not wrapper:
        raise ValueError(
            f"this {type(optimizer).__name__} is already wrapped by another BalancedOptimizer: "
            "use that one (its .balancer), or a new torch optimizer"
        )
    _OWNERS[optimizer] = weakref.ref(wrapper)


class BalancedOptimizer(Optimizer):
    """An optimizer that forwards to ``optimizer`` and adds ``backward(losses)``.

    Args:
        optimizer: the optimizer you already use (any ``torch.optim.Optimizer``); it can be
            wrapped only once.
        balancer: the :class:`~mtlbal.Balancer`.
        balancer_optimizer: optimizer for the balancer's learnable parameters that are not
            already in ``optimizer``; default ``Adam(lr=balancer_lr)``.
        balancer_lr: learning rate of that default (0.025, as the nash-mtl/FAMO trainers).
    """

    # GradScaler takes a separate path for optimizers that unscale inside their own step
    # (fused Adam/SGD/Adagrad); the wrapper does not, whatever it wraps: the scaler must unscale
    # ``param_groups`` itself (``__getattr__`` would otherwise forward the wrapped one's flag)
    _step_supports_amp_scaling = False

    def __init__(
        self,
        optimizer: Optimizer,
        balancer: Balancer,
        *,
        balancer_optimizer: Optimizer | None = None,
        balancer_lr: float = 0.025,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(balancer, Balancer):
            raise TypeError(f"expected an mtlbal.Balancer, got {type(balancer).__name__}")
        if isinstance(balancer_optimizer, BalancedOptimizer):
            raise TypeError("balancer_optimizer must be a plain torch optimizer")
        _claim(optimizer, self)
        # Optimizer.__init__ would rebuild param_groups; set up only what the base class uses.
        self.optimizer = optimizer
        self.balancer = balancer
        self._init_hooks()
        in_main = {id(p) for g in optimizer.param_groups for p in g["params"]}
        extra = [p for p in balancer.parameters() if id(p) not in in_main]
        if balancer_optimizer is not None:
            self.balancer_optimizer: Optimizer | None = balancer_optimizer
        elif extra:
            self.balancer_optimizer = _default_strategy_optimizer(extra, balancer_lr)
        else:
            self.balancer_optimizer = None
        self._initial_lr = [float(g.get("lr", 1.0)) for g in optimizer.param_groups]

    def _init_hooks(self) -> None:
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict()
        )
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict()
        )
        # the scaler given to the last backward(), consumed by the next step(); a holder, so
        # that an object built from a shallow copy of our __dict__ (Lightning's optimizer
        # wrapper) and this wrapper see the same pending scaler
        self._pending: dict[str, Any] = {"scaler": None}
        # torch's own mechanism: wraps type(self).step (once per class) so that the global and
        # per-instance step pre/post hooks fire around it
        self._patch_step_function()

    # The wrapped optimizer's structures, shared (not copied): schedulers edit them in place.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def backward(
        self,
        losses: Losses,
        *,
        scaler: Any | None = None,
        last: bool | None = None,
        closure: Callable[[], Any] | None = None,
    ) -> StepInfo:
        """``balancer.backward(losses, scaler=scaler, lr_factor=..., last=last)``: fill
        ``.grad``, return the step info (the learning-rate factor of the wrapped optimizer is
        passed along). With gradient accumulation (``Balancer(accumulate=K)``), call
        :meth:`step` once the window has closed (``info.pending`` is ``False``).

        With a ``scaler``, call ``scaler.step(opt)`` next (not ``opt.step()``): the scaler
        unscales the model's gradients, the wrapper those of the strategy parameters.
        ``closure``: for F-MTL (``Need.CLOSURE``), re-runs the forward and returns the losses.
        """
        self._pending["scaler"] = scaler
        return self.balancer.backward(
            losses, scaler=scaler, lr_factor=self.lr_factor(), last=last, closure=closure
        )

    def epoch_end(self) -> None:
        """``balancer.epoch_end()``: mark the end of a training epoch (IGB, DWA)."""
        self.balancer.epoch_end()

    def observe_validation(self, losses: Losses) -> None:
        """``balancer.observe_validation(losses)``: feed per-task validation losses to the
        strategies that declared ``Need.VALIDATION`` (CoBa)."""
        self.balancer.observe_validation(losses)

    def lr_factor(self) -> float:
        """``lr_0 / lr_now`` of the first parameter group (IGB v2's reward scale)."""
        now = float(self.optimizer.param_groups[0].get("lr", 1.0))
        return self._initial_lr[0] / now if now > 0 else 1.0

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Step the wrapped optimizer, then the strategy parameters, then the balancer.

        After ``backward(losses, scaler=scaler)`` the strategy parameters' gradients are
        unscaled here; if any is not finite the whole step is skipped (returns ``None``) and the
        scaler's next ``update()`` lowers the scale.
        """
        if closure is None:
            self._check_window_closed()
        else:  # the closure runs the backward (Lightning's automatic optimization): check after
            inner = closure

            def closure() -> float:
                out = inner()
                self._check_window_closed()
                return out

        scaler, self._pending["scaler"] = self._pending["scaler"], None
        if scaler is not None and not self._unscale_strategy_grads(scaler):
            return None
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        if self.balancer_optimizer is not None:
            self.balancer_optimizer.step()
        self.balancer.after_step()
        return loss

    def _check_window_closed(self) -> None:
        window = getattr(self.balancer, "_window", None)
        if window is not None:
            raise RuntimeError(
                f"step() with an open accumulation window ({window.count} micro-batch(es) kept, "
                f"accumulate={self.balancer.accumulate}): the gradients are written when the "
                "window closes; pass the remaining micro-batches, or close it early with "
                "backward(losses, last=True)"
            )

    def _unscale_strategy_grads(self, scaler: Any) -> bool:
        """Unscale the separately stepped strategy parameters' gradients; True if all finite."""
        bopt = self.balancer_optimizer
        if bopt is None or not getattr(scaler, "is_enabled", lambda: False)():
            return True
        grads = [p.grad for g in bopt.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        # records the overflow check for scaler.update(), as for any optimizer it steps
        scaler.unscale_(bopt)
        # the scaler already synchronized to decide on this step; these few tiny tensors add
        # one more host sync per device
        return all(bool(torch.isfinite(g).all()) for g in grads)

    def to(
        self, device: torch.device | str | int | None = None, dtype: torch.dtype | None = None
    ) -> BalancedOptimizer:
        """Move the balancer's strategies (``balancer.to(device, dtype)``), then make every
        optimizer state tensor follow its parameter; returns ``self``.

        The strategy parameters keep their identity, and the state of the optimizer that steps
        them (``balancer_optimizer``: Adam's moments) — and of the wrapped optimizer, for its
        parameters — is moved to each parameter's device and cast to its floating dtype, as
        ``load_state_dict`` would (a fused or capturable optimizer's ``step`` goes to the
        parameter's device in float32; a plain one's stays where it is). The model is yours:
        move it first (``model.to(device)``), then call ``opt.to(device)``.
        """
        self.balancer.to(device=device, dtype=dtype)
        for opt in (self.optimizer, self.balancer_optimizer):
            if opt is not None:
                _state_follows_params(opt)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        if self.balancer_optimizer is not None:
            self.balancer_optimizer.zero_grad(set_to_none=set_to_none)
        else:
            for p in self.balancer.parameters():
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._initial_lr.append(float(param_group.get("lr", self.optimizer.defaults.get("lr", 1))))

    def state_dict(self) -> dict[str, Any]:
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.optimizer.state_dict()
        sd[_KEY] = {
            "balancer": self.balancer.state_dict(),
            "balancer_optimizer": (
                None if self.balancer_optimizer is None else self.balancer_optimizer.state_dict()
            ),
            "initial_lr": list(self._initial_lr),
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        sd: Any = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, sd)
            if result is not None:
                sd = dict(result)
        ours = sd.pop(_KEY, None)
        if ours is None:
            self.optimizer.load_state_dict(sd)
        else:
            # all or nothing: the balancer's state is checked (and loaded) first; if the
            # optimizers then refuse theirs, the balancer is put back as it was
            before = copy.deepcopy(self.balancer.state_dict())
            self.balancer.load_state_dict(ours["balancer"])
            try:
                self.optimizer.load_state_dict(sd)
                if self.balancer_optimizer is not None and ours["balancer_optimizer"] is not None:
                    self.balancer_optimizer.load_state_dict(ours["balancer_optimizer"])
            except BaseException:
                self.balancer.load_state_dict(before)
                raise
            self._initial_lr[:] = list(ours.get("initial_lr", self._initial_lr))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes not found normally: forward to the wrapped optimizer
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"BalancedOptimizer({self.optimizer!r}, {self.balancer!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in _STATE_KEYS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()
        _claim(self.optimizer, self)


def _state_follows_params(optimizer: Optimizer) -> None:
    """Move each parameter's optimizer state to its device and floating dtype (torch's own
    ``load_state_dict`` policy), in place of the old tensors."""
    for group in optimizer.param_groups:
        step_on_param = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in list(state.items()):
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":
                    if step_on_param:
                        state[key] = value.to(device=p.device, dtype=torch.float32)
                elif value.is_floating_point() and p.is_floating_point():
                    state[key] = value.to(device=p.device, dtype=p.dtype)
                else:
                    state[key] = value.to(device=p.device)


def _default_strategy_optimizer(params: list[torch.nn.Parameter], lr: float) -> Optimizer:
    # fused Adam has the lowest fixed cost per step for these few tiny tensors
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def wrap(
    optimizer: Optimizer,
    balancer: Balancer,
    *,
    balancer_optimizer: Optimizer | None = None,
    balancer_lr: float = 0.025,
) -> BalancedOptimizer:
    """Wrap ``optimizer`` so that it balances with ``balancer``.

    An optimizer can be wrapped once: wrapping a :class:`BalancedOptimizer`, or an optimizer
    that a live :class:`BalancedOptimizer` already wraps, raises.

    Example:
        >>> import torch, mtlbal
        >>> net = torch.nn.Linear(3, 2)
        >>> opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=0.1), mtlbal.Balancer(net))
        >>> y = net(torch.randn(4, 3))
        >>> info = opt.backward([y[:, 0].mean(), y[:, 1].pow(2).mean()])
        >>> opt.step(); opt.zero_grad()
    """
    return BalancedOptimizer(
        optimizer, balancer, balancer_optimizer=balancer_optimizer, balancer_lr=balancer_lr
    )
