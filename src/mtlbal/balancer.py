"""The Balancer: owns the hooks, runs the pipeline, fills ``.grad``.

Pipeline of :meth:`Balancer.backward` for losses ``L`` (``[m]``):

1. validate the losses (scalar, count, names, finite: the one optional host sync);
2. the loss weighting maps ``L`` to per-task objectives ``ℓ`` (``w_t·L_t``, ``w_t·log L_t``, …);
3. without a gradient aggregator: one ordinary backward of ``Σ_t ℓ_t`` (+ the weighting's
   auxiliary term);
4. with one: the engine forms the per-task gradients of the shared part (at the parameters, or
   at a cut point), the transforms act on them, the aggregator turns them into weights ``w``
   (Gramian methods) or a direction, and the result is written to ``.grad``. Parameters outside
   the shared part (the task heads, learnable strategy parameters) receive the gradient of
   ``Σ_t ℓ_t``: gradient-level methods act on the shared part only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mtlbal.aggregation.base import Aggregator, GramianAggregator
from mtlbal.engine.base import PerTaskGrads, accumulate_grad
from mtlbal.engine.dense import (
    CutPerTaskGrads,
    DensePerTaskGrads,
    batched_grads,
    split_task_grads,
    task_grad_norms,
)
from mtlbal.engine.layerwise import LayerRecord, LayerwiseCapture, layerwise_per_task_grads
from mtlbal.transforms.base import GradientTransform
from mtlbal.transforms.branch_calibration import BranchCalibration
from mtlbal.weighting.base import Equal, LossContext, LossWeighting

__all__ = ["Balancer", "StepInfo"]

Losses = Mapping[str, Tensor] | Sequence[Tensor]
NonFinitePolicy = Literal["raise", "skip", "off"]


@dataclass
class StepInfo:
    """What one :meth:`Balancer.backward` did. Tensors live on the losses' device.

    Attributes:
        tasks: task names (dict keys, or ``"0"``, ``"1"``, … for a sequence).
        losses: ``[m]`` detached raw losses.
        loss_weights: ``[m]`` the loss-level multipliers ``∂ℓ_t/∂L_t``.
        grad_weights: ``[m]`` the gradient-level weights on ``∇ℓ_t`` (Gramian methods), if any.
        weights: ``[m]`` the overall weight of ``∇L_t`` in the shared update where the method
            is a weighting (``loss_weights·grad_weights``), else ``loss_weights``.
        gramian: ``[m, m]`` Gramian of the per-task gradients of ``ℓ_t`` at the shared part,
            when they were formed (a gradient method, ``diagnostics=True``).
        grad_norms: ``[m]`` norms of those gradients (``None`` without a Gramian).
        cosines: ``[m, m]`` their pairwise cosines.
        conflict: share of task pairs with a negative cosine (the sparse-training paper's
            gradient-conflict incidence).
        The last three are derived from ``gramian`` on first access (no work when unread).
        skipped: ``True`` when the step was skipped by the ``nonfinite="skip"`` policy.
        step: the Balancer's step counter after this call.
    """

    tasks: tuple[str, ...]
    losses: Tensor
    loss_weights: Tensor
    weights: Tensor
    grad_weights: Tensor | None = None
    gramian: Tensor | None = None
    skipped: bool = False
    step: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    _stats: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    def _derived(self) -> tuple[Tensor, Tensor, Tensor] | None:
        if self._stats is None and self.gramian is not None:
            self._stats = gramian_stats(self.gramian)
        return self._stats

    @property
    def grad_norms(self) -> Tensor | None:
        stats = self._derived()
        return None if stats is None else stats[0]

    @property
    def cosines(self) -> Tensor | None:
        stats = self._derived()
        return None if stats is None else stats[1]

    @property
    def conflict(self) -> Tensor | None:
        stats = self._derived()
        return None if stats is None else stats[2]


def gramian_stats(gramian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Norms ``[m]``, cosines ``[m, m]`` and the share of pairs with negative cosine."""
    g = gramian.detach()
    norms = g.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, g / denom.clamp_min(torch.finfo(g.dtype).tiny), 0.0)
    m = g.shape[0]
    if m < 2:
        conflict = torch.zeros((), dtype=g.dtype, device=g.device)
    else:
        iu = torch.triu_indices(m, m, offset=1, device=g.device)
        conflict = (cos[iu[0], iu[1]] < 0).to(g.dtype).mean()
    return norms, cos, conflict


