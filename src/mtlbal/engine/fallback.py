"""Batched backward, or one task at a time when the graph cannot be batched.

The engines take the ``m`` per-task gradients in one backward with ``is_grads_batched=True`` (a
vmap over the backward). Some graphs cannot be batched: a model compiled with
``torch.compile`` (inductor's backward kernels read raw data pointers, which a batched tensor
has not: "Cannot access data pointer of Tensor that doesn't have storage"), or an op without a
vmap batching rule ("Batching rule not implemented for ..."). Then the same gradients are taken
exactly, one backward per task (``m`` backward passes instead of one batched pass).

:class:`BatchedBackward` runs the batched backward, detects these failures (and only these: any
other error propagates), switches to the per-task loop, warns once with
:class:`BatchedBackwardFallbackWarning` and remembers the decision, so later steps go straight
to the loop. Until a batched backward has succeeded once, the trial keeps the graph
(``retain_graph=True``) so that the loop can still run after a failure; afterwards the caller's
``retain_graph`` is used as is.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

__all__ = ["BatchedBackward", "BatchedBackwardFallbackWarning", "is_batching_error"]

T = TypeVar("T")

# messages of the RuntimeErrors a batched (vmapped) backward raises where a per-task one works
_BATCHING_MESSAGES = (
    "Batching rule not implemented",
    "Cannot access data pointer of Tensor that doesn't have storage",
    "vmap: ",
    "BatchedTensorImpl",
)
_DONATED = "donated buffer"


class BatchedBackwardFallbackWarning(UserWarning):
    """The batched per-task backward is not available for this graph: the per-task gradients
    are taken one task at a time (exact, ``m`` backward passes instead of one)."""


def is_batching_error(err: BaseException) -> bool:
    """Whether ``err`` is the failure of a batched (vmapped) backward that a per-task backward
    avoids."""
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _BATCHING_MESSAGES)


def _donated_buffer_error(err: RuntimeError) -> RuntimeError:
    return RuntimeError(
        "the per-task gradients need several backward passes through the compiled region "
        "(retain_graph=True), which torch.compile refuses for a graph compiled with donated "
        "buffers: set torch._functorch.config.donated_buffer = False before the compiled model "
        "first runs (it is compiled then), or compile with backend='aot_eager'"
    )


class BatchedBackward:
    """Per-:class:`~mtlbal.Balancer` choice between the batched backward and the per-task loop.

    ``mode`` is ``None`` (not yet tried), ``"batched"`` (a batched backward has succeeded) or
    ``"per_task"`` (a batching failure was met; ``reason`` says which).
    """

    def __init__(self) -> None:
        self.mode: str | None = None
        self.reason: str | None = None

    @property
    def batched(self) -> bool:
        return self.mode != "per_task"

    def run(
        self,
        batched: Callable[[bool], T],
        per_task: Callable[[], T],
        retain_graph: bool,
    ) -> T:
        """``batched(retain)`` (retaining the graph on trial), or ``per_task()`` after a
        batching failure (now or at an earlier step)."""
        if self.mode == "per_task":
            return self._per_task(per_task)
        trial = self.mode is None
        try:
            out = batched(retain_graph or trial)
        except RuntimeError as e:
            if _DONATED in str(e):
                raise _donated_buffer_error(e) from e
            if not is_batching_error(e):
                raise
            self.mode = "per_task"
            self.reason = str(e).splitlines()[0].strip()
            warnings.warn(
                "the batched per-task backward (torch.autograd.grad with is_grads_batched=True) "
                f"failed on this graph ({self.reason!r}; e.g. a torch.compile'd model): the "
                "per-task gradients are taken one task at a time from now on (exact; one "
                "backward pass per task instead of one batched pass)",
                BatchedBackwardFallbackWarning,
                stacklevel=4,
            )
            if trial or retain_graph:
                return self._per_task(per_task)
            # batched worked at an earlier step and did not keep this step's graph: the
            # per-task backward may find it freed
            try:
                return self._per_task(per_task)
            except RuntimeError as again:
                raise RuntimeError(
                    "the batched per-task backward failed on a graph where it had worked at an "
                    f"earlier step ({self.reason!r}; e.g. the model was compiled since) and "
                    "freed this step's graph: this step cannot be completed (nothing was "
                    "written); the next steps take the per-task backward"
                ) from again
        self.mode = "batched"
        return out

    @staticmethod
    def _per_task(per_task: Callable[[], T]) -> T:
        try:
            return per_task()
        except RuntimeError as e:
            if _DONATED in str(e):
                raise _donated_buffer_error(e) from e
            raise
