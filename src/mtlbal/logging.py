"""Logging a step: :func:`info_to_dict` flattens a :class:`~mtlbal.StepInfo` into named
scalars; :class:`TensorBoardHook` and :class:`DictHook` log them from ``balancer.register_hook``.

Names (``prefix`` defaults to ``"mtlbal"``; tasks as in ``info.tasks``):

========================================  ==================================================
``mtlbal/loss/<task>``                    the raw loss ``L_t``
``mtlbal/loss_weight/<task>``             the loss-level multiplier ``∂ℓ_t/∂L_t``
``mtlbal/weight/<task>``                  the overall weight of ``∇L_t`` (``info.weights``)
``mtlbal/grad_weight/<task>``             the gradient-level weight (Gramian methods only)
``mtlbal/grad_norm/<task>``               ``‖∇ℓ_t‖`` at the shared part (with a Gramian)
``mtlbal/cosine/<a>~<b>``                 the cosine of two tasks' gradients, ``a < b`` as
                                          strings (with a Gramian)
``mtlbal/conflict``                       share of task pairs with a negative cosine
``mtlbal/skipped``                        1.0 for a skipped step, else 0.0
``mtlbal/<key>``, ``mtlbal/<key>/<task>`` a number, a scalar tensor or an ``[m]`` tensor in
                                          ``info.extras`` (anything else there is left out)
========================================  ==================================================

Entries whose value the step did not compute (no Gramian: no ``grad_norm``, ``cosine``,
``conflict``; no Gramian method: no ``grad_weight``) are absent, never ``NaN``. So are the
per-task entries of a task without a loss in the step (``info.missing``, see "Missing tasks" in
the concepts page).

:func:`info_to_dict` reads the device once: every tensor is flattened into one float64 vector
(float32 on MPS) on the losses' device, and that vector is read with a single ``.tolist()``. A
logging hook therefore costs one host sync on the steps it logs (``every``) and nothing on the
others.

The Balancer calls its hooks after committed steps only. A skipped step (``info.skipped``: a
non-finite step under ``nonfinite="skip"``, a ``GradScaler`` overflow) reaches a hook only if
you call it yourself — ``hook(balancer, info)`` — and then only ``<prefix>/skipped = 1.0`` is
logged, whatever ``every``.

Example:
    >>> import torch, mtlbal
    >>> from mtlbal.logging import DictHook, info_to_dict
    >>> trunk = torch.nn.Linear(3, 4)
    >>> b = mtlbal.Balancer(trunk, aggregator=mtlbal.aggregation.MGDA())
    >>> rows = []
    >>> handle = b.register_hook(DictHook(lambda d, step: rows.append((step, d))))
    >>> z = trunk(torch.randn(8, 3))
    >>> info = b.backward({"a": z[:, 0].pow(2).mean(), "b": z[:, 1].abs().mean()})
    >>> step, scalars = rows[0]
    >>> step, sorted(k for k in scalars if k.startswith("mtlbal/weight/"))
    (1, ['mtlbal/weight/a', 'mtlbal/weight/b'])
    >>> "mtlbal/cosine/a~b" in scalars and scalars["mtlbal/skipped"] == 0.0
    True
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from itertools import combinations
from typing import Any, Protocol

import torch
from torch import Tensor

from mtlbal.step import StepInfo

__all__ = ["DictHook", "ScalarWriter", "TensorBoardHook", "info_to_dict"]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def info_to_dict(info: StepInfo, prefix: str = "mtlbal") -> dict[str, float]:
    """Flatten ``info`` into ``{name: float}`` (the names in :mod:`mtlbal.logging`), reading
    the device once. ``prefix=""`` gives names without a prefix."""
    tasks = tuple(info.tasks)
    m = len(tasks)
    names: list[str] = []
    parts: list[Tensor] = []
    device = info.losses.device
    dtype = torch.float32 if device.type == "mps" else torch.float64

    def add(tensor: Tensor, keys: list[str]) -> None:
        names.extend(_join(prefix, k) for k in keys)
        parts.append(tensor.detach().reshape(-1).to(device=device, dtype=dtype))

    def per_task(kind: str, tensor: Tensor | None) -> None:
        if tensor is not None:
            add(tensor, [f"{kind}/{t}" for t in tasks])

    per_task("loss", info.losses)
    per_task("loss_weight", info.loss_weights)
    per_task("weight", info.weights)
    per_task("grad_weight", info.grad_weights)
    if info.gramian is not None:
        per_task("grad_norm", info.grad_norms)
        cos = info.cosines
        if m >= 2 and cos is not None:
            # triu_indices is row-major, as combinations(range(m), 2): no read for the names
            iu = torch.triu_indices(m, m, offset=1, device=cos.device)
            pairs = [sorted((tasks[i], tasks[j])) for i, j in combinations(range(m), 2)]
            add(cos[iu[0], iu[1]], [f"cosine/{a}~{b}" for a, b in pairs])
        conflict = info.conflict
        if conflict is not None:
            add(conflict, ["conflict"])
    out: dict[str, float] = {}
    plain: dict[str, float] = {_join(prefix, "skipped"): 1.0 if info.skipped else 0.0}
    for key, value in info.extras.items():
        if isinstance(value, Tensor):
            if value.dim() == 0:
                add(value, [str(key)])
            elif value.dim() == 1 and value.shape[0] == m:
                add(value, [f"{key}/{t}" for t in tasks])
        elif isinstance(value, numbers.Real):  # bool, int, float, numpy scalars
            plain[_join(prefix, str(key))] = float(value)
    if parts:
        values = torch.cat(parts).tolist()  # the one host read
        out.update(zip(names, values))
    out.update(plain)
    return out


class ScalarWriter(Protocol):
    """What :class:`TensorBoardHook` needs of a writer (``SummaryWriter`` has it)."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int, /) -> Any:
        """Record ``scalar_value`` under ``tag`` at ``global_step``."""