def _distributed_world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def _reachable(roots: Sequence[Tensor], stop: set[int]) -> tuple[list[Tensor], set[int]]:
    """Leaf tensors reached from ``roots`` (through ``grad_fn``), and which ids of ``stop`` (ids
    of leaf tensors or of graph nodes) were reached. The walk stops at leaves and at ``stop``."""
    leaves: dict[int, Tensor] = {}
    seen: set[int] = set()
    hit: set[int] = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    for r in roots:
        if r.grad_fn is None and r.requires_grad:
            leaves[id(r)] = r
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if id(fn) in stop:
            hit.add(id(fn))
            continue
        var = getattr(fn, "variable", None)
        if var is not None:
            leaves[id(var)] = var
            if id(var) in stop:
                hit.add(id(var))
            continue
        for nxt, _ in fn.next_functions:
            if nxt is not None and id(nxt) not in seen:
                stack.append(nxt)
    return list(leaves.values()), hit


class _Cut:
    """A cut point: a forward hook records the module's output ``z``. When per-task gradients
    are needed there (``detach=True``), it replaces ``z`` by a detached leaf ``ẑ`` (same value)
    so that the heads' graph stops at ``ẑ``; ``z`` is kept to backpropagate the combined gradient
    through the trunk. Otherwise the output passes through unchanged (``ẑ`` is ``z``)."""

    def __init__(self, module: nn.Module, *, detach: bool) -> None:
        self.module = module
        self.detach = detach
        self.captured: list[tuple[Tensor, Tensor]] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"cut point {type(module).__name__} must return a single tensor, "
                f"got {type(output).__name__}"
            )
        if not (torch.is_grad_enabled() and output.requires_grad):
            return None
        if not self.detach:
            self.captured.append((output, output))
            return None
        leaf = output.detach().requires_grad_(True)
        self.captured.append((output, leaf))
        return leaf

    def take(self) -> list[tuple[Tensor, Tensor]]:
        out, self.captured = self.captured, []
        return out

    def remove(self) -> None:
        self.handle.remove()
        self.captured = []

    def __getstate__(self) -> dict[str, Any]:
        # the captured outputs are per-step tensors of a live graph (not copyable): a copy
        # (deepcopy, pickle, torch.save) starts with none and captures at its next forward
        return {**self.__dict__, "captured": []}


class _Branches:
    """Modality branches (FULLER's modality level): each branch output is replaced by a detached
    leaf in the forward, as at a cut point. Once the combined gradient has been backpropagated
    through the fusion and the trunk down to those leaves, :meth:`backward` rescales the
    gradients there with the :class:`BranchCalibration` and backpropagates them into the
    branches."""

    def __init__(self, calibration: BranchCalibration) -> None:
        self.calibration = calibration
        self.cuts = [_Cut(m, detach=True) for m in calibration.modules]

    def take(self) -> list[list[tuple[Tensor, Tensor]]]:
        return [c.take() for c in self.cuts]

    def remove(self) -> None:
        for c in self.cuts:
            c.remove()

    def backward(self, captured: list[list[tuple[Tensor, Tensor]]], info: StepInfo) -> None:
        live = [caps for caps in captured if caps]
        if not live:
            return
        grads = [
            [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for _, leaf in caps]
            for caps in live
        ]
        if all(leaf.grad is None for caps in live for _, leaf in caps):
            raise ValueError(
                "no gradient reached the outputs of the modality branches: the branches must "
                "feed the losses (and lie upstream of the cut point, if any)"
            )
        calib = self.calibration
        if calib.per_sample:
            counts = {len(g) for g in grads}
            if len(counts) != 1:
                raise ValueError(
                    "per-sample branch calibration needs every branch to run the same number "
                    f"of times per step, got {[len(g) for g in grads]}"
                )
            new = [list(col) for col in zip(*[calib(list(row)) for row in zip(*grads)])]
            info.extras["branch_norms"] = torch.stack(
                [
                    torch.cat([x.reshape(x.shape[0], -1).norm(dim=1) for x in g]).detach()
                    for g in grads
                ]
            )
        else:
            flat = [torch.cat([x.reshape(-1) for x in g]) for g in grads]
            info.extras["branch_norms"] = torch.stack([f.norm() for f in flat]).detach()
            scaled = calib(flat)
            new = []
            for g, f in zip(grads, scaled):
                parts, offset = [], 0
                for x in g:
                    parts.append(f[offset : offset + x.numel()].view_as(x))
                    offset += x.numel()
                new.append(parts)
        outs = [z for caps in live for z, _ in caps]
        cots = [c for g in new for c in g]
        for caps in live:
            for _, leaf in caps:
                leaf.grad = None
        torch.autograd.backward(outs, cots)


