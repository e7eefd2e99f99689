"""The Balancer: configuration, hooks and state; :meth:`Balancer.backward` runs one step.

One ``backward(losses)`` is a transaction through five stages (the per-step data lives in a
local :class:`_Step`, never on the Balancer):

1. **validate**: names, scalars, task set in one canonical order, connectivity; under DDP the
   ranks agree on the tasks and the finiteness verdict, and the strategies see global losses;
2. **weigh**: the loss weighting maps ``L`` to per-task objectives ``ℓ``;
3. **form**: an engine (dense, cut point, layer-wise: :mod:`mtlbal.engine`) forms what the
   configuration needs — nothing but the loss-level backward, or the per-task gradients of the
   shared part and their Gramian (in at least float32);
4. **check and solve**: every loss and per-task gradient is finite (one host sync), then the
   transforms and the aggregator give weights (the ``m × m`` solve in float64) or a direction,
   staged as gradient writes;
5. **commit**: ``.grad`` of the shared part, the heads and the strategies' parameters is written,
   then the step counter, the strategies' observation of the losses and the step hooks.

Nothing a user can see changes before the commit: the gradient writes are staged
(:class:`~mtlbal.engine.base.GradWrites`) and the strategies' state is snapshotted when the step
starts and restored if anything refuses it (:mod:`mtlbal._transaction`), so a refused step leaves
every tensor and every piece of state bitwise as it was.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mtlbal import _accumulate, _amortise
from mtlbal import _distributed as dist_util
from mtlbal._accumulate import AccumulationMode, Window
from mtlbal._checkpoint import balancer_state_dict, load_balancer_state_dict
from mtlbal._graph import reachable
from mtlbal._losses import Losses, Normalized, given_tensors, normalize_losses
from mtlbal._transaction import StrategySnapshot
from mtlbal.aggregation.base import Aggregator, GramianAggregator
from mtlbal.aggregation.fmtl import FMTL, flat_pass
from mtlbal.engine import report as engine_report
from mtlbal.engine.base import GradWrites, PerTaskGrads
from mtlbal.engine.branches import BranchStage
from mtlbal.engine.cut import CutPerTaskGrads, CutPoint, check_selector, split_task_grads
from mtlbal.engine.dense import DensePerTaskGrads, batched_grads, task_grad_norms
from mtlbal.engine.fallback import BatchedBackward
from mtlbal.engine.layerwise import (
    LayerwiseCapture,
    layerwise_per_task_grads,
    supported_module,
)
from mtlbal.step import Need, StepContext, StepInfo, gramian_stats
from mtlbal.transforms.arl import ARL
from mtlbal.transforms.base import GradientTransform
from mtlbal.transforms.branch_calibration import BranchCalibration
from mtlbal.weighting.base import Equal, LossWeighting

__all__ = ["Balancer", "StepInfo", "gramian_stats"]

NonFinitePolicy = Literal["raise", "skip", "off"]


@dataclass
class _Step:
    """The per-step data that travels through the stages."""

    names: tuple[str, ...]
    values: list[Tensor]  # the local losses L_t (scalars, with their graph)
    stacked: Tensor  # torch.stack(values)
    raw: Tensor  # the losses the strategies see (detached; global under DDP)
    world: int
    writes: GradWrites = field(default_factory=GradWrites)
    captured: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    branch_caps: list[list[tuple[Tensor, Tensor]]] | None = None
    records: list[Any] = field(default_factory=list)
    norm_records: list[Any] = field(default_factory=list)  # GradNorm's layer (layer-wise norms)
    scale: Tensor | None = None  # the GradScaler's scale (a tensor: no host sync)
    given: list[Tensor] = field(default_factory=list)  # the user's loss tensors
    lr_factor: float = 1.0
    # missing tasks: every task (canonical order) and the indices of `names` in it (None: all)
    all_names: tuple[str, ...] = ()
    present: tuple[int, ...] | None = None
    # Need.CLOSURE (F-MTL): re-runs the forward and returns the losses; the heads' per-task
    # gradients at θ, kept for the perturbed passes instead of being written
    closure: Callable[[], Any] | None = None
    flat_heads: tuple[list[Tensor], list[Tensor]] | None = None
    branch_coeffs: Tensor | None = None  # ARL's per-modality coefficients (solve stage)
    regularizer: Tensor | None = None  # Rep-MTL's value (reported in info.extras)
    solved: Tensor | None = None  # a Gramian aggregator's weights (solve_every)


class _Refused(Exception):
    """Internal: the step is skipped (``nonfinite="skip"``); nothing is committed."""


def _absent(step: _Step) -> tuple[str, ...]:
    """The tasks without a loss in this step (``()`` on a full step)."""
    if step.present is None:
        return ()
    return tuple(n for n in step.all_names if n not in step.names)


def _check_declared_tasks(
    tasks: Sequence[str] | None, weighting: LossWeighting | None
) -> tuple[str, ...] | None:
    if tasks is None:
        return None
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a sequence of task names, got {type(tasks).__name__}")
    names = tuple(tasks)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"tasks must be a non-empty sequence of str, got {list(names)!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {list(names)}")
    n = None if weighting is None else weighting.num_tasks
    if n is not None and n != len(names):
        raise ValueError(
            f"{type(weighting).__name__} was built for {n} tasks, tasks= names {len(names)}"
        )
    return names


def _remove_all(handles: list[Any]) -> None:
    for h in handles:
        if h is not None:
            h.remove()


class Balancer:
    """Balance the losses of several tasks that share part of a network.

    Args:
        shared: the shared part: an ``nn.Module``, several modules, or an iterable of parameters.
        weighting: a loss-level strategy (:mod:`mtlbal.weighting`); default equal weights.
        aggregator: a gradient-level strategy (:mod:`mtlbal.aggregation`); default none.
        at: ``"params"`` (per-task gradients of the shared parameters) or an ``nn.Module`` whose
            output is the shared representation (a cut point: per-task gradients are taken
            there, then one backward runs through the trunk).
        select: with ``at=module``, which element of the module's output is the shared
            representation when it returns a container: a key or attribute name (``str``: a
            dict, a ``ModelOutput``, a dataclass, a namedtuple) or a position (``int``: a tuple
            or list). The output keeps its type, with that element replaced by the detached
            leaf; the other elements keep their graph, and a loss that reaches the shared
            parameters through one of them (bypassing the selected element) is refused by the
            connectivity check. Default ``None``: the module returns a single tensor.
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
        nonfinite: what a NaN/inf loss or per-task gradient does. ``"raise"`` (default):
            ``ValueError`` naming the task; ``"skip"``: the step is skipped (``info.skipped``);
            either way nothing changes (no ``.grad``, no strategy state, no counter).
            ``"off"``: no check (zero host syncs per step; with a ``GradScaler`` the gradient
            check still runs, the scaler needs its verdict). ``"raise"`` and ``"skip"`` cost one
            host sync per step (under DDP the verdict is agreed across ranks: all raise, or all
            skip). With a ``GradScaler`` a non-finite per-task gradient behind finite losses is
            an overflow: the step is handed to the scaler to skip (see :meth:`backward`).
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
        tasks: every task name, when a step may lack some of them from the start (missing
            labels): the task set is otherwise learnt from the first step. A later step may
            leave tasks out (a dict without them, or ``None`` for them): see
            :meth:`backward`. With ``tasks`` given, any other name is refused.
        solve_every: amortised balancing (:mod:`mtlbal._amortise`): with ``k > 1`` the
            per-task gradients are formed and the aggregator solved on the first step and then
            every ``k``-th step (and on a step whose task set changed); in between the last
            weights ``w`` are reused with one ordinary backward of ``Σ_t w_t ℓ_t`` (the heads
            still receive ``Σ_t ∇ℓ_t``), ``info.reused`` set. Needs a Gramian aggregator (its
            update is ``Jᵀ w``); refused with a Jacobian aggregator, transforms, gradient
            accumulation or modality branches. The aggregator's state advances on solve steps
            only. Default 1 (solve every step).

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
        select: str | int | None = None,
        transforms: Sequence[GradientTransform] | GradientTransform | None = None,
        nonfinite: NonFinitePolicy = "raise",
        check_connected: Literal["first", "always", "never"] = "first",
        diagnostics: bool = False,
        chunk_size: int | None = None,
        engine: Literal["auto", "dense", "layerwise"] = "auto",
        branches: Sequence[nn.Module] | BranchCalibration | None = None,
        accumulate: int = 1,
        tasks: Sequence[str] | None = None,
        solve_every: int = 1,
    ) -> None:
        # ---- validate the whole configuration first: no hook exists until it has passed
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
        if nonfinite not in ("raise", "skip", "off"):
            raise ValueError(f"nonfinite must be 'raise', 'skip' or 'off', got {nonfinite!r}")
        if check_connected not in ("first", "always", "never"):
            raise ValueError("check_connected must be 'first', 'always' or 'never'")
        if engine not in ("auto", "dense", "layerwise"):
            raise ValueError(f"unknown engine {engine!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate must be a positive int, got {accumulate!r}")
        if accumulate > 1 and engine == "layerwise":
            raise ValueError(
                "engine='layerwise' forms Gramians per batch, which do not add up over "
                "micro-batches: gradient accumulation keeps dense per-task gradients (use "
                "engine='dense' or 'auto')"
            )
        if accumulate > 1 and branches is not None:
            raise ValueError("modality branches (FULLER) do not support gradient accumulation yet")
        if weighting is not None and not isinstance(weighting, LossWeighting):
            raise TypeError(
                f"weighting must be an mtlbal.weighting strategy, got {type(weighting).__name__}"
            )
        if aggregator is not None and not isinstance(aggregator, Aggregator):
            raise TypeError(
                f"aggregator must be an mtlbal.aggregation strategy, got "
                f"{type(aggregator).__name__}"
            )
        if not (at == "params" or isinstance(at, nn.Module)):
            raise ValueError(f"at must be 'params' or an nn.Module, got {at!r}")
        check_selector(select)
        if select is not None and not isinstance(at, nn.Module):
            raise ValueError("select= names an element of a cut point's output: it needs at=module")
        if transforms is None:
            tlist: list[GradientTransform] = []
        elif isinstance(transforms, GradientTransform):
            tlist = [transforms]
        else:
            tlist = list(transforms)
        for t in tlist:
            if not isinstance(t, GradientTransform):
                raise TypeError(f"transforms must be GradientTransforms, got {type(t).__name__}")
        declared = _check_declared_tasks(tasks, weighting)
        _amortise.check_solve_every(
            solve_every,
            aggregator=aggregator,
            transforms=tlist,
            accumulate=accumulate,
            branches=branches,
        )
        calib: BranchCalibration | None = None
        if branches is not None:
            calib = (
                branches
                if isinstance(branches, BranchCalibration)
                else BranchCalibration(list(branches))
            )
            if isinstance(at, nn.Module) and any(m is at for m in calib.modules):
                raise ValueError("a modality branch cannot also be the cut point")

        self.shared_params = params
        self._shared_ids = {id(p) for p in params}
        self.weighting: LossWeighting = weighting if weighting is not None else Equal()
        self.aggregator = aggregator
        self.transforms = tlist
        self.nonfinite: NonFinitePolicy = nonfinite
        self.check_connected = check_connected
        self.diagnostics = diagnostics
        self.chunk_size = chunk_size
        self.engine = engine
        self.at: Literal["params"] | nn.Module = at
        self.select = select
        self.accumulate = accumulate
        self.solve_every = solve_every
        self._amortiser = _amortise.Amortiser(solve_every) if solve_every > 1 else None
        self.step_count = 0
        # every task name (canonical order): declared, or learnt from the first step
        self.tasks: tuple[str, ...] | None = declared
        self._declared_tasks = declared
        self._checked_for: tuple[str, ...] | None = None
        self._hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self.weighting.bind(self.shared_params, self.shared_modules)
        for t in self.transforms:
            t.bind(self.shared_params, self.shared_modules)
        # fixed by the configuration: computed once, not per step
        self._needs_grads = self._needs_per_task_grads()
        if calib is not None and not isinstance(at, nn.Module) and self._needs_grads:
            raise ValueError(
                "modality branches with per-task gradients need a cut point downstream of "
                "the fusion (at=module): at 'params' the gradient entering the branches is "
                "not defined for every aggregator"
            )
        # what the strategies declared they need: exactly this is computed per step
        needs: set[Need] = set()
        for st in self.strategies:
            needs.update(getattr(st, "needs", frozenset()))
        self.needs: frozenset[Need] = frozenset(needs)
        if Need.CLOSURE in self.needs:
            who = next(
                type(st).__name__
                for st in self.strategies
                if Need.CLOSURE in getattr(st, "needs", frozenset())
            )
            if at != "params":
                raise ValueError(
                    f"{who} perturbs the shared parameters and needs their per-task gradients: "
                    "use at='params', not a cut point"
                )
            if accumulate > 1:
                raise ValueError(f"{who} re-runs the forward (a closure): no gradient accumulation")
            if calib is not None:
                raise ValueError(f"{who} does not combine with modality branches")
        if Need.SALIENCY in self.needs:
            who = next(
                type(st).__name__
                for st in self.strategies
                if Need.SALIENCY in getattr(st, "needs", frozenset())
            )
            if not isinstance(at, nn.Module):
                raise ValueError(
                    f"{who} regularises the task saliencies at the shared representation: it "
                    "needs a cut point (at=module)"
                )
            if accumulate > 1:
                raise ValueError(f"{who} does not support gradient accumulation yet")
        self._accum_mode: AccumulationMode = self._accumulation_mode()
        if accumulate > 1:
            self._check_accumulation()
        # the open accumulation window (mtlbal._accumulate), if any
        self._window: Window | None = None
        self.last_info: StepInfo | None = None
        # the loss tensors of the last committed step (their graph is freed): passing one again
        # is refused before anything runs
        self._spent: list[weakref.ref[Tensor]] = []
        # batched per-task backward, or one task at a time where the graph cannot be batched
        # (a torch.compile'd model): decided at the first step that forms them, then kept
        self._batched_backward = BatchedBackward()
        # the path of each shared parameter at the last step (engine.report), warned once
        self._engine_paths: dict[int, tuple[str, str, bool]] | None = None
        self._warned_fallback = False
        self._names_cache: dict[int, tuple[str, str]] | None = None
        self._by_design: dict[int, str] | None = None

        # ---- hooks last; all removed if any registration fails, and when the Balancer is
        # garbage-collected without remove()
        self._cut: CutPoint | None = None
        self._capture: LayerwiseCapture | None = None
        self._norm_capture: LayerwiseCapture | None = None
        self._norm_mode = BatchedBackward()
        self._branches: BranchStage | None = None
        try:
            if isinstance(at, nn.Module):
                self._cut = CutPoint(at, detach=self._needs_grads, select=select)
            # the layer-wise engine's forward hooks exist only when per-task gradients at the
            # parameters will be needed: loss-level strategies keep a hook-free forward
            if (
                engine in ("auto", "layerwise")
                and at == "params"
                and self._needs_grads
                and accumulate == 1
                and Need.CLOSURE not in self.needs  # the perturbed forwards would be recorded
            ):
                capture = LayerwiseCapture(self.shared_modules)
                if capture.modules or engine == "layerwise":
                    self._capture = capture
                else:
                    capture.remove()
            if (
                engine in ("auto", "layerwise")
                and at == "params"
                and accumulate == 1
                and Need.LAYER_NORMS in self.weighting.needs
            ):
                self._norm_capture = self._layer_norm_capture()
            if calib is not None:
                self._branches = BranchStage(calib)
        except BaseException:
            self.remove()
            raise
        self._finalizer = weakref.finalize(self, _remove_all, self._handles())

    def _handles(self) -> list[Any]:
        out: list[Any] = []
        if self._cut is not None:
            out.append(self._cut)
        if self._capture is not None:
            out.append(self._capture)
        if getattr(self, "_norm_capture", None) is not None:
            out.append(self._norm_capture)
        if self._branches is not None:
            out.append(self._branches)
        return out

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

    def to(
        self, device: torch.device | str | int | None = None, dtype: torch.dtype | None = None
    ) -> Balancer:
        """Move the strategies' state and learnable parameters to ``device`` and/or cast their
        floating-point tensors to ``dtype`` (the model is the user's); returns ``self``.

        Parameters keep their identity (their contents are swapped, also across devices), so
        an optimizer that holds them keeps stepping them; its *state* (Adam's moments) is its
        own: with :func:`mtlbal.wrap` call ``opt.to(...)``, which moves this Balancer and makes
        that state follow. A strategy's declared defaults (what ``reset()`` restores) move too.
        """
        previous = torch.__future__.get_swap_module_params_on_conversion()
        # nn.Module.to assigns .data where it can and builds new Parameters where it cannot
        # (e.g. to "meta"); swapping keeps the Parameter objects in every case
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            for s in self.strategies:
                s.to(device=device, dtype=dtype)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(previous)
        return self

    def register_hook(self, hook: Callable[[Balancer, StepInfo], None]) -> RemovableHandle:
        """Call ``hook(balancer, info)`` after every committed step; returns a handle."""
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    def remove(self) -> None:
        """Drop every hook the Balancer registered on the model (cut point, branches, layers)."""
        for h in self._handles():
            h.remove()
        self._cut = None
        self._branches = None
        self._capture = None
        self._norm_capture = None
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
        skipped step. Tasks are matched by name (a dict in another order is reordered); under
        DDP the strategies see the rank mean. All-or-nothing like :meth:`backward`."""
        if self._window is not None:
            raise ValueError(
                "update() while an accumulation window is open: call it after the window's "
                "last micro-batch and optimizer.step(), with the losses re-evaluated on the "
                "window's micro-batches (their mean)"
            )
        if self.last_info is None:
            raise ValueError("update() needs a previous backward() on this Balancer")
        if self.last_info.skipped:
            return
        tasks = self.last_info.tasks
        if dist_util.world_size() == 1:
            stacked = self._update_losses(losses, tasks)
        else:
            # a rank that refuses its losses makes every rank refuse: the refusal travels in
            # the one all_reduce that averages them (no rank is left waiting in it)
            error: Exception | None = None
            local: Tensor | None = None
            try:
                local = self._update_losses(losses, tasks)
            except Exception as e:
                error = e
            mean = dist_util.all_mean_or_refused(local, len(tasks))
            if mean is None:
                dist_util.raise_refused(error)
            assert mean is not None and local is not None
            stacked = mean.to(local.dtype)
        if self.nonfinite != "off" and not bool(torch.isfinite(stacked).all()):
            if self.nonfinite == "raise":
                bad = [n for n, ok in zip(tasks, torch.isfinite(stacked).tolist()) if not ok]
                raise ValueError(f"update(): non-finite loss for task(s) {bad}")
            return
        snapshot = StrategySnapshot(self.strategies)
        try:
            for s in self.strategies:
                fn = getattr(s, "update", None)
                if callable(fn):
                    fn(stacked)
        except BaseException:
            snapshot.restore()
            raise

    def observe_validation(self, losses: Losses) -> None:
        """Feed the per-task validation losses to every strategy that declared
        ``Need.VALIDATION`` (CoBa): the one way validation reaches a strategy.

        ``losses``: ``{task: loss}`` (every task of the Balancer, matched by name; a mean over
        the validation set or over a few validation batches) or a sequence / ``[m]`` tensor in
        the canonical task order. Call it between optimizer steps, as often as the method wants
        (CoBa: every step or every few steps; the Lightning and Hugging Face integrations call
        it at the end of each validation loop with the per-task means). Needs the task names:
        after the first :meth:`backward`, or with ``tasks=`` given to the Balancer.

        Each strategy stores what it uses from them as its declared state (saved by
        :meth:`state_dict`). Under DDP every rank calls it with its own losses and the
        strategies see their rank mean (one ``all_reduce``; with equal validation shards, as a
        ``DistributedSampler`` gives, that is the mean over the whole validation set); a rank
        that refuses its losses makes every rank refuse. All-or-nothing: a refused call
        (a missing task, a non-finite loss, a strategy that raises) changes no state. Without
        a strategy that needs them the losses are checked and otherwise ignored.
        """
        if self._window is not None:
            raise ValueError(
                "observe_validation() while an accumulation window is open: call it after the "
                "window's last micro-batch and optimizer.step()"
            )
        tasks = self.tasks
        if tasks is None:
            raise ValueError(
                "observe_validation() needs the task names: call it after the first "
                "backward(), or give tasks=(...) to the Balancer"
            )
        if dist_util.world_size() == 1:
            stacked = self._validation_losses(losses, tasks)
        else:
            error: Exception | None = None
            local: Tensor | None = None
            try:
                # the collective's device (a CUDA tensor under NCCL), back to the CPU after
                local = self._validation_losses(losses, tasks).to(dist_util.collective_device())
            except Exception as e:
                error = e
            mean = dist_util.all_mean_or_refused(local, len(tasks))
            if mean is None:
                dist_util.raise_refused(error)
            assert mean is not None
            stacked = mean.to(device="cpu", dtype=torch.float64)
        finite = torch.isfinite(stacked)
        if not bool(finite.all()):
            bad = [n for n, ok in zip(tasks, finite.tolist()) if not ok]
            raise ValueError(f"observe_validation(): non-finite validation loss for task(s) {bad}")
        snapshot = StrategySnapshot(self.strategies)
        try:
            for s in self.strategies:
                if Need.VALIDATION not in getattr(s, "needs", frozenset()):
                    continue
                fn = getattr(s, "observe_validation", None)
                if not callable(fn):
                    raise TypeError(
                        f"{type(s).__name__} declares Need.VALIDATION but has no "
                        "observe_validation(losses) method"
                    )
                fn(stacked)
        except BaseException:
            snapshot.restore()
            raise

    @staticmethod
    def _validation_losses(losses: Losses, tasks: tuple[str, ...]) -> Tensor:
        if isinstance(losses, Mapping):
            names = tuple(str(k) for k in losses)
            missing = [t for t in tasks if t not in names]
            unknown = [n for n in names if n not in tasks]
            if missing or unknown:
                raise ValueError(
                    "observe_validation() needs a validation loss for every task: "
                    + "; ".join(
                        x
                        for x in (
                            f"missing {missing}" if missing else "",
                            f"unknown {unknown}" if unknown else "",
                        )
                        if x
                    )
                    + f" (the tasks are {list(tasks)})"
                )
            by_name = {str(k): v for k, v in losses.items()}
            values = [by_name[n] for n in tasks]
        elif isinstance(losses, Tensor):
            values = list(losses.detach().reshape(-1).unbind(0))
        else:
            values = list(losses)
        if len(values) != len(tasks):
            raise ValueError(
                f"observe_validation() got {len(values)} losses for {len(tasks)} tasks "
                f"{list(tasks)}"
            )
        out = []
        for n, v in zip(tasks, values):
            t = torch.as_tensor(v).detach()
            if t.numel() != 1:
                raise ValueError(
                    f"observe_validation(): the validation loss of task {n!r} must be a scalar, "
                    f"got shape {tuple(t.shape)}"
                )
            out.append(t.reshape(()).to(device="cpu", dtype=torch.float64))
        return torch.stack(out)

    @staticmethod
    def _update_losses(losses: Losses, tasks: tuple[str, ...]) -> Tensor:
        if isinstance(losses, Mapping):
            names = tuple(str(k) for k in losses)
            if sorted(names) != sorted(tasks):
                raise ValueError(
                    f"update() got tasks {list(names)}, the last backward had {list(tasks)}"
                )
            by_name = {str(k): v for k, v in losses.items()}
            values = [by_name[n] for n in tasks]
        elif isinstance(losses, Tensor):
            values = list(losses.reshape(-1).unbind(0))
        else:
            values = list(losses)
        if len(values) != len(tasks):
            raise ValueError(f"update() got {len(values)} losses for {len(tasks)} tasks")
        return torch.stack([torch.as_tensor(v).reshape(()) for v in values]).detach()

    def state_dict(self) -> dict[str, Any]:
        """The step, the task names, the configuration and every strategy's state (the format
        is described in :mod:`mtlbal._checkpoint`)."""
        return balancer_state_dict(self)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> Any:
        """Restore :meth:`state_dict`'s output, all of it checked before anything is assigned
        (a refused state raises ``ValueError`` and changes nothing); ``strict`` as for
        ``torch.nn.Module``. See :func:`mtlbal._checkpoint.load_balancer_state_dict`."""
        out = load_balancer_state_dict(self, state, strict)
        self._window = None  # a loaded state starts between optimizer steps
        return out

    def __repr__(self) -> str:
        at = "params" if self.at == "params" else type(self.at).__name__
        if self.select is not None:
            at += f"[{self.select!r}]"
        parts = [f"weighting={self.weighting!r}"]
        if self.aggregator is not None:
            parts.append(f"aggregator={self.aggregator!r}")
        parts.append(f"at={at}")
        if self.transforms:
            parts.append(f"transforms={self.transforms!r}")
        for name, default in (
            ("nonfinite", "raise"),
            ("check_connected", "first"),
            ("diagnostics", False),
            ("chunk_size", None),
            ("engine", "auto"),
            ("solve_every", 1),
        ):
            value = getattr(self, name)
            if value != default:
                parts.append(f"{name}={value!r}")
        if self._branches is not None:
            parts.append(f"branches={self._branches.calibration!r}")
        parts.append(f"shared_params={len(self.shared_params)}")
        return f"Balancer({', '.join(parts)})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_finalizer", None)
        state["_spent"] = []  # weak references to per-step tensors
        state["_window"] = None  # an open window's sums hold this step's gradients
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # identities are per object: a copy's parameters are new tensors
        self._shared_ids = {id(p) for p in self.shared_params}
        self._spent = []
        self.__dict__.setdefault("_batched_backward", BatchedBackward())
        self.__dict__.setdefault("_window", None)
        self.__dict__.setdefault("accumulate", 1)
        self._engine_paths = None  # keyed by the original's parameter ids
        self._names_cache = None
        self._by_design = None
        self.__dict__.setdefault("_warned_fallback", False)
        self.__dict__.setdefault("solve_every", 1)
        self.__dict__.setdefault("_amortiser", None)
        self.__dict__.setdefault("_norm_capture", None)
        self.__dict__.setdefault("_norm_mode", BatchedBackward())
        self._finalizer = weakref.finalize(self, _remove_all, self._handles())

    # ------------------------------------------------------------------ the step
    def backward(
        self,
        losses: Losses,
        *,
        scaler: Any | None = None,
        lr_factor: float | None = None,
        last: bool | None = None,
        closure: Callable[[], Any] | None = None,
    ) -> StepInfo:
        """Fill ``.grad`` of every parameter the losses reach; return what was done.

        All or nothing: if any stage refuses the step (bad input, a non-finite loss or
        gradient under ``nonfinite="raise"``, a solver that raises, a graph already freed),
        no ``.grad``, strategy state, generator or counter has changed.

        Args:
            losses: ``{task_name: scalar}`` or a sequence of scalar losses (unscaled). A dict
                is matched by name: after the first step its order does not matter.
            scaler: a ``torch.amp.GradScaler`` for mixed precision. Strategies see the
                *unscaled* losses, and gradient-level methods the *unscaled* Gramian (so every
                method is exact, whatever its homogeneity); the objectives are scaled by
                ``scaler.scale`` (no host sync) before any gradient is taken, so ``.grad`` holds
                scaled gradients for ``scaler.step(opt)`` to unscale and check, as with a plain
                ``scaler.scale(loss).backward()``. A per-task gradient that overflows is handed
                to the scaler: ``.grad`` receives the plain (non-finite) summed gradient, the
                strategies' state is left unchanged and ``info.skipped`` is set, so
                ``scaler.step`` skips the step and ``scaler.update`` lowers the scale exactly
                as for a plain step.
            lr_factor: ``lr_0 / lr_now`` of the optimizer, for strategies that declare
                ``Need.LR_FACTOR`` (IGB v2's reward scale); :func:`mtlbal.wrap` passes it.
                Default 1.0 (a constant learning rate).
            last: gradient accumulation (see the ``accumulate`` argument of the Balancer and
                :mod:`mtlbal._accumulate`): ``losses`` are one micro-batch's, and this call
                closes the window (``True``: solve over the micro-batches so far and write
                ``.grad``) or not (``False``: keep them, write nothing, ``info.pending``).
                Default ``None``: close when the window holds ``accumulate`` micro-batches
                (every call when ``accumulate=1``).
            closure: for a strategy that declares ``Need.CLOSURE`` (F-MTL): a function
                without arguments that runs the forward on the same batch again and returns
                the losses (a dict with the same task names, or a sequence in the same order).
                It is called with the parameters perturbed, which are restored bitwise after
                each call. Required by such a strategy, refused otherwise.
        """
        if Need.CLOSURE in self.needs:
            if closure is None:
                who = next(
                    type(st).__name__
                    for st in self.strategies
                    if Need.CLOSURE in getattr(st, "needs", frozenset())
                )
                raise ValueError(
                    f"{who} needs a closure that re-runs the forward and returns the losses: "
                    "call backward(losses, closure=closure) (nothing was changed)"
                )
            if not callable(closure):
                raise TypeError(f"closure must be callable, got {type(closure).__name__}")
            if scaler is not None:
                raise ValueError("a closure-driven step (F-MTL) does not support a GradScaler")
        elif closure is not None:
            raise ValueError(
                "a closure was given but no strategy of this Balancer needs one "
                "(Need.CLOSURE: F-MTL)"
            )
        if last is not None and not isinstance(last, bool):
            raise TypeError(f"last must be True, False or None, got {last!r}")
        window = self._window
        count = 1 if window is None else window.count + 1
        closing = last if last is not None else count >= self.accumulate
        try:
            step = self._validate(losses)
        except _Refused as r:  # under DDP: a non-finite loss on some rank, skipped by all
            self._window = None  # the whole window is skipped
            return self._skipped(r.args[0])
        step.lr_factor = 1.0 if lr_factor is None else float(lr_factor)
        step.closure = closure
        if window is not None or not closing:
            return self._accumulate_step(step, scaler, closing)
        snapshot = StrategySnapshot(self.strategies)
        try:
            info = self._solve(step, scaler)
            snapshot.verify()
        except _Refused:
            snapshot.restore()
            return self._skipped(step)
        except BaseException:
            snapshot.restore()
            raise
        if info.skipped:  # an overflow handed to the GradScaler: no strategy state changes
            snapshot.restore()
        self._commit(step, info)
        return info

    def _context(self, step: _Step) -> tuple[Tensor, StepContext]:
        """The losses the strategies differentiate and the step's context. Under DDP the
        strategies see the global losses (``step.raw``) while the graph stays the local one."""
        stacked = step.stacked
        if step.world > 1:
            stacked = stacked + (step.raw - step.stacked.detach())
        ctx = StepContext(
            step=self.step_count,
            tasks=step.names,
            losses=step.raw,
            lr_factor=step.lr_factor,
            present=step.present,
            all_tasks=step.all_names,
        )
        return stacked, ctx

    # ---- gradient accumulation (mtlbal._accumulate)
    def _accumulation_mode(self) -> AccumulationMode:
        if isinstance(self.at, nn.Module) and self._needs_grads:
            return "cut"
        if (
            not self._needs_grads
            and getattr(self.weighting, "linear_in_losses", False)
            and Need.LAYER_NORMS not in self.weighting.needs
        ):
            return "linear"
        return "jacobian"

    def _check_accumulation(self) -> None:
        if getattr(self, "_branches", None) is not None:
            raise ValueError("modality branches (FULLER) do not support gradient accumulation yet")
        agg = self.aggregator
        if (
            self._accum_mode == "cut"
            and agg is not None
            and Need.GRAMIAN in agg.needs
            and not isinstance(agg, GramianAggregator)
        ):
            raise ValueError(
                f"{type(agg).__name__} needs the Jacobian at the cut point, which gradient "
                "accumulation would have to keep for the whole window (with every "
                "micro-batch's graph): use at='params', or a Gramian-based aggregator at the cut"
            )

    def _accumulate_step(self, step: _Step, scaler: Any | None, closing: bool) -> StepInfo:
        self._check_accumulation()
        window = self._window
        if window is not None:
            if sorted(window.names) != sorted(step.names) or sorted(window.all_names) != sorted(
                step.all_names
            ):
                raise ValueError(
                    f"this micro-batch has tasks {list(step.names)}, the accumulation window "
                    f"has {list(window.names)}: every micro-batch of an optimizer step must have "
                    "the same tasks"
                )
            if step.names != window.names:
                by_name = dict(zip(step.names, step.values))
                raw = dict(zip(step.names, step.raw.unbind(0)))
                step.names = window.names
                step.values = [by_name[n] for n in window.names]
                step.stacked = torch.stack(step.values)
                step.raw = torch.stack([raw[n] for n in window.names])
            if step.all_names != window.all_names:
                step.all_names = window.all_names
            if step.present is not None:
                step.present = tuple(window.all_names.index(n) for n in window.names)
        else:
            window = Window(self._accum_mode, step.names, step.all_names)
        snapshot = StrategySnapshot(self.strategies)
        try:
            part, weighted = _accumulate.micro_batch(self, step, window, scaler)
            if not closing:
                snapshot.restore()  # a pending micro-batch leaves the strategies as they were
                window.add(step.raw, **part)
                window.spent.extend(weakref.ref(v) for v in step.given)
                self._window = window
                return self._pending(step, window)
            self._window = None  # closing: the window is consumed, whatever happens next
            window.add(step.raw, **part)
            info = _accumulate.close(self, step, window, weighted, scaler)
            snapshot.verify()
        except _Refused:
            snapshot.restore()
            return self._skipped(step)
        except BaseException:
            snapshot.restore()
            raise
        if info.skipped:
            snapshot.restore()
        step.given = [v for v in (r() for r in window.spent) if v is not None] + step.given
        self._commit(step, info)
        return info

    def _pending(self, step: _Step, window: Window) -> StepInfo:
        zeros = torch.zeros_like(step.raw)
        info = StepInfo(step.names, step.raw, zeros, zeros, step=self.step_count)
        info.pending = True
        info.micro_batches = window.count
        info.missing = _absent(step)
        return info

    def _combined(self, p: Tensor, g: Tensor) -> Tensor:
        """The transforms' ``combined`` on the gradient reaching a shared parameter, where no
        per-task gradient of it was formed (the accumulation window's direct writes)."""
        if id(p) in self._shared_ids:
            for t in self.transforms:
                if t.applies_to(p):
                    g = t.combined(p, g)
        return g

    def _skipped(self, step: _Step) -> StepInfo:
        zeros = torch.zeros_like(step.raw)
        info = StepInfo(step.names, step.raw, zeros, zeros, skipped=True, step=self.step_count)
        info.missing = _absent(step)
        self.last_info = info
        return info

    # ---- stage 1: validate
    def _validate(self, losses: Losses) -> _Step:
        world = dist_util.world_size()
        if world > 1:
            return self._validate_global(losses, world)
        return self._validate_local(losses, world)

    def _validate_local(self, losses: Losses, world: int) -> _Step:
        self._check_not_spent(losses)
        names, values, all_names, present = self._normalize(losses)
        if present is not None:
            self._check_missing_supported(names, all_names)
        captured = self._cut.take() if self._cut is not None else []
        branch_caps = self._branches.take() if self._branches is not None else None
        records = self._capture.take() if self._capture is not None else []
        norm_records = self._norm_capture.take() if self._norm_capture is not None else []
        if self._cut is not None and not captured:
            raise ValueError(
                f"no output of the cut point {type(self._cut.module).__name__} was captured "
                "since the last backward: run the forward pass (with grad enabled) first. The "
                "next backward takes every output captured since the previous one, so two "
                "forwards before two backwards leave the second with none: run forward and "
                "backward in turn, or pass both forwards' losses to one backward (e.g. summed "
                "per task)"
            )
        stacked = torch.stack(values)
        step = _Step(
            names=names,
            values=values,
            stacked=stacked,
            raw=stacked.detach(),
            world=world,
            captured=captured,
            branch_caps=branch_caps,
            records=records,
            norm_records=norm_records,
            given=given_tensors(losses),
            all_names=all_names,
            present=present,
        )
        self._check_connected(step)
        return step

    def _validate_global(self, losses: Losses, world: int) -> _Step:
        # every rank validates its own losses, then ONE collective agrees on the verdict: a
        # refusal on any rank (a local error, other task names or count, a non-finite loss)
        # is a refusal on every rank, so none is left waiting in a later collective
        error: Exception | None = None
        try:
            step: _Step | None = self._validate_local(losses, world)
        except Exception as e:
            step, error = None, e
        flag = None
        if step is not None and self.nonfinite != "off":
            flag = ~torch.isfinite(step.raw).all()
        device = dist_util.collective_device() if step is None else step.raw.device
        verdict = dist_util.agree(None if step is None else step.names, flag, device)
        if verdict.refused:
            dist_util.raise_refused(error)
        assert step is not None
        if not verdict.same_names:
            dist_util.check_same_names(step.names)  # raises on every rank, listing the names
            raise AssertionError("unreachable: the task names hash differently")
        self._agree_order(step)
        if verdict.nonfinite:
            try:
                self._refuse_losses(step, elsewhere=True)
            except _Refused:
                raise _Refused(step) from None
        step.raw = dist_util.all_mean(step.raw)
        return step

    def _check_not_spent(self, losses: Losses) -> None:
        spent = [r() for r in self._spent]
        for v in given_tensors(losses):
            if isinstance(v, Tensor) and any(v is s for s in spent):
                raise ValueError(
                    "these losses were already backpropagated by a previous backward() (their "
                    "graph is freed): run the forward pass again for a new step"
                )

    def _agree_order(self, step: _Step) -> None:
        # the first step (and a new task set) fixes one order for every rank: rank 0's. The
        # ranks agree on the task set and share self.tasks and step_count, so all of them take
        # this branch (the first step too when the tasks were declared: tasks= may list them in
        # another order on another rank)
        if (
            self.tasks is None
            or self.step_count == 0
            or sorted(self.tasks) != sorted(step.all_names)
        ):
            order = tuple(dist_util.check_same_names(step.all_names))
            if order != step.all_names:
                by_name = dict(zip(step.names, step.values))
                names = tuple(n for n in order if n in by_name)
                if self._checked_for == step.names:
                    self._checked_for = names
                step.all_names = order
                step.names = names
                if step.present is not None:
                    step.present = tuple(i for i, n in enumerate(order) if n in by_name)
                step.values = [by_name[n] for n in names]
                step.stacked = torch.stack(step.values)
                step.raw = step.stacked.detach()

    def _normalize(self, losses: Losses) -> Normalized:
        return normalize_losses(
            losses,
            expected=self.weighting.num_tasks,
            expected_by=type(self.weighting).__name__,
            known=self.tasks,
            stateful=any(getattr(s, "is_stateful", False) for s in self.strategies),
            declared=self._declared_tasks is not None,
        )

    def _check_missing_supported(self, names: tuple[str, ...], all_names: tuple[str, ...]) -> None:
        # before anything runs: a refusal here leaves every tensor and counter as it was
        absent = [n for n in all_names if n not in names]
        for s in self.strategies:
            if not s.handles_missing_tasks:
                raise ValueError(
                    f"{type(s).__name__} does not support a step with missing tasks: no loss for "
                    f"task(s) {', '.join(map(repr, absent))} (present: {list(names)}); "
                    f"{s.missing_tasks_note}"
                )

    def _check_connected(self, step: _Step) -> None:
        if self.check_connected == "never":
            return
        if (
            self.check_connected == "first"
            and self._checked_for is not None
            and set(step.names) <= set(self._checked_for)
        ):  # every task of this step was checked (a missing-task step checks nothing new)
            return
        bypass: set[int] = set()
        if self._cut is not None:
            targets = {id(leaf) if leaf is not z else id(z.grad_fn) for z, leaf in step.captured}
            where = f"the cut point {type(self._cut.module).__name__}"
            if self._cut.detach and len(step.captured) > 1:
                self._check_not_nested(step, where)
            if self._cut.select is not None and self._cut.detach:
                # the other elements of the output keep their graph: a loss that reaches the
                # trunk through one of them would escape the per-task gradients at the cut
                bypass = self._shared_ids
                where += f" (select={self._cut.select!r})"
            elif self._cut.detach:
                # a head that reuses a weight of the cut module (a tied weight, a trunk layer
                # called on the representation) would give it a share that escapes the
                # per-task gradients at the cut
                bypass = {id(p) for p in self._cut.module.parameters() if p.requires_grad}
        else:
            targets = self._shared_ids
            where = "the shared parameters"
        for n, v in zip(step.names, step.values):
            _, hit = reachable([v], targets | bypass)
            if not hit & targets:
                raise ValueError(
                    f"the loss of task {n!r} does not depend on {where}: check the model wiring "
                    "(a detached tensor, or a head that bypasses the shared part)"
                )
            if hit & bypass and self._cut is not None and self._cut.select is None:
                raise ValueError(
                    f"the loss of task {n!r} reaches the parameters of {where} other than "
                    "through its output (a head that reuses a trunk layer or a tied weight): "
                    "per-task gradients are taken at the output only, so that share would "
                    "escape the aggregator. Untie the weight, or use at='params'"
                )
            if hit & bypass:
                raise ValueError(
                    f"the loss of task {n!r} reaches the shared parameters other than through "
                    f"the selected output of {where}: per-task gradients are taken at the "
                    "selected element only, so a head must not read the trunk through another "
                    "element of the output (select the one the heads read)"
                )
        self._checked_for = step.names

    @staticmethod
    def _check_not_nested(step: _Step, where: str) -> None:
        # a call of the cut module on (a function of) its own earlier output: the per-task
        # gradients are taken at detached leaves, so the gradient reaching an earlier output
        # through a later call would stop at its leaf (silently wrong .grad). Parallel calls
        # (a siamese trunk, several inputs) are fine.
        earlier: set[int] = set()
        for k, (z, leaf) in enumerate(step.captured):
            if earlier and reachable([z], earlier)[1]:
                raise ValueError(
                    f"{where} runs on its own output: its call {k + 1} of this forward depends "
                    "on an earlier call's output (a layer applied repeatedly, or a head that "
                    "reuses it). Per-task gradients at a cut point need the cut's outputs to be "
                    "read by the heads only: cut at a module after the last repeated call, or "
                    "use at='params'"
                )
            earlier.add(id(leaf))

    def _refuse(self, step: _Step, domain: tuple[Tensor, str] | None) -> None:
        """After a failed check: refuse for a non-finite loss, or a loss outside the weighting's
        domain (naming the tasks). Returns when neither is the cause (a gradient is)."""
        if not bool(torch.isfinite(step.raw).all()):
            self._refuse_losses(step)
        if domain is not None and not bool(domain[0].all()):
            ok = domain[0].tolist()
            bad = ", ".join(
                f"{n!r} (L = {float(v)!r})"
                for n, v, k in zip(step.names, step.raw.tolist(), ok)
                if not k
            )
            raise ValueError(f"{domain[1]}: task(s) {bad}")

    def _refuse_losses(self, step: _Step, *, elsewhere: bool = False) -> None:
        """A non-finite loss: raise naming the task(s), or skip, per ``nonfinite``."""
        if self.nonfinite == "skip":
            raise _Refused
        ok = torch.isfinite(step.raw).tolist()
        bad = [n for n, f in zip(step.names, ok) if not f]
        if bad:
            values = ", ".join(f"{n}={step.raw[step.names.index(n)].item()}" for n in bad)
            raise ValueError(f"non-finite loss for task(s) {', '.join(map(repr, bad))}: {values}")
        assert elsewhere
        raise ValueError("non-finite loss on another rank: every rank refuses this step")

    # ---- stages 2-4: weigh, form, check, solve (everything staged, nothing written)
    def _solve(self, step: _Step, scaler: Any | None) -> StepInfo:
        world = step.world
        needs_grads = self._needs_grads
        checking = self.nonfinite != "off" or scaler is not None
        stacked, ctx = self._context(step)
        if self._branches is not None and isinstance(self._branches.calibration, ARL):
            # from the (global) losses, before anything is written: a refusal changes nothing
            step.branch_coeffs = self._branches.calibration.coefficients(
                dict(zip(step.names, step.raw.unbind()))
            )
        if Need.LAYER_NORMS in self.weighting.needs:
            ctx.layer_grad_norms = self._layer_grad_norms(step)
        weighted = self.weighting.objectives(stacked, ctx)
        for q, g in weighted.param_grads:
            step.writes.add(q, g)
        objectives, aux = weighted.objectives, weighted.aux
        if scaler is not None:
            objectives = scaler.scale(objectives)
            aux = None if aux is None else scaler.scale(aux)
            step.scale = scaler.scale(torch.ones((), device=objectives.device, dtype=torch.float32))
        info = StepInfo(step.names, step.raw, weighted.weights.detach(), weighted.weights.detach())
        total = objectives.sum() if aux is None else objectives.sum() + aux

        domain = weighted.domain if checking else None
        amortiser = self._amortiser
        reuse = amortiser is not None and not amortiser.due(self.step_count, step.names)
        if not needs_grads or reuse:  # the loss-level backward only
            # the losses (and the weighting's domain) are checked before anything is formed:
            # the one host sync of the step
            if (world == 1 and checking) or domain is not None:
                ok = torch.isfinite(step.raw).all()
                if domain is not None:
                    ok = ok & domain[0].all()
                if not bool(ok):
                    self._refuse(step, domain)
            if reuse:  # amortised balancing: the stored weights, one weighted backward
                assert amortiser is not None and amortiser.weights is not None
                _amortise.reuse_step(
                    step, info, amortiser.weights, objectives, aux, self._shared_ids
                )
                return info
            if self._cut is not None:
                step.captured = []
            step.writes.backward([total], [None])
            return info
        grads: PerTaskGrads
        if self._cut is not None:
            grads = self._form_at_cut(step, objectives, stacked, total)
        else:
            grads = self._form_at_params(step, objectives, aux)
            if not self._batched_backward.batched:  # the exact fallback (fallback.py)
                info.extras["per_task_backward"] = self._batched_backward.reason
            if self._engine_paths is not None:
                names = self._param_names()
                info.engine_paths = {
                    names[pid][0]: path for pid, (path, _, _) in self._engine_paths.items()
                }
        gram = grads.gramian()
        if step.regularizer is not None:
            info.extras["rep_mtl"] = step.regularizer
        if checking:
            finite = torch.isfinite(gram.diagonal()).all()
            if world == 1:
                finite = finite & torch.isfinite(step.raw).all()
            if domain is not None:
                finite = finite & domain[0].all()
            if not bool(finite):  # the one host sync of the step
                self._refuse(step, domain)
                return self._nonfinite_grads(step, grads, gram, info, scaler)
        unscaled = gram if step.scale is None else gram / (step.scale.to(gram.dtype) ** 2)
        info.gramian = unscaled.detach()
        if step.closure is not None:
            assert isinstance(grads, DensePerTaskGrads)
            self._flat_pass(step, grads, info, ctx, checking)
        self._aggregate(step, grads, unscaled, info, ctx)
        return info

    def _nonfinite_grads(
        self, step: _Step, grads: PerTaskGrads, gram: Tensor, info: StepInfo, scaler: Any | None
    ) -> StepInfo:
        bad = [n for n, f in zip(step.names, torch.isfinite(gram.diagonal()).tolist()) if not f]
        if scaler is not None:
            # an overflow: write the plain summed gradient (non-finite) for the scaler to skip
            grads.write_weights(
                torch.ones(grads.m, dtype=gram.dtype, device=gram.device), step.writes
            )
            info.skipped = True
            info.extras["overflow"] = tuple(bad)
            return info
        if self.nonfinite == "skip":
            raise _Refused
        raise ValueError(
            f"non-finite gradient of task(s) {', '.join(map(repr, bad))} at the shared part "
            "(the losses are finite): check for inf/NaN in the backward (e.g. sqrt or log at 0)"
        )

    def _layer_grad_norms(self, step: _Step) -> Tensor:
        # at a cut point the trunk is out of the heads' graph: norms are taken at the
        # representation (LibMTL's rep_grad convention), documented on GradNorm
        if self._cut is not None:
            params: list[Tensor] = [leaf for _, leaf in step.captured]
            reduce: Callable[[Tensor], Tensor] | None = None
            if step.world > 1:  # per-sample blocks: the global norm² is the sum over ranks
                w = step.world

                def local(x: Tensor) -> Tensor:
                    return x * (1.0 / w)

                norms2 = task_grad_norms(step.values, params, reduce=local).pow(2)
                torch.distributed.all_reduce(norms2)
                return norms2.sqrt().detach()
        else:
            params = list(self.weighting.grad_norm_params())
            if self._identity_pays(step):
                # the layer-wise identity: the norms are the diagonal of the layer's Gramian,
                # ‖δ_tᵀ a‖² = ⟨(a aᵀ) δ_t, δ_t⟩, from its input a and the per-task gradients δ_t
                # at its output (no per-task weight gradient is formed; exact)
                grads = layerwise_per_task_grads(
                    step.stacked,
                    step.norm_records,
                    params,
                    retain_graph=True,
                    task_losses=step.values,
                    writes=GradWrites(),  # nothing outside the layer: no write to keep
                    mode=self._norm_mode,
                )
                return grads.gramian().diagonal().clamp_min(0).sqrt().to(step.raw.dtype).detach()
            reduce = dist_util.all_mean if step.world > 1 else None
        return task_grad_norms(step.values, params, reduce=reduce).detach()

    def _identity_pays(self, step: _Step) -> bool:
        """Whether GradNorm's norms take the layer-wise identity this step: single process,
        the layer's calls recorded, and ``N (d_in + m d_out) < 0.7 m d_in d_out`` (the identity's
        cost against ``m`` weight gradients ``δ_tᵀ a``, with a margin for its graph walks; ``N``
        the rows of every call). Shapes only: no host sync."""
        if self._norm_capture is None or step.world != 1 or not step.norm_records:
            return False
        m = len(step.values)
        rows = 0
        d_in = d_out = 0
        for rec in step.norm_records:
            d_in, d_out = rec.a.shape[-1], rec.out_shape[-1]
            rows += rec.a.numel() // max(d_in, 1)
        return rows * (d_in + m * d_out) < 0.7 * m * d_in * d_out

    def _layer_norm_capture(self) -> LayerwiseCapture | None:
        """Forward hooks on the supported layers that own exactly the parameters a weighting
        measures gradient norms on (GradNorm's ``W``); ``None`` when they are not such layers
        (the norms are then taken with one backward per task)."""
        wanted = {id(q) for q in self.weighting.grad_norm_params()}
        if not wanted:
            return None
        mods: list[nn.Module] = []
        owned: set[int] = set()
        for root in self.shared_modules:
            for mod in root.modules():
                own = {id(q) for q in mod.parameters(recurse=False) if q.requires_grad}
                # Linear layers only: for a convolution or a normalisation layer the per-task
                # loop is cheaper than the identity's batched backward and graph walks
                linear = isinstance(mod, nn.Linear) and supported_module(mod)
                if own and own <= wanted and linear and not own & owned:
                    mods.append(mod)
                    owned |= own
        if owned != wanted:
            return None
        capture = LayerwiseCapture(mods)
        if not capture.modules:
            capture.remove()
            return None
        return capture

    def _needs_per_task_grads(self) -> bool:
        # an aggregator or diagnostics; a transform only where it applies to a shared parameter
        return (
            (self.aggregator is not None and Need.GRAMIAN in self.aggregator.needs)
            or self.diagnostics
            or any(Need.SALIENCY in t.needs for t in self.transforms)
            or any(
                Need.GRAMIAN in t.needs and t.applies_to(p)
                for t in self.transforms
                for p in self.shared_params
            )
        )

    def _transform_applies(self, p: Tensor) -> bool:
        return any(t.applies_to(p) for t in self.transforms)

    def _per_task_transforms(self, p: Tensor, g: Tensor) -> Tensor:
        for t in self.transforms:
            if t.applies_to(p):
                g = t.per_task(p, g)
        return g

    def _form_at_cut(
        self, step: _Step, objectives: Tensor, stacked: Tensor, total: Tensor
    ) -> CutPerTaskGrads:
        outs = [z for z, _ in step.captured]
        leaves = [leaf for _, leaf in step.captured]
        reg = next((t for t in self.transforms if Need.SALIENCY in t.needs), None)
        extra_cot = None
        if reg is not None:
            # Rep-MTL: the saliencies with their graph; the regulariser reaches the heads in
            # the commit's backward and the trunk through its gradient at the representation
            if len(leaves) != 1:
                raise ValueError(
                    f"{type(reg).__name__} regularises one representation: the cut module ran "
                    f"{len(leaves)} times in this forward"
                )
            saliency = split_task_grads(objectives, stacked, step.values, leaves, create_graph=True)
            per_task = [s.detach() for s in saliency]
            regularizer: Callable[[Tensor], Tensor] = getattr(reg, "regularizer")  # noqa: B009
            r = regularizer(saliency[0])
            if step.scale is not None:  # the saliencies are scale-free; .grad is scaled
                r = r * step.scale.to(r.dtype)
            if r.requires_grad:  # (both λ = 0: nothing to add)
                extra_cot = list(
                    torch.autograd.grad(r, leaves, retain_graph=True, materialize_grads=True)
                )
                total = total + r
            step.regularizer = r.detach()
        else:
            per_task = split_task_grads(objectives, stacked, step.values, leaves)
        # ONE backward call at the commit runs the heads (gradient of Σ ℓ_t, plus learnable
        # strategy parameters) and the trunk (the combined gradient at z) together, so DDP's
        # reducer sees a single backward
        grads = CutPerTaskGrads(outs, per_task, extra_roots=[total])
        grads.extra_cot = extra_cot
        if step.world > 1:
            if self.aggregator is not None and not isinstance(self.aggregator, GramianAggregator):
                raise NotImplementedError(
                    f"{type(self.aggregator).__name__} needs the full Jacobian at the cut point, "
                    "which is not gathered across processes; use a Gramian-based method under DDP"
                )
            # the global loss is the rank mean of the local ones, and the per-sample blocks of
            # the representation are disjoint: G_global = Σ_r G_r / world²
            gram = grads.gramian().clone()
            torch.distributed.all_reduce(gram)
            grads.set_gramian(gram / step.world**2)
        return grads

    def _form_at_params(self, step: _Step, objectives: Tensor, aux: Tensor | None) -> PerTaskGrads:
        leaves, _ = reachable([objectives] + ([aux] if aux is not None else []), set())
        reached = {id(q) for q in leaves}
        shared = [p for p in self.shared_params if id(p) in reached]
        others = [q for q in leaves if id(q) not in self._shared_ids]
        if aux is not None:
            # the auxiliary term reaches the strategy's own parameters only
            own: list[Tensor] = [q for q in self.parameters() if q.requires_grad]
            aux_grads = torch.autograd.grad(aux, own, retain_graph=True, allow_unused=True)
            for o, ga in zip(own, aux_grads):
                if ga is not None:
                    step.writes.add(o, ga)
        if self._capture is not None and step.world == 1:
            lw = layerwise_per_task_grads(
                objectives,
                step.records,
                shared,
                others,
                chunk_size=self.chunk_size,
                retain_graph=False,
                force_fallback=[p for p in shared if self._transform_applies(p)],
                per_task_transform=self._per_task_transforms if self.transforms else None,
                task_losses=step.values,
                writes=step.writes,
                mode=self._batched_backward,
                policy="cost" if self.engine == "auto" else "cover",
            )
            self._note_paths(lw.paths, loop=lw.per_task_loop)
            return lw
        why = "engine='dense'" if self.engine == "dense" else "no supported layer recorded"
        if step.world > 1:
            why = "under DDP (the per-task gradients are all-reduced)"
        self._note_paths({id(p): ("batched", why, False) for p in shared})
        per_task = batched_grads(
            objectives, shared + others, chunk_size=self.chunk_size, mode=self._batched_backward
        )
        if step.world > 1:
            # exact data parallelism: the per-task gradients of the global (mean over ranks)
            # losses are the rank average of the local ones. torch.autograd.grad fires no DDP
            # hook, so they are all-reduced here, in the canonical task order; every rank then
            # solves the same problem and writes the same .grad
            per_task = [dist_util.all_mean(g) for g in per_task]
        shared_grads = [self._per_task_transforms(p, g) for p, g in zip(shared, per_task)]
        if step.closure is not None:
            # F-MTL: the heads get their sharpness-aware gradient (the perturbed passes); the
            # strategies' own parameters their plain one
            own_ids = {id(q) for q in self.parameters()}
            heads = [
                (q, g) for q, g in zip(others, per_task[len(shared) :]) if id(q) not in own_ids
            ]
            step.flat_heads = ([q for q, _ in heads], [g for _, g in heads])
            others_written = [
                (q, g) for q, g in zip(others, per_task[len(shared) :]) if id(q) in own_ids
            ]
        else:
            others_written = list(zip(others, per_task[len(shared) :]))
        for q, g in others_written:
            step.writes.add(q, g.sum(0))
        return DensePerTaskGrads(shared, shared_grads)

    def _flat_pass(
        self,
        step: _Step,
        grads: DensePerTaskGrads,
        info: StepInfo,
        ctx: StepContext,
        checking: bool,
    ) -> None:
        # F-MTL's perturbed passes (mtlbal.aggregation.fmtl): the flatness directions H go to
        # the aggregator through the context, the heads' sharpness-aware gradients are staged
        agg = self.aggregator
        assert isinstance(agg, FMTL) and step.closure is not None and step.flat_heads is not None
        heads, head_grads = step.flat_heads
        flat, head_sums, sam_losses = flat_pass(
            step.closure,
            step.names,
            grads.params,
            grads.grads,
            heads,
            head_grads,
            info.loss_weights.detach(),
            rho=agg.rho,
            adaptive=agg.adaptive,
            modules=self.shared_modules,
            world=step.world,
        )
        flat_grads = DensePerTaskGrads(grads.params, flat)
        norms2 = flat_grads.gramian().diagonal()
        if checking:
            ok = torch.isfinite(norms2).all() & torch.isfinite(sam_losses).all()
            if not bool(ok):  # the strategy's extra host sync (FMTL.host_sync)
                bad = [
                    n
                    for n, a, b in zip(
                        step.names,
                        torch.isfinite(sam_losses).tolist(),
                        torch.isfinite(norms2).tolist(),
                    )
                    if not (a and b)
                ]
                if self.nonfinite == "skip":
                    raise _Refused
                raise ValueError(
                    f"non-finite loss or gradient of task(s) {', '.join(map(repr, bad))} at the "
                    "perturbed parameters (F-MTL's closure): nothing was changed"
                )
        ctx.extras["flat_jacobian"] = flat_grads.jacobian()
        info.extras["flat_norms"] = norms2.clamp_min(0).sqrt().detach()
        for q, g in zip(heads, head_sums):
            step.writes.add(q, g)

    def _note_paths(self, paths: dict[int, tuple[str, str, bool]], loop: bool = False) -> None:
        if loop or not self._batched_backward.batched:
            paths = {
                k: (f"{v[0]} (per-task loop)" if v[0] == "batched" else v[0], v[1], v[2])
                for k, v in paths.items()
            }
        if self._by_design is None:
            self._by_design = engine_report.batched_by_design(self.shared_modules)
        for pid, why in self._by_design.items():
            if pid in paths and paths[pid][2]:
                paths[pid] = (paths[pid][0], why, False)
        if self._capture is not None:  # a supported layer whose call was not recorded
            hooked = {id(q) for mod in self._capture.modules for q in mod.parameters()}
            for pid, (path, why, warn) in list(paths.items()):
                if warn and pid in hooked and why.startswith("not the weight"):
                    why = (
                        "its layer's call was not recorded (a forward run before the Balancer "
                        "existed, inside a torch.compile'd region, or not through its forward)"
                    )
                    paths[pid] = (path, why, warn)
        self._engine_paths = paths
        fell = [id(p) for p in self.shared_params if paths.get(id(p), ("", "", False))[2]]
        if fell and not self._warned_fallback:
            self._warned_fallback = True
            names = self._param_names()
            listed = ", ".join(f"{names[k][0]} ({names[k][1]})" for k in fell[:5])
            more = f" and {len(fell) - 5} more" if len(fell) > 5 else ""
            warnings.warn(
                f"{len(fell)} shared parameter(s) take the batched backward instead of the "
                f"layer-wise path: {listed}{more} (exact, but it forms [m, *shape] per-task "
                "gradients); Balancer.describe() says why",
                engine_report.EngineFallbackWarning,
                stacklevel=5,
            )

    def _param_names(self) -> dict[int, tuple[str, str]]:
        if self._names_cache is None:
            self._names_cache = engine_report.parameter_names(
                self.shared_modules, self.shared_params
            )
        return self._names_cache

    def describe(self) -> str:
        """A table of the path each shared parameter's per-task gradients took at the last
        step at the parameters (``identity``, ``per-task``, ``batched``) and why; see
        :mod:`mtlbal.engine.report`. ``info.engine_paths`` holds the same paths per step."""
        names = self._param_names()
        if self._cut is not None:
            return (
                f"engine={self.engine!r}, at a cut point: per-task gradients of the representation"
            )
        return engine_report.describe_paths(
            self.shared_params,
            names,
            self._engine_paths,
            f"engine={self.engine!r}, per-task gradients at the parameters (last step):",
        )

    def _aggregate(
        self, step: _Step, grads: PerTaskGrads, gram: Tensor, info: StepInfo, ctx: StepContext
    ) -> None:
        agg = self.aggregator
        if agg is None:
            grads.write_weights(
                torch.ones(grads.m, dtype=gram.dtype, device=gram.device), step.writes
            )
            return
        if isinstance(agg, GramianAggregator):
            # the m × m solve in float64, whatever the gradients' dtype, on an exactly
            # symmetric G (checked finite above; the kernel skips the standalone validation)
            g64 = gram.to(torch.float64)
            w = agg.solve((g64 + g64.T) / 2, ctx)
            info.grad_weights = w.detach()
            info.weights = w.detach().to(info.loss_weights.dtype) * info.loss_weights
            step.solved = info.grad_weights
            grads.write_weights(w, step.writes)
        else:
            jac = grads.jacobian()
            if step.scale is not None:
                jac = jac / step.scale.to(jac.dtype)
                direction = agg.aggregate_jacobian(jac, ctx) * step.scale.to(jac.dtype)
            else:
                direction = agg.aggregate_jacobian(jac, ctx)
            grads.write_direction(direction, step.writes)

    # ---- stage 5: commit
    def _commit(self, step: _Step, info: StepInfo) -> None:
        info.missing = _absent(step)
        with self._combined_hooks(step):
            step.writes.commit()
            if step.branch_caps is not None and self._branches is not None:
                self._branches.backward(step.branch_caps, info.extras, step.branch_coeffs)
        for _, leaf in step.captured:
            leaf.grad = None
        self._spent = [weakref.ref(v) for v in step.given]
        if not info.skipped:
            if step.present is None:
                self.weighting.observe(step.raw)
            else:  # a missing-task step: the weighting's observe takes the present indices
                self.weighting.observe(step.raw, present=step.present)
            self.tasks = step.all_names
            if self._amortiser is not None and step.solved is not None:
                self._amortiser.record(self.step_count, step.names, step.solved)
            self.step_count += 1
        info.step = self.step_count
        self.last_info = info
        if not info.skipped:
            for hook in list(self._hooks.values()):
                hook(self, info)

    @contextmanager
    def _combined_hooks(self, step: _Step) -> Iterator[None]:
        # where no per-task gradient of a shared parameter was formed (no gradient method, or
        # at a cut point), the transforms' `combined` acts on the gradient reaching it
        handles: list[RemovableHandle] = []
        formed_at_params = self._needs_grads and self._cut is None
        for p in self.shared_params if self.transforms and not formed_at_params else ():
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