class DictHook:
    """A step hook that hands :func:`info_to_dict`'s output to ``callback(scalars, step)``.

    For any logger: Weights & Biases (``DictHook(lambda d, s: wandb.log(d, step=s))``), MLflow
    (``DictHook(lambda d, s: mlflow.log_metrics(d, step=s))``), a CSV writer, a list.

    Args:
        callback: called with the dict and ``info.step`` (the Balancer's step counter after
            the step: 1 for the first).
        prefix: the names' prefix.
        every: log the steps whose ``info.step`` is a multiple of ``every`` (a skipped step
            handed to the hook is always logged, as ``{<prefix>/skipped: 1.0}``).

    Register it with ``balancer.register_hook(hook)`` (or ``opt.balancer.register_hook``).
    """

    def __init__(
        self,
        callback: Callable[[dict[str, float], int], Any],
        *,
        prefix: str = "mtlbal",
        every: int = 1,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self.callback = callback
        self.prefix = prefix
        self.every = every

    def __call__(self, balancer: Any, info: StepInfo) -> None:
        if info.skipped:
            self.callback({_join(self.prefix, "skipped"): 1.0}, info.step)
        elif info.step % self.every == 0:
            self.callback(info_to_dict(info, self.prefix), info.step)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prefix={self.prefix!r}, every={self.every})"


class TensorBoardHook(DictHook):
    """A step hook that writes :func:`info_to_dict`'s scalars to a TensorBoard writer.

    Each name is written with ``writer.add_scalar(name, value, info.step)``; the writer is
    yours (flush and close it as usual). Any object with ``add_scalar`` works.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or alike).
        prefix: the names' prefix (a TensorBoard section).
        every: as for :class:`DictHook`.

    Example:
        >>> import torch, mtlbal
        >>> from torch.utils.tensorboard import SummaryWriter  # doctest: +SKIP
        >>> writer = SummaryWriter("runs/mtl")  # doctest: +SKIP
        >>> balancer = mtlbal.Balancer(torch.nn.Linear(3, 4))
        >>> handle = balancer.register_hook(TensorBoardHook(writer, every=10))  # doctest: +SKIP
    """

    def __init__(self, writer: ScalarWriter, *, prefix: str = "mtlbal", every: int = 1) -> None:
        if not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must have add_scalar(), got {type(writer).__name__}")
        self.writer = writer
        super().__init__(self._write, prefix=prefix, every=every)

    def _write(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