class Balancer:
    """Balance the losses of several tasks that share part of a network.

    Args:
        shared: the shared part: an ``nn.Module``, several modules, or an iterable of parameters.
        weighting: a loss-level strategy (:mod:`mtlbal.weighting`); default equal weights.
        aggregator: a gradient-level strategy (:mod:`mtlbal.aggregation`); default none.
        at: ``"params"`` (per-task gradients of the shared parameters) or an ``nn.Module`` whose
            output is the shared representation (a cut point: per-task gradients are taken
            there, then one backward runs through the trunk).
        transforms: gradient transforms (:mod:`mtlbal.transforms`) applied to each task's
            gradient of the shared parameters before aggregation (``per_task``, at
            ``"params"``), or to the combined gradient that reaches a shared parameter when no
            per-task gradients of the parameters are formed (``combined``: without an
            aggregator, and always at a cut point, where the per-task gradients are at the
            representation).
        branches: modality branches for FULLER-style modality-level calibration: a list of
            two or more modules (the defaults of
            :class:`~mtlbal.transforms.BranchCalibration`) or a ``BranchCalibration``. Each
            branch output is captured like a cut point; the gradient reaching the branch
            outputs (the task-level combined gradient after the fusion and the trunk) is
            rescaled to a common norm before it flows into each branch. Needs ``at=`` a cut
            point downstream of the fusion, or no per-task gradients (no aggregator, no
            diagnostics). See :func:`mtlbal.presets.fuller`.
        nonfinite: what a NaN/inf loss does. ``"raise"`` (default): ``ValueError`` naming the
            task, ``.grad`` untouched; ``"skip"``: the step is skipped (``info.skipped``), no
            gradient and no state update; ``"off"``: no check (zero host syncs per step).
            ``"raise"`` and ``"skip"`` cost one host sync per step.
        check_connected: when to check that every task's loss reaches the shared part:
            ``"first"`` (the first step and whenever the task set changes), ``"always"``,
            ``"never"``.
        diagnostics: also compute per-task gradients (norms, cosines, conflict) when no
            strategy needs them (costs what a gradient method costs).
        chunk_size: tasks per batched backward at the parameters (bounds memory).
        engine: ``"dense"`` (batched VJPs of the parameters), ``"layerwise"`` (forward hooks
            on the supported layers; one batched backward to their outputs, per-layer
            Gramians, see :mod:`mtlbal.engine.layerwise`), or ``"auto"``: ``"layerwise"`` at
            the parameters when the shared part has a supported layer, else ``"dense"``.

    Example:
        >>> import torch, mtlbal
        >>> trunk = torch.nn.Linear(3, 4); heads = torch.nn.ModuleList(
        ...     [torch.nn.Linear(4, 1) for _ in range(2)])
        >>> b = mtlbal.Balancer(trunk, aggregator=mtlbal.aggregation.MGDA())
        >>> z = trunk(torch.randn(8, 3))
        >>> info = b.backward({"a": heads[0](z).pow(2).mean(), "b": heads[1](z).abs().mean()})
        >>> info.weights.shape
        torch.Size([2])
    """

    def __init__(
        self,
        shared: nn.Module | Iterable[nn.Module] | Iterable[Tensor],
        *,
        weighting: LossWeighting | None = None,
        aggregator: Aggregator | None = None,
        at: Literal["params"] | nn.Module = "params",
        transforms: Sequence[GradientTransform] | GradientTransform | None = None,
        nonfinite: NonFinitePolicy = "raise",
        check_connected: Literal["first", "always", "never"] = "first",
        diagnostics: bool = False,
        chunk_size: int | None = None,
        engine: Literal["auto", "dense", "layerwise"] = "auto",
        branches: Sequence[nn.Module] | BranchCalibration | None = None,
    ) -> None:
        shared_list = list(shared) if not isinstance(shared, nn.Module) else [shared]
        self.shared_modules: list[nn.Module] = [s for s in shared_list if isinstance(s, nn.Module)]
        params: list[Tensor] = []
        seen: set[int] = set()
        for s in shared_list:
            ps = list(s.parameters()) if isinstance(s, nn.Module) else [s]
            for p in ps:
                if not isinstance(p, Tensor):
                    raise TypeError(f"shared must hold modules or tensors, got {type(p).__name__}")
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if not params and at == "params":
            raise ValueError("the shared part has no parameter that requires grad")
        self.shared_params = params
        self._shared_ids = {id(p) for p in params}
        if nonfinite not in ("raise", "skip", "off"):
            raise ValueError(f"nonfinite must be 'raise', 'skip' or 'off', got {nonfinite!r}")
        if check_connected not in ("first", "always", "never"):
            raise ValueError("check_connected must be 'first', 'always' or 'never'")
        if engine not in ("auto", "dense", "layerwise"):
            raise ValueError(f"unknown engine {engine!r}")
        self.weighting: LossWeighting = weighting if weighting is not None else Equal()
        self.aggregator = aggregator
        if transforms is None:
            self.transforms: list[GradientTransform] = []
        elif isinstance(transforms, GradientTransform):
            self.transforms = [transforms]
        else:
            self.transforms = list(transforms)
        self.nonfinite: NonFinitePolicy = nonfinite
        self.check_connected = check_connected
        self.diagnostics = diagnostics
        self.chunk_size = chunk_size
        self.engine = engine
        self.step_count = 0
        self.tasks: tuple[str, ...] | None = None
        self._checked_for: tuple[str, ...] | None = None
        self._hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._cut: _Cut | None = None
        if isinstance(at, nn.Module):
            self._cut = _Cut(at, detach=True)  # decided below, once transforms are bound
            self.at: Literal["params"] | nn.Module = at
        elif at == "params":
            self.at = "params"
        else:
            raise ValueError(f"at must be 'params' or an nn.Module, got {at!r}")
        self._capture: LayerwiseCapture | None = None
        self._records: list[LayerRecord] = []
        self._task_losses: list[Tensor] = []
        self._stacked: Tensor | None = None
        self.weighting.bind(self.shared_params, self.shared_modules)
        for t in self.transforms:
            t.bind(self.shared_params, self.shared_modules)
        needs_grads = self._needs_per_task_grads()
        # fixed by the configuration: computed once, not per step
        self._needs_grads = needs_grads
        if self._cut is not None:
            self._cut.detach = needs_grads
        # the layer-wise engine's forward hooks exist only when per-task gradients at the
        # parameters will be needed: loss-level strategies keep a hook-free forward
        if engine in ("auto", "layerwise") and self.at == "params" and needs_grads:
            capture = LayerwiseCapture(self.shared_modules)
            if capture.modules or engine == "layerwise":
                self._capture = capture
            else:
                capture.remove()
        self._branches: _Branches | None = None
        if branches is not None:
            calib = (
                branches
                if isinstance(branches, BranchCalibration)
                else BranchCalibration(list(branches))
            )
            if self._cut is not None and any(m is self._cut.module for m in calib.modules):
                raise ValueError("a modality branch cannot also be the cut point")
            self._branches = _Branches(calib)
            if self._cut is None and self._needs_per_task_grads():
                self.remove()
                raise ValueError(
                    "modality branches with per-task gradients need a cut point downstream of "
                    "the fusion (at=module): at 'params' the gradient entering the branches is "
                    "not defined for every aggregator"
                )
        self.last_info: StepInfo | None = None
        # ``lr_0 / lr_now`` of the optimizer, passed to the weighting as ``LossContext.lr_factor``
        # (IGB v2's reward scale); :func:`mtlbal.wrap` sets it, users of a bare Balancer may.
        self.lr_factor: Callable[[], float] | None = None

    # ------------------------------------------------------------------ public helpers
    @property
    def strategies(self) -> list[nn.Module]:
        out: list[nn.Module] = [self.weighting]
        if self.aggregator is not None:
            out.append(self.aggregator)
        out.extend(self.transforms)
        return out

    def parameters(self) -> Iterable[nn.Parameter]:
        """Learnable parameters of the strategies (e.g. uncertainty weighting's log-variances)."""
        seen: set[int] = set()
        for s in self.strategies:
            for p in s.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def to(self, device: torch.device | str) -> Balancer:
        for s in self.strategies:
            s.to(device)
        return self

    def register_hook(self, hook: Callable[[Balancer, StepInfo], None]) -> RemovableHandle:
        """Call ``hook(balancer, info)`` after every step; returns a handle to remove it."""
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    def remove(self) -> None:
        """Drop every hook the Balancer registered on the model (the cut point)."""
        if self._cut is not None:
            self._cut.remove()
            self._cut = None
        if self._branches is not None:
            self._branches.remove()
            self._branches = None
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        self._hooks.clear()

    def epoch_end(self) -> None:
        """Mark the end of a training epoch for strategies that use epoch statistics (IGB, DWA)."""
        for s in self.strategies:
            fn = getattr(s, "epoch_end", None)
            if callable(fn):
                fn()

    def after_step(self) -> None:
        """Call after ``optimizer.step()`` when not using :func:`mtlbal.wrap` (which calls it)."""
        for s in self.strategies:
            fn = getattr(s, "after_step", None)
            if callable(fn):
                fn()

    def update(self, losses: Losses) -> None:
        """Give strategies that learn from the step's effect (FAMO) the losses re-evaluated on
        the same batch after ``optimizer.step()`` (no gradient needed). Does nothing after a
        skipped step. The task order/names must be those of the last :meth:`backward`."""
        if self.last_info is None:
            raise ValueError("update() needs a previous backward() on this Balancer")
        if self.last_info.skipped:
            return
        if isinstance(losses, Mapping):
            names = tuple(str(k) for k in losses)
            if names != self.last_info.tasks:
                raise ValueError(
                    f"update() got tasks {list(names)}, the last backward had "
                    f"{list(self.last_info.tasks)}"
                )
            values = list(losses.values())
        elif isinstance(losses, Tensor):
            values = list(losses.reshape(-1).unbind(0))
        else:
            values = list(losses)
        if len(values) != len(self.last_info.tasks):
            raise ValueError(
                f"update() got {len(values)} losses for {len(self.last_info.tasks)} tasks"
            )
        stacked = torch.stack([torch.as_tensor(v).reshape(()) for v in values]).detach()
        if not self._check_finite(self.last_info.tasks, stacked):
            return
        for s in self.strategies:
            fn = getattr(s, "update", None)
            if callable(fn):
                fn(stacked)

    def state_dict(self) -> dict[str, Any]:
        """The step, the task names, the configuration and every strategy's state (the format
        is described in :mod:`mtlbal._checkpoint`)."""
        from mtlbal._checkpoint import balancer_state_dict

        return balancer_state_dict(self)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> Any:
        """Restore :meth:`state_dict`'s output, all of it checked before anything is assigned
        (a refused state raises ``ValueError`` and changes nothing); ``strict`` as for
        ``torch.nn.Module``. See :func:`mtlbal._checkpoint.load_balancer_state_dict`."""
        from mtlbal._checkpoint import load_balancer_state_dict

        return load_balancer_state_dict(self, state, strict)

    def __repr__(self) -> str:
        at = "params" if self.at == "params" else type(self.at).__name__
        return (
            f"Balancer(weighting={self.weighting!r}, aggregator={self.aggregator!r}, at={at}, "
            f"transforms={self.transforms!r}, shared_params={len(self.shared_params)})"
        )

    # ------------------------------------------------------------------ the step
    def _normalize(self, losses: Losses) -> tuple[tuple[str, ...], list[Tensor]]:
        if isinstance(losses, Mapping):
            names = tuple(str(k) for k in losses)
            values = list(losses.values())
        elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
            values = list(losses)
            names = tuple(str(i) for i in range(len(values)))
        elif isinstance(losses, Tensor) and losses.dim() == 1:
            values = list(losses.unbind(0))
            names = tuple(str(i) for i in range(len(values)))
        else:
            raise TypeError(
                f"losses must be a dict {{task: scalar}} or a sequence of scalars, "
                f"got {type(losses).__name__}"
            )
        if not values:
            raise ValueError("no losses were given")
        for n, v in zip(names, values):
            if not isinstance(v, Tensor):
                raise TypeError(f"loss of task {n!r} is a {type(v).__name__}, not a tensor")
            if v.numel() != 1 or v.dim() > 1:
                raise ValueError(
                    f"loss of task {n!r} must be a scalar, got shape {tuple(v.shape)} "
                    "(reduce it, e.g. with .mean())"
                )
            if not v.requires_grad:
                raise ValueError(f"loss of task {n!r} does not require grad (detached?)")
        expected = self.weighting.num_tasks
        if expected is not None and len(values) != expected:
            raise ValueError(
                f"{type(self.weighting).__name__} was built for {expected} tasks, "
                f"got {len(values)} losses ({', '.join(names)})"
            )
        if (
            self.tasks is not None
            and names != self.tasks
            and any(getattr(s, "is_stateful", False) for s in self.strategies)
        ):
            raise ValueError(
                f"the task set changed from {list(self.tasks)} to {list(names)}; the configured "
                "strategies keep per-task state. Use the same tasks every step (or a new Balancer)."
            )
        return names, [v.reshape(()) for v in values]

    def _check_finite(self, names: tuple[str, ...], stacked: Tensor) -> bool:
        if self.nonfinite == "off":
            return True
        if bool(torch.isfinite(stacked).all()):  # the one host sync of the step
            return True
        bad = [n for n, ok in zip(names, torch.isfinite(stacked).tolist()) if not ok]
        if self.nonfinite == "skip":
            return False
        values = ", ".join(f"{n}={stacked[names.index(n)].item()}" for n in bad)
        raise ValueError(f"non-finite loss for task(s) {', '.join(map(repr, bad))}: {values}")

    def _check_connected(self, names: tuple[str, ...], values: list[Tensor]) -> None:
        if self.check_connected == "never":
            return
        if self.check_connected == "first" and self._checked_for == names:
            return
        if self._cut is not None:
            targets = {
                id(leaf) if leaf is not z else id(z.grad_fn) for z, leaf in self._cut.captured
            }
            # (an empty capture was already refused at the top of backward)
            where = f"the cut point {type(self._cut.module).__name__}"
        else:
            targets = self._shared_ids
            where = "the shared parameters"
        for n, v in zip(names, values):
            _, hit = _reachable([v], targets)
            if not hit:
                raise ValueError(
                    f"the loss of task {n!r} does not depend on {where}: check the model wiring "
                    "(a detached tensor, or a head that bypasses the shared part)"
                )
        self._checked_for = names

    def backward(self, losses: Losses, *, scaler: Any | None = None) -> StepInfo:
        """Fill ``.grad`` of every parameter the losses reach; return what was done.

        Args:
            losses: ``{task_name: scalar}`` or a sequence of scalar losses (unscaled).
            scaler: a ``torch.amp.GradScaler`` for mixed precision. Strategies see the
                *unscaled* losses; the objectives are scaled by ``scaler.scale`` (no host sync)
                before any gradient is taken, so ``.grad`` holds scaled gradients for
                ``scaler.step(opt)`` to unscale and check, as with a plain
                ``scaler.scale(loss).backward()``. Gradient-level methods then see the scaled
                per-task gradients: exact for the positively homogeneous ones (MGDA, PCGrad,
                Aligned-MTL, UPGrad, IMTL-G, CAGrad); a method of degree 0 (Nash-MTL) says so.
        """
        names, values = self._normalize(losses)
        if self._cut is not None and not self._cut.captured:
            raise ValueError(
                f"no output of the cut point {type(self._cut.module).__name__} was captured "
                "since the last backward: run the forward pass (with grad enabled) first"
            )
        # the layer calls of this forward (taken every step so that none accumulate)
        self._records = self._capture.take() if self._capture is not None else []
        self._task_losses = values
        stacked = torch.stack(values)
        self._stacked = stacked
        raw = stacked.detach()
        if not self._check_finite(names, raw):
            if self._cut is not None:
                self._cut.take()
            if self._branches is not None:
                self._branches.take()
            self._records, self._task_losses, self._stacked = [], [], None
            info = StepInfo(names, raw, torch.zeros_like(raw), torch.zeros_like(raw))
            info.skipped = True
            info.step = self.step_count
            self.last_info = info
            return info
        self._check_connected(names, values)

        ctx = LossContext(
            step=self.step_count,
            lr_factor=1.0 if self.lr_factor is None else float(self.lr_factor()),
            tasks=names,
        )
        if self.weighting.needs_layer_grad_norms:
            ctx.layer_grad_norms = self._layer_grad_norms(stacked)
        weighted = self.weighting.objectives(stacked, ctx)
        objectives = weighted.objectives
        if scaler is not None:
            objectives = scaler.scale(objectives)
            if weighted.aux is not None:
                weighted.aux = scaler.scale(weighted.aux)
        info = StepInfo(names, raw, weighted.weights.detach(), weighted.weights.detach())

        needs_grads = self._needs_grads
        branch_caps = self._branches.take() if self._branches is not None else None
        if needs_grads and self._cut is None:
            self._params_backward(objectives, weighted.aux, info)
        else:
            # the combined gradient reaches the shared parameters through autograd: the
            # transforms' `combined` runs in tensor hooks on those parameters
            with self._combined_hooks():
                if not needs_grads:
                    self._plain_backward(objectives, weighted.aux)
                else:
                    self._cut_backward(objectives, weighted.aux, info)
                if branch_caps is not None:
                    assert self._branches is not None
                    self._branches.backward(branch_caps, info)
        self._records, self._task_losses, self._stacked = [], [], None

        if _distributed_world_size() > 1:
            self._average_strategy_grads()
        self.weighting.observe(raw)
        self.tasks = names
        self.step_count += 1
        info.step = self.step_count
        self.last_info = info
        for hook in list(self._hooks.values()):
            hook(self, info)
        return info

    # ------------------------------------------------------------------ paths
    def _average_strategy_grads(self) -> None:
        # learnable strategy parameters are outside DDP: average their gradients so that every
        # rank keeps identical weights
        world = _distributed_world_size()
        for q in self.parameters():
            if q.grad is not None:
                torch.distributed.all_reduce(q.grad)
                q.grad.div_(world)

    def _needs_per_task_grads(self) -> bool:
        return (
            self.aggregator is not None
            or self.diagnostics
            or any(
                t.needs_per_task and t.applies_to(p)
                for t in self.transforms
                for p in self.shared_params
            )
        )

    def _transform_applies(self, p: Tensor) -> bool:
        return any(t.applies_to(p) for t in self.transforms)

    @contextmanager
    def _combined_hooks(self) -> Iterator[None]:
        handles: list[RemovableHandle] = []
        for p in self.shared_params if self.transforms else ():
            ts = [t for t in self.transforms if t.applies_to(p)]
            if ts:

                def hook(g: Tensor, p: Tensor = p, ts: list[GradientTransform] = ts) -> Tensor:
                    for t in ts:
                        g = t.combined(p, g)
                    return g

                handles.append(p.register_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _layer_grad_norms(self, stacked: Tensor) -> Tensor:
        # at a cut point the trunk is out of the heads' graph: norms are taken at the
        # representation (LibMTL's rep_grad convention), documented on GradNorm
        if self._cut is not None:
            params = [leaf for _, leaf in self._cut.captured]
        else:
            params = self.weighting.grad_norm_params()
        return task_grad_norms(self._task_losses, params).detach()

    def _total(self, objectives: Tensor, aux: Tensor | None) -> Tensor:
        total = objectives.sum()
        return total if aux is None else total + aux

    def _plain_backward(self, objectives: Tensor, aux: Tensor | None) -> None:
        # one ordinary backward (at a cut point the output was not detached in this mode)
        if self._cut is not None:
            self._cut.take()
        self._total(objectives, aux).backward()

    def _aggregate(self, grads: PerTaskGrads, info: StepInfo) -> None:
        agg = self.aggregator
        if agg is not None:
            agg.set_losses(info.losses)
        gram: Tensor | None = None
        if agg is None or isinstance(agg, GramianAggregator) or self.diagnostics:
            gram = grads.gramian()
            info.gramian = gram.detach()
        if agg is None:
            assert gram is not None
            grads.apply_weights(torch.ones(grads.m, dtype=gram.dtype, device=gram.device))
            return
        if isinstance(agg, GramianAggregator):
            assert gram is not None
            w = agg.weights(gram)
            info.grad_weights = w.detach()
            info.weights = w.detach().to(info.loss_weights.dtype) * info.loss_weights
            grads.apply_weights(w)
        else:
            direction = agg.aggregate_jacobian(grads.jacobian())
            grads.apply_direction(direction)

    def _cut_backward(self, objectives: Tensor, aux: Tensor | None, info: StepInfo) -> None:
        assert self._cut is not None
        captured = self._cut.take()
        outs = [z for z, _ in captured]
        leaves = [leaf for _, leaf in captured]
        assert self._stacked is not None
        per_task = split_task_grads(objectives, self._stacked, self._task_losses, leaves)
        # ONE backward call runs the heads (gradient of Σ ℓ_t, plus learnable strategy
        # parameters) and the trunk (the combined gradient at z) together, so DDP's reducer
        # sees a single backward; the .grad it leaves on the detached leaves is discarded
        grads = CutPerTaskGrads(outs, per_task, extra_roots=[self._total(objectives, aux)])
        if _distributed_world_size() > 1:
            # per-sample blocks of the representation are disjoint across ranks, so the global
            # Gramian is the sum of the local ones: one [m, m] all-reduce makes every rank solve
            # the same problem (exact for Gramian methods; their weights are scale-invariant)
            if self.aggregator is not None and not isinstance(self.aggregator, GramianAggregator):
                raise NotImplementedError(
                    f"{type(self.aggregator).__name__} needs the full Jacobian at the cut point, "
                    "which is not gathered across processes; use a Gramian-based method under DDP"
                )
            torch.distributed.all_reduce(grads.gramian())
        self._aggregate(grads, info)
        for leaf in leaves:
            leaf.grad = None

    def _per_task_transforms(self, p: Tensor, g: Tensor) -> Tensor:
        for t in self.transforms:
            if t.applies_to(p):
                g = t.per_task(p, g)
        return g

    def _params_backward(self, objectives: Tensor, aux: Tensor | None, info: StepInfo) -> None:
        world = _distributed_world_size()
        leaves, _ = _reachable([objectives] + ([aux] if aux is not None else []), set())
        reached = {id(q) for q in leaves}
        shared = [p for p in self.shared_params if id(p) in reached]
        others = [q for q in leaves if id(q) not in self._shared_ids]
        if self._capture is not None and world == 1:
            records, self._records = self._records, []
            lw = layerwise_per_task_grads(
                objectives,
                records,
                shared,
                others,
                chunk_size=self.chunk_size,
                retain_graph=aux is not None,
                force_fallback=[p for p in shared if self._transform_applies(p)],
                per_task_transform=self._per_task_transforms if self.transforms else None,
                task_losses=self._task_losses,
            )
            if aux is not None:
                aux.backward()  # reaches the strategy's own parameters only
            self._aggregate(lw, info)
            return
        per_task = batched_grads(
            objectives, shared + others, chunk_size=self.chunk_size, retain_graph=aux is not None
        )
        if world > 1:
            # exact data parallelism: the per-task gradients of the global (mean over ranks)
            # losses are the rank average of the local ones. torch.autograd.grad fires no DDP
            # hook, so the Jacobian is all-reduced here (m × n values), every rank then solves
            # the same problem and writes the same .grad (the layer-wise engine keeps factors
            # that do not average, so the dense path is used under a process group)
            per_task = [g.contiguous() for g in per_task]
            for g in per_task:
                torch.distributed.all_reduce(g)
                g.div_(world)
        shared_grads = per_task[: len(shared)]
        for j, p in enumerate(shared):
            for t in self.transforms:
                if t.applies_to(p):
                    shared_grads[j] = t.per_task(p, shared_grads[j])
        for q, g in zip(others, per_task[len(shared) :]):
            accumulate_grad(q, g.sum(0))
        if aux is not None:
            aux.backward()  # reaches the strategy's own parameters only
        grads = DensePerTaskGrads(
            shared, shared_grads, combined_transform=self._combined if self.transforms else None
        )
        self._aggregate(grads, info)

    def _combined(self, p: Tensor, g: Tensor) -> Tensor:
        for t in self.transforms:
            if t.applies_to(p):
                g = t.combined(p, g)
        return g
