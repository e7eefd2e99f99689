"""The cut-point engine: per-task gradients of a shared representation.

A *cut point* is a module whose output ``z`` is the representation every task head reads. A
forward hook (:class:`CutPoint`) records ``z``; when per-task gradients are needed there, it
hands the heads a detached leaf ``ẑ`` (same value) so that the heads' graph stops at ``ẑ``. The
per-task gradients ``∂ℓ_t/∂ẑ`` are then taken one task at a time (:func:`split_task_grads`), and
the combination ``Σ_t w_t ∂ℓ_t/∂ẑ`` is staged as the cotangent of ``z`` for the single backward
of the commit stage, which runs the heads and the trunk together (DDP's reducer sees one
backward).

A module that returns a container (a tuple or list, a dict, a ``Mapping`` subclass such as
Hugging Face's ``ModelOutput``, a dataclass) names the representation with ``select``: a key
or attribute name (``str``) or a position (``int``). The hook then replaces that one element by
the leaf in a shallow copy of the same container type; every other element keeps its graph.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlbal.engine.base import GradWrites, PerTaskGrads, gramian_of
from mtlbal.engine.dense import batched_grads

__all__ = ["CutPerTaskGrads", "CutPoint", "Selector", "split_task_grads"]

Selector = str | int
"""Names the representation inside a container output: a key or attribute (``str``), or a
position in a tuple or list (``int``, negative from the end)."""

# module -> the CutPoint hooked on it: one capture per module, so that a second Balancer on the
# same module (or a forgotten one) cannot silently detach the trunk from the graph
_OWNERS: weakref.WeakKeyDictionary[nn.Module, CutPoint] = weakref.WeakKeyDictionary()


class CutPoint:
    """A forward hook on ``module`` that records its output for the next step.

    With ``detach=True`` the hook replaces the output ``z`` by a detached leaf ``ẑ`` (same value)
    and keeps ``(z, ẑ)``; otherwise the output passes through unchanged and ``(z, z)`` is kept.
    With ``select`` (see :data:`Selector`), ``z`` is that element of a container output, and the
    module's output is replaced by a shallow copy of the container (same type) holding ``ẑ`` in
    its place; the other elements are passed on as they are, graph included. Per-step data (the
    captured tensors) is not pickled.
    """

    role: str
    handle: Any

    def __init__(
        self,
        module: nn.Module,
        *,
        detach: bool,
        role: str = "cut point",
        select: Selector | None = None,
    ) -> None:
        check_selector(select)
        owner = _OWNERS.get(module)
        if owner is not None and owner.handle is not None:
            raise ValueError(
                f"{type(module).__name__} is already the {owner.role} of another Balancer: call "
                "remove() on that Balancer first (two captures on one module would detach the "
                "trunk behind the second one's back)"
            )
        self.module = module
        self.detach = detach
        self.role = role
        self.select = select
        self.captured: list[tuple[Tensor, Tensor]] = []
        self.handle: Any = module.register_forward_hook(self._hook)
        _OWNERS[module] = self

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        where = f"the {self.role} {type(module).__name__}"
        if self.select is None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"{where} must return a single tensor, got {type(output).__name__}; for a "
                    "tuple, list, dict or ModelOutput, name the representation with select= "
                    "(a position or a key, e.g. select=0 or select='last_hidden_state')"
                )
            z = output
        else:
            z = select_from(output, self.select, where)
        if not (torch.is_grad_enabled() and z.requires_grad):
            return None
        if not self.detach:
            self.captured.append((z, z))
            return None
        leaf = z.detach().requires_grad_(True)
        new = output if self.select is None else replace_in(output, self.select, leaf, where)
        self.captured.append((z, leaf))
        return leaf if self.select is None else new

    def take(self) -> list[tuple[Tensor, Tensor]]:
        out, self.captured = self.captured, []
        return out

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if _OWNERS.get(self.module) is self:
            del _OWNERS[self.module]
        self.captured = []

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["captured"] = []  # per-step tensors with a live graph are not state
        return state


def check_selector(select: Any) -> None:
    """Refuse anything but ``None``, a ``str`` or an ``int`` (not a ``bool``)."""
    if select is None or isinstance(select, str):
        return
    if isinstance(select, int) and not isinstance(select, bool):
        return
    raise TypeError(
        "select must be a key or attribute name (str) or a position (int), got "
        f"{type(select).__name__} {select!r}; a callable cannot put the leaf back, so it is "
        "not accepted"
    )


def _describe(output: Any) -> str:
    if isinstance(output, Mapping):
        return f"{type(output).__name__} with keys {list(output.keys())!r}"
    if isinstance(output, (tuple, list)):
        return f"{type(output).__name__} of length {len(output)}"
    return type(output).__name__


def select_from(output: Any, select: Selector, where: str) -> Tensor:
    """The tensor ``select`` names in ``output`` (``where`` names the module in errors)."""
    if isinstance(output, Tensor):
        raise TypeError(
            f"{where} returned a single tensor, but select={select!r} was given: drop select="
        )
    if isinstance(select, int):
        if not isinstance(output, (tuple, list)):
            raise TypeError(
                f"{where}: select={select!r} (a position) needs a tuple or list output, got "
                f"{_describe(output)}; select a Mapping's entry by its key"
            )
        if not -len(output) <= select < len(output):
            raise ValueError(
                f"{where}: select={select!r} is out of range for its output, a {_describe(output)}"
            )
        z = output[select]
    elif isinstance(output, Mapping):
        if select not in output:
            raise ValueError(
                f"{where}: select={select!r} is not a key of its output, a {_describe(output)}"
            )
        z = output[select]
    elif isinstance(output, (tuple, list)) and not hasattr(output, "_fields"):
        raise TypeError(
            f"{where}: select={select!r} (a name) cannot select from a "
            f"{_describe(output)}; select a position (an int)"
        )
    else:
        if not hasattr(output, select):
            raise ValueError(
                f"{where}: select={select!r} is not an attribute of its output, a "
                f"{_describe(output)}"
            )
        z = getattr(output, select)
    if not isinstance(z, Tensor):
        raise TypeError(
            f"{where}: select={select!r} names a {type(z).__name__}, not a tensor, in its output "
            f"(a {_describe(output)})"
        )
    return z


def replace_in(output: Any, select: Selector, leaf: Tensor, where: str) -> Any:
    """A shallow copy of ``output``, same type, with the element ``select`` names set to
    ``leaf``; checked by selecting again (item and attribute access, where both exist)."""
    new: Any
    if isinstance(select, int):
        items = list(output)
        items[select] = leaf
        if isinstance(output, list):
            new = copy.copy(output)  # a list subclass keeps its type and attributes
            new[:] = items
        elif type(output) is tuple:
            new = tuple(items)
        elif hasattr(output, "_fields"):  # a namedtuple
            new = type(output)(*items)
        else:  # another tuple subclass (torch.return_types takes one sequence)
            new = type(output)(items)
    elif isinstance(output, Mapping):
        new = copy.copy(output)
        new[select] = leaf
        # a Mapping that also exposes its entries as attributes (ModelOutput): keep them in step
        if hasattr(output, select) and getattr(new, select, None) is not leaf:
            setattr(new, select, leaf)
    elif hasattr(output, "_fields"):
        new = output._replace(**{select: leaf})
    elif (
        dataclasses.is_dataclass(output)
        and not isinstance(output, type)
        and any(f.name == select and f.init for f in dataclasses.fields(output))
    ):
        new = dataclasses.replace(output, **{select: leaf})
    else:
        new = copy.copy(output)
        setattr(new, select, leaf)
    ok = type(new) is type(output)
    if ok:
        try:
            ok = select_from(new, select, where) is leaf
            if ok and isinstance(select, str) and isinstance(output, Mapping):
                ok = not hasattr(output, select) or getattr(new, select) is leaf
        except (TypeError, ValueError):
            ok = False
    if not ok:
        raise TypeError(
            f"{where}: could not rebuild its output ({_describe(output)}) with the detached "
            f"representation in place of select={select!r}"
        )
    return new


def split_task_grads(
    objectives: Tensor,
    stacked: Tensor,
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    *,
    create_graph: bool = False,
) -> list[Tensor]:
    """``[m, *x.shape]`` gradients of ``objectives`` w.r.t. ``inputs``, one task at a time.

    ``objectives`` (``ℓ``, ``[m]``) must depend on the network only through
    ``stacked = torch.stack(losses)``. With ``C = ∂ℓ/∂L`` (``[m, m]``, from a tiny batched
    backward through the weighting), ``∂ℓ_t/∂x = Σ_s C_ts ∂L_s/∂x``, and each ``∂L_s/∂x`` is
    taken from the scalar ``L_s`` itself, so autograd visits only task ``s``'s own head: the
    heads cost one pass in total instead of the ``m`` passes (mostly with zero cotangents) of a
    batched backward from the stacked vector. With ``create_graph`` the gradients keep their
    graph (``C`` held fixed), for a regulariser differentiated through them (Rep-MTL).
    """
    (c,) = batched_grads(objectives, [stacked], retain_graph=True)  # [m, m]
    if create_graph:  # the multipliers C are held fixed; the gradients keep their graph
        c = c.detach()
    rows = [
        torch.autograd.grad(
            loss,
            list(inputs),
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
            create_graph=create_graph,
        )
        for loss in losses
    ]
    out = []
    for k in range(len(inputs)):
        per_loss = torch.stack([r[k] for r in rows])  # [m, *x.shape], ∂L_s/∂x
        out.append(torch.tensordot(c.to(per_loss.dtype), per_loss, dims=1))
    return out


class CutPerTaskGrads(PerTaskGrads):
    """Per-task gradients of the shared representation(s) captured at a cut point.

    ``outputs[k]`` is the k-th captured output of the cut module (still attached to the trunk)
    and ``grads[k]`` its ``[m, *shape]`` per-task gradient. Writing a combination stages one
    backward through the trunk, together with ``extra_roots`` (scalars backpropagated with
    gradient 1 in the same call: the heads' objective, a weighting's auxiliary term).
    """

    def __init__(
        self,
        outputs: Sequence[Tensor],
        grads: Sequence[Tensor],
        *,
        extra_roots: Sequence[Tensor] = (),
    ) -> None:
        self.outputs = list(outputs)
        self.grads = list(grads)
        self.extra_roots = list(extra_roots)
        self.m = int(self.grads[0].shape[0])
        self._gramian: Tensor | None = None
        # added to the cotangent of each output whatever the combination (a regulariser's
        # gradient at the representation: Rep-MTL)
        self.extra_cot: list[Tensor] | None = None

    def gramian(self) -> Tensor:
        if self._gramian is None:
            self._gramian = gramian_of(self.grads, self.m)
        return self._gramian

    def set_gramian(self, gramian: Tensor) -> None:
        """Replace the Gramian (e.g. by the global one under DDP)."""
        self._gramian = gramian

    def jacobian(self) -> Tensor:
        return torch.cat([z.reshape(self.m, -1) for z in self.grads], dim=1)

    def write_weights(self, w: Tensor, writes: GradWrites) -> None:
        cot = [torch.tensordot(w.to(z.dtype), z, dims=1) for z in self.grads]
        self._stage(cot, writes)

    def write_direction(self, g: Tensor, writes: GradWrites) -> None:
        cot = []
        offset = 0
        for z in self.outputs:
            n = z.numel()
            cot.append(g[offset : offset + n].view_as(z).to(z.dtype))
            offset += n
        self._stage(cot, writes)

    def _stage(self, cot: list[Tensor], writes: GradWrites) -> None:
        if self.extra_cot is not None:
            cot = [c + e.to(c.dtype) for c, e in zip(cot, self.extra_cot)]
        roots = self.outputs + self.extra_roots
        grads: list[Tensor | None] = [*cot, *[None] * len(self.extra_roots)]
        writes.backward(roots, grads)
