"""Layer-wise per-task gradients: one batched backward to the layer outputs, Gramian per layer.

For a layer ``y = a Wᵀ + b`` seen on ``N`` rows (batch, or batch × tokens, or batch × spatial
positions for a convolution after im2col), the per-task gradients of the weights are
``∂ℓ_t/∂W = δ_tᵀ a`` and ``∂ℓ_t/∂b = Σ_rows δ_t``, where ``δ_t = ∂ℓ_t/∂y`` (``[N, d_out]``) and
``a`` (``[N, d_in]``) is the layer input. So the layer's share of ``G = J Jᵀ`` is

    G_ij += ⟨δ_iᵀ a, δ_jᵀ a⟩ = Σ_{b,c} (δ_i δ_jᵀ)_{bc} (a aᵀ)_{bc} = ⟨(a aᵀ) δ_i, δ_j⟩_F
    G_ij += ⟨Σ_b δ_i[b], Σ_b δ_j[b]⟩                                          (bias)

The identity costs ``N²·d_in + m·N²·d_out + m²·N·d_out`` and never builds a weight gradient;
forming the per-task weight gradients first costs ``m·N·d_in·d_out + m²·d_in·d_out``. The engine
picks the cheaper one per parameter (``N`` counts every row: batch × tokens for sequences,
batch × positions for convolutions). The combined gradient ``Σ_t w_t ∂ℓ_t/∂W`` is one matmul,
``(Σ_t w_t δ_t)ᵀ a``.

``δ`` for every layer comes from ONE backward of the ``m`` one-hot cotangents of ``ℓ``
(``torch.autograd.grad(..., is_grads_batched=True)``, chunked over tasks with ``chunk_size``)
taken w.r.t. the layers' *outputs* (their gradient edges, so a later in-place op on an output is
harmless); the weight gradients themselves are never computed by autograd.

With the per-task losses ``L_t`` (the Balancer passes them), the graph is first split where each
task's own sub-graph (its head) joins the part several tasks reach: each head is backpropagated
once, for its own task only (a batched backward would push all ``m`` cotangents through every
head, ``m²`` head passes, and hits ops without vmap batching rules such as
``mse_loss_backward``), and the batched backward starts at the join with cotangents
``Σ_s C_ts ∂L_s/∂(join)``, ``C = ∂ℓ/∂L`` (``[m, m]``, exact for any loss weighting). The split is
declined when a recorded layer or a shared parameter lies inside one task's own sub-graph, or
when ``ℓ`` reads the model other than through ``L``.

Supported leaf modules: ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (``groups=1``; im2col rows),
``nn.Embedding`` (not sparse, no ``scale_grad_by_freq``; ``padding_idx`` honoured; identity with
``A_bc = [idx_b = idx_c]``), ``nn.LayerNorm`` and ``nn.BatchNorm1d``/``2d`` affine parameters
(``∂ℓ_t/∂γ = Σ_rows δ_t ⊙ x̂``, exact from the recomputed normalised input). A shared
parameter is *covered* only when every use of it in the graph of ``ℓ`` is a recorded call of a
supported module (checked by walking the graph each step: a weight also used elsewhere, a
parametrised module, a module called through its functional form, an input modified in place
after the call, all fall back). Everything not covered falls back to the parameter's own
batched vector-Jacobian product, exactly as the dense engine does. A parameter used by several
calls (weight tying, a module applied twice) is handled by concatenating the calls' rows, so the
cross terms are exact.

Memory: ``δ`` is kept for all ``m`` tasks (``m ×`` the covered layers' outputs, the analogue of
the dense engine's ``m ×`` parameters); ``chunk_size`` bounds the transient memory of the
batched backward; Gramian terms are formed one parameter at a time. Parameters outside the
shared part (heads, strategy parameters) receive ``Σ_t ∂ℓ_t/∂q`` from one ordinary backward
restricted to them, written to ``.grad`` by :func:`layerwise_per_task_grads` (accumulating).

No host synchronisation: every choice depends on shapes only.

Example:
    >>> import torch
    >>> from torch import nn
    >>> trunk = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4))
    >>> cap = LayerwiseCapture([trunk])
    >>> heads = [nn.Linear(4, 1), nn.Linear(4, 1)]
    >>> z = trunk(torch.randn(6, 3))
    >>> losses = torch.stack([h(z).pow(2).mean() for h in heads])
    >>> shared = list(trunk.parameters())
    >>> others = [p for h in heads for p in h.parameters()]
    >>> g = layerwise_per_task_grads(losses, cap.take(), shared, others)
    >>> g.gramian().shape
    torch.Size([2, 2])
    >>> g.apply_weights(torch.ones(2)); trunk[0].weight.grad.shape
    torch.Size([5, 3])
    >>> cap.remove()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from mtlbal.engine.base import GradWrites, PerTaskGrads, gramian_dtype, gramian_of
from mtlbal.engine.fallback import BatchedBackward

__all__ = [
    "LayerRecord",
    "LayerwiseCapture",
    "LayerwisePerTaskGrads",
    "layerwise_per_task_grads",
    "supported_module",
]

# above this many elements for the [N, N] row Gramian ``a aᵀ`` the identity is not used
_MAX_ROW_GRAM = 1 << 24

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm, *_BATCHNORMS)


def _direct_param(module: nn.Module, name: str) -> Tensor | None:
    p = module._parameters.get(name)
    if p is None or not p.requires_grad:
        return None
    return p


def _own_forward(module: nn.Module, base: type[nn.Module], *names: str) -> bool:
    """Whether ``module`` computes with ``base``'s own ``forward`` (and helpers): a subclass that
    overrides them may compute anything, so its parameters cannot be rebuilt from the layer's
    input and output."""
    cls = type(module)
    if "forward" in module.__dict__:  # a forward patched onto the instance
        return False
    return all(getattr(cls, n, None) is getattr(base, n, None) for n in ("forward", *names))


def supported_module(module: nn.Module) -> bool:
    """Whether the layer-wise engine handles ``module``'s own parameters: one of the supported
    layer types, computing with that type's own ``forward`` (subclasses that override it fall
    back to the exact dense path)."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        return False
    if "weight" not in module._parameters:
        return False
    if isinstance(module, nn.Linear):
        return _own_forward(module, nn.Linear)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        base = nn.Conv1d if isinstance(module, nn.Conv1d) else nn.Conv2d
        return (
            _own_forward(module, base, "_conv_forward")
            and module.groups == 1
            and (not isinstance(module.padding, str) or module.padding in ("valid", "same"))
        )
    if isinstance(module, nn.Embedding):
        return (
            _own_forward(module, nn.Embedding)
            and not module.sparse
            and not module.scale_grad_by_freq
        )
    if isinstance(module, nn.LayerNorm):
        return _own_forward(module, nn.LayerNorm) and module.elementwise_affine
    if isinstance(module, nn.GroupNorm):
        return _own_forward(module, nn.GroupNorm) and module.affine
    if isinstance(module, _BATCHNORMS):
        norm = next(b for b in _BATCHNORMS if isinstance(module, b))
        return _own_forward(module, norm) and module.affine
    return False


@dataclass
class LayerRecord:
    """One call of a supported module: its input, the gradient edge of its output, and what
    is needed to rebuild its parameter gradients from ``δ = ∂ℓ/∂output``."""

    module: nn.Module
    params: dict[str, Tensor]
    a: Tensor
    a_version: int
    in_node: Any
    edge: GradientEdge
    out_shape: torch.Size
    out_dtype: torch.dtype
    extra: dict[str, Any] = field(default_factory=dict)


class LayerwiseCapture:
    """Forward hooks on the supported leaf modules under ``modules`` that record each call.

    A record is kept only when grad is enabled and the output requires grad. :meth:`take`
    returns the records since the last call and clears them; :meth:`remove` drops the hooks.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.records: list[LayerRecord] = []
        self.modules: list[nn.Module] = []
        self.handles: list[RemovableHandle] = []
        seen: set[int] = set()
        for root in modules:
            for mod in root.modules():
                if id(mod) in seen or not supported_module(mod):
                    continue
                seen.add(id(mod))
                if not any(_direct_param(mod, n) is not None for n in ("weight", "bias")):
                    continue
                self.modules.append(mod)
                self.handles.append(mod.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        if torch.compiler.is_compiling():  # traced: no autograd node to record (dense fallback)
            return
        if not output.requires_grad or output.grad_fn is None or not args:
            return
        a = args[0]
        if not isinstance(a, Tensor):
            return
        params = {n: p for n in ("weight", "bias") if (p := _direct_param(module, n)) is not None}
        if not params:
            return
        extra: dict[str, Any] = {}
        if isinstance(module, _BATCHNORMS):
            batch_stats = module.training or module.running_mean is None
            extra["batch_stats"] = batch_stats
            if not batch_stats:
                assert module.running_mean is not None and module.running_var is not None
                extra["mean"] = module.running_mean.detach().clone()
                extra["var"] = module.running_var.detach().clone()
        in_node = get_gradient_edge(a).node if a.requires_grad else None
        self.records.append(
            LayerRecord(
                module=module,
                params=params,
                a=a.detach(),
                a_version=a._version,
                in_node=in_node,
                edge=get_gradient_edge(output),
                out_shape=output.shape,
                out_dtype=output.dtype,
                extra=extra,
            )
        )

    def take(self) -> list[LayerRecord]:
        out, self.records = self.records, []
        return out

    def clear(self) -> None:
        self.records = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.records = []

    def __getstate__(self) -> dict[str, Any]:
        # the records are per-step data holding autograd nodes (not copyable): a copy
        # (deepcopy, pickle, torch.save) starts with none and records at its next forward
        return {**self.__dict__, "records": []}


# ---------------------------------------------------------------------------- graph walks
def _walk_counts(roots: Sequence[Any], param_ids: set[int]) -> tuple[set[int], dict[int, int]]:
    """Nodes reached from ``roots`` and, per parameter id, the number of graph edges into its
    gradient accumulator."""
    seen: set[int] = set()
    counts: dict[int, int] = {}
    stack = [r for r in roots if r is not None]
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                if id(var) in param_ids:
                    counts[id(var)] = counts.get(id(var), 0) + 1
                continue
            if id(nxt) not in seen:
                stack.append(nxt)
    return seen, counts


def _local_counts(rec: LayerRecord) -> dict[int, int]:
    """Edges into the record's own parameters inside the sub-graph between its output and its
    input."""
    own = {id(p) for p in rec.params.values()}
    stop = id(rec.in_node) if rec.in_node is not None else None
    counts: dict[int, int] = {}
    seen: set[int] = set()
    stack = [rec.edge.node]
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        for nxt, _ in fn.next_functions:
            if nxt is None or id(nxt) == stop:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                if id(var) in own:
                    counts[id(var)] = counts.get(id(var), 0) + 1
                continue
            stack.append(nxt)
    return counts


# ---------------------------------------------------------------------------- per-layer rows
def _conv_rows(rec: LayerRecord, delta: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """im2col rows of a convolution's input ``[N, C_in·k]`` and its ``δ`` ``[m, N, C_out]``."""
    mod = rec.module
    assert isinstance(mod, (nn.Conv1d, nn.Conv2d))
    one_d = isinstance(mod, nn.Conv1d)
    a = rec.a
    unbatched = a.dim() == (2 if one_d else 3)
    if unbatched:
        a = a.unsqueeze(0)
    kernel = tuple(mod.kernel_size)
    dil = tuple(mod.dilation)
    stride = tuple(mod.stride)
    if mod.padding_mode != "zeros":
        a = F.pad(a, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
        pad: tuple[int, ...] = (0,) * len(kernel)
    elif isinstance(mod.padding, str):
        if mod.padding == "same":
            lr: list[int] = []
            for k, d in zip(reversed(kernel), reversed(dil)):
                total = d * (k - 1)
                lr += [total // 2, total - total // 2]
            a = F.pad(a, lr)
        pad = (0,) * len(kernel)
    else:
        pad = tuple(mod.padding)
    if one_d:
        a = a.unsqueeze(2)
        kernel, dil, stride, pad = (1, *kernel), (1, *dil), (1, *stride), (0, *pad)
    cols = F.unfold(a, kernel, dilation=dil, padding=pad, stride=stride)  # [B, C·k, L]
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    d_rows = None
    if delta is not None:
        m = delta.shape[0]
        c_out = delta.shape[-2] if one_d else delta.shape[-3]
        dl = delta.reshape(m, -1, c_out, math.prod(delta.shape[-1 if one_d else -2 :]))
        d_rows = dl.transpose(2, 3).reshape(m, -1, c_out)
    return rows, d_rows


def _channel_rows(x: Tensor, channel_dim: int) -> Tensor:
    return x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])


def _norm_rows(rec: LayerRecord, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised input ``x̂`` ``[N, D]`` and ``δ`` ``[m, N, D]`` of a LayerNorm / GroupNorm /
    BatchNorm (``D`` the affine parameters' length)."""
    mod = rec.module
    m = delta.shape[0]
    x = rec.a
    if isinstance(mod, nn.LayerNorm):
        d = math.prod(mod.normalized_shape)
        xr = x.reshape(-1, d)
        var, mean = torch.var_mean(xr, dim=1, correction=0, keepdim=True)
        xhat = (xr - mean) * torch.rsqrt(var + mod.eps)
        return xhat, delta.reshape(m, -1, d)
    if isinstance(mod, nn.GroupNorm):
        # x [B, C, *]: statistics per sample and group of C / groups channels
        b, c = x.shape[0], x.shape[1]
        xg = x.reshape(b, mod.num_groups, -1)
        var, mean = torch.var_mean(xg, dim=2, correction=0, keepdim=True)
        xhat = ((xg - mean) * torch.rsqrt(var + mod.eps)).reshape(x.shape)
        dr = delta.movedim(2, -1).reshape(m, -1, c) if delta.dim() > 3 else delta
        return _channel_rows(xhat, 1), dr
    assert isinstance(mod, _BATCHNORMS)
    xr = _channel_rows(x, 1 if x.dim() > 1 else 0)
    if rec.extra["batch_stats"]:
        var, mean = torch.var_mean(xr, dim=0, correction=0, keepdim=True)
    else:
        mean, var = rec.extra["mean"][None, :], rec.extra["var"][None, :]
    xhat = (xr - mean.to(xr.dtype)) * torch.rsqrt(var.to(xr.dtype) + mod.eps)
    dr = delta.movedim(2, -1).reshape(m, -1, xr.shape[1]) if delta.dim() > 2 else delta
    return xhat, dr


# ---------------------------------------------------------------------------- path choice
Path = tuple[str, str, bool]  # (path, why, fell back for a reason other than cost)


def _fallback_paths(
    shared: Sequence[Tensor],
    covered: set[int],
    forced: set[int],
    invalid: set[int],
    uses: dict[int, list[tuple[LayerRecord, str]]],
) -> dict[int, Path]:
    """Why each shared parameter outside ``covered`` takes the batched backward."""
    paths: dict[int, Path] = {}
    for p in shared:
        pid = id(p)
        if pid in covered:
            continue
        if pid in forced:
            why, fell = "a gradient transform acts on its per-task gradients", False
        elif pid in invalid:
            why, fell = "its layer's recorded input was modified in place after the call", True
        elif not uses.get(pid):
            why = (
                "not the weight or bias of a recorded call of a supported layer (an "
                "unsupported module, a bare parameter, or a functional use)"
            )
            fell = True
        elif len({k for _, k in uses[pid]}) > 1:
            why, fell = "used by calls of different layer types", True
        else:
            why, fell = "also used outside its recorded layer calls (e.g. functionally)", True
        paths[pid] = ("batched", why, fell)
    return paths


def _rows_dims(rec: LayerRecord) -> tuple[int, int, int]:
    """``(N, d_in, d_out)`` of a recorded Linear / convolution / embedding call: rows (after
    im2col for a convolution), input and output features."""
    mod = rec.module
    if isinstance(mod, nn.Embedding):
        return rec.a.numel(), 1, int(rec.out_shape[-1])
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        c_out = int(mod.out_channels)
        d_in = int(mod.in_channels) * math.prod(mod.kernel_size)
        return math.prod(rec.out_shape) // max(c_out, 1), d_in, c_out
    d_in = int(rec.a.shape[-1])
    return rec.a.numel() // max(d_in, 1), d_in, int(rec.out_shape[-1])


def identity_cost(
    kind: str, n: int, d_in: int, d_out: int, m: int, vocab: int = 0, im2col: bool = False
) -> tuple[int, int, int, int]:
    """Multiply-adds and kept elements of the activation identity and of the parameter's own
    batched backward for one weight seen on ``n`` rows: ``(ident_ops, batched_ops,
    ident_mem, batched_mem)``.

    Identity (``kind="mm"``): row Gramian ``a aᵀ`` (``N²·d_in``), ``(a aᵀ) δ_t`` for every task
    (``m·N²·d_out``), the ``m²`` inner products (``m²·N·d_out``) and the combined gradient
    ``(Σ_t w_t δ_t)ᵀ a`` (``N·d_in·d_out``); it keeps ``N²`` + ``m·N·d_out`` (+ ``N·d_in``
    im2col rows for a convolution). Batched backward: the per-task weight gradients
    (``m·N·d_in·d_out``), their Gramian (``m²·d_in·d_out``) and the combination
    (``m·d_in·d_out``); it keeps ``m·d_in·d_out``. For an embedding (``kind="embed"``)
    ``d_in = 1``, the row Gramian is ``[idx_b = idx_c]`` and the batched backward scatters into
    ``m × vocab × d_out``.
    """
    if kind == "embed":
        ident = n * n + m * n * n * d_out + m * m * n * d_out + n * d_out
        batched = m * n * d_out + m * m * vocab * d_out + m * vocab * d_out
        return ident, batched, n * n + m * n * d_out, m * vocab * d_out
    ident = n * n * d_in + m * n * n * d_out + m * m * n * d_out + n * d_in * d_out
    ident_mem = n * n + m * n * d_out
    if im2col:
        ident += n * d_in
        ident_mem += n * d_in
    batched = m * n * d_in * d_out + m * m * d_in * d_out + m * d_in * d_out
    return ident, batched, ident_mem, m * d_in * d_out


# multiply-adds of one task's backward per autograd node above which a loop of m plain backward
# passes is used rather than one vmapped backward (the per-node overhead of the loop is then
# negligible, and the vmapped backward's batching rules, expanded saved tensors and m ×
# activation gradients are not). Measured on CPU (benchmarks/engine_zoo.py); on an accelerator,
# where one batched kernel replaces m launches, the vmapped backward is kept.
_LOOP_WORK_PER_NODE = 1 << 16


def _loop_pays(records: Sequence[LayerRecord], nodes: int) -> bool:
    """Whether the recorded layers' backward work per task, per graph node, is large."""
    work = 0
    for rec in records:
        if isinstance(rec.module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            n, d_in, d_out = _rows_dims(rec)
            work += n * d_in * d_out
        elif isinstance(rec.module, _NORMS):
            work += rec.a.numel()
    return work >= _LOOP_WORK_PER_NODE * max(nodes, 1)


def _choose_by_cost(
    shared: Sequence[Tensor],
    covered: set[int],
    uses: dict[int, list[tuple[LayerRecord, str]]],
    m: int,
    paths: dict[int, Path],
) -> set[int]:
    """The covered parameters that take the identity path (weights where it is cheaper in
    time and memory than their batched backward; biases of those layers); ``paths`` gets
    every covered parameter's path and why."""
    chosen: set[int] = set()
    for p in shared:
        pid = id(p)
        if pid not in covered or uses[pid][0][1] not in ("mm", "embed"):
            continue
        kind = uses[pid][0][1]
        n = d_in = d_out = 0
        conv = False
        for rec, _ in uses[pid]:
            ni, d_in, d_out = _rows_dims(rec)
            n += ni
            conv = conv or isinstance(rec.module, (nn.Conv1d, nn.Conv2d))
        ident, batched, ident_mem, batched_mem = identity_cost(
            kind, n, d_in, d_out, m, vocab=int(p.shape[0]), im2col=conv
        )
        what = type(uses[pid][0][0].module).__name__
        if n * n <= _MAX_ROW_GRAM and ident < batched and ident_mem <= batched_mem:
            chosen.add(pid)
            why = f"{what}, {n} rows: identity {ident:.2g} ops < batched {batched:.2g}"
            paths[pid] = ("identity", why, False)
        else:
            why = f"{what}, {n} rows: batched {batched:.2g} ops ≤ identity {ident:.2g}"
            if ident < batched:
                why = f"{what}, {n} rows: the identity would keep {ident_mem:.2g} elements"
            paths[pid] = ("batched", why, False)
    for p in shared:
        pid = id(p)
        if pid not in covered or pid in chosen or pid in paths:
            continue
        kind = uses[pid][0][1]
        weights = [rec.params.get("weight") for rec, _ in uses[pid]]
        if kind == "sum" and all(w is not None and id(w) in chosen for w in weights):
            chosen.add(pid)
            paths[pid] = ("identity", "bias of a layer whose weight takes the identity", False)
        elif kind == "diag" or isinstance(uses[pid][0][0].module, _NORMS):
            why = "norm affine: the batched backward forms it at the same cost, keeping less"
            paths[pid] = ("batched", why, False)
        else:
            paths[pid] = (
                "batched",
                "bias of a layer whose weight takes the batched backward",
                False,
            )
    return chosen


# ---------------------------------------------------------------------------- contributions
class _Term:
    """One covered parameter: its per-task gradients in factored form."""

    kind: str  # "mm" (δᵀa), "sum" (Σ δ), "diag" (Σ δ⊙x̂), "embed" (scatter of δ)

    def __init__(
        self,
        param: Tensor,
        kind: str,
        delta: Tensor,
        a: Tensor | None = None,
        idx: Tensor | None = None,
    ) -> None:
        self.param = param
        self.kind = kind
        if a is not None and a.dtype != delta.dtype:  # mixed precision (autocast)
            dt = torch.promote_types(a.dtype, delta.dtype)
            a, delta = a.to(dt), delta.to(dt)
        self.delta = delta  # [m, N, d_out]
        self.a = a  # [N, d_in] ("mm"), x̂ [N, D] ("diag")
        self.idx = idx  # [N] ("embed")
        self.identity: bool | None = None  # set when the path was chosen beforehand

    def uses_identity(self) -> bool:
        if self.identity is not None:
            return self.identity
        m, n, d_out = self.delta.shape
        if self.kind == "mm":
            assert self.a is not None
            d_in = self.a.shape[1]
            ident = n * n * d_in + m * n * n * d_out + m * m * n * d_out
            explicit = m * n * d_in * d_out + m * m * d_in * d_out
        elif self.kind == "embed":
            v = self.param.shape[0]
            ident = n * n + m * n * n * d_out + m * m * n * d_out
            explicit = m * n * d_out + m * m * v * d_out + m * v * d_out
        else:
            return False
        return n * n <= _MAX_ROW_GRAM and ident < explicit

    def per_task(self) -> Tensor:
        m = self.delta.shape[0]
        d = self.delta
        if self.kind == "mm":
            assert self.a is not None
            g = torch.matmul(d.transpose(1, 2), self.a)
        elif self.kind == "sum":
            g = d.sum(1)
        elif self.kind == "diag":
            assert self.a is not None
            g = (d * self.a).sum(1)
        else:
            assert self.idx is not None
            g = d.new_zeros(m, *self.param.shape).index_add_(1, self.idx, d)
        return g.reshape(m, *self.param.shape)

    def gramian(self, with_bias: bool = False) -> Tensor:
        """This parameter's share of ``G``; ``with_bias``: plus that of a bias fed by the same
        ``δ`` (identity path only: ``⟨(a aᵀ + 1 1ᵀ) δ_i, δ_j⟩``)."""
        m = self.delta.shape[0]
        if not self.uses_identity():
            return gramian_of([self.per_task()], m)
        # in at least float32 and outside autocast (fp16 products overflow)
        dt = gramian_dtype(self.delta.dtype)
        delta = self.delta.to(dt)
        with torch.autocast(delta.device.type, enabled=False):
            if self.kind == "mm":
                assert self.a is not None
                a = self.a.to(dt)
                rows = a @ a.T
                if with_bias:
                    rows = rows + 1
            else:
                assert self.idx is not None
                rows = (self.idx[:, None] == self.idx[None, :]).to(dt)
            ad = torch.matmul(rows, delta).reshape(m, -1)
            return ad @ delta.reshape(m, -1).T

    def combined(self, w: Tensor, cache: dict[int, Tensor] | None = None) -> Tensor:
        key = id(self.delta)
        u = cache.get(key) if cache is not None else None
        if u is None:
            u = torch.tensordot(w.to(self.delta.dtype), self.delta, dims=1)  # [N, d_out]
            if cache is not None:
                cache[key] = u
        if self.kind == "mm":
            assert self.a is not None
            g = u.T @ self.a
        elif self.kind == "sum":
            g = u.sum(0)
        elif self.kind == "diag":
            assert self.a is not None
            g = (u * self.a).sum(0)
        else:
            assert self.idx is not None
            g = u.new_zeros(self.param.shape).index_add_(0, self.idx, u)
        return g.reshape(self.param.shape)


class LayerwisePerTaskGrads(PerTaskGrads):
    """Per-task gradients of the shared parameters, per layer in factored form.

    ``params`` fixes the layout of :meth:`jacobian` / :meth:`apply_direction`. Each parameter is
    either a covered term (rebuilt from ``δ`` and the layer input) or a fallback with its dense
    ``[m, *p.shape]`` per-task gradient.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        terms: dict[int, list[_Term]],
        dense: dict[int, Tensor],
        m: int,
    ) -> None:
        self.params = list(params)
        self.terms = terms
        self.dense = dense
        self.m = m
        self._gramian: Tensor | None = None
        # whether the heads were backpropagated per task (see ``task_losses``)
        self.task_split = False
        # per parameter id: (path, why, fell back for a reason other than cost), path one of
        # "identity", "per-task" (rebuilt from the layer's output gradients), "batched"
        self.paths: dict[int, tuple[str, str, bool]] = {}
        # whether the backward ran once per task rather than batched (see ``policy``)
        self.per_task_loop = False

    def _per_task(self, p: Tensor) -> Tensor:
        if id(p) in self.dense:
            return self.dense[id(p)]
        parts = [t.per_task() for t in self.terms[id(p)]]
        out = parts[0]
        for x in parts[1:]:
            out = out + x
        return out

    def gramian(self) -> Tensor:
        if self._gramian is None:
            g: Tensor | None = None
            # a bias whose layer's weight takes the identity path joins that term
            ident = {
                id(t[0].delta)
                for t in self.terms.values()
                if len(t) == 1 and t[0].kind == "mm" and t[0].uses_identity()
            }
            merged = {
                id(t[0].param)
                for t in self.terms.values()
                if len(t) == 1 and t[0].kind == "sum" and id(t[0].delta) in ident
            }
            with_bias = {
                id(t[0].delta)
                for t in self.terms.values()
                if len(t) == 1 and id(t[0].param) in merged
            }
            for p in self.params:
                if id(p) in merged:
                    continue
                terms = self.terms.get(id(p))
                if terms is not None and len(terms) == 1:
                    t0 = terms[0]
                    term = t0.gramian(with_bias=t0.kind == "mm" and id(t0.delta) in with_bias)
                else:
                    term = gramian_of([self._per_task(p)], self.m)
                g = term if g is None else g + term
            assert g is not None
            self._gramian = g
        return self._gramian

    def jacobian(self) -> Tensor:
        return torch.cat([self._per_task(p).reshape(self.m, -1) for p in self.params], dim=1)

    def write_weights(self, w: Tensor, writes: GradWrites) -> None:
        cache: dict[int, Tensor] = {}  # Σ_t w_t δ_t, shared by a layer's weight and bias
        for p in self.params:
            if id(p) in self.dense:
                jp = self.dense[id(p)]
                writes.add(p, torch.tensordot(w.to(jp.dtype), jp, dims=1))
            else:
                terms = self.terms[id(p)]
                g = terms[0].combined(w, cache)
                for t in terms[1:]:
                    g = g + t.combined(w, cache)
                writes.add(p, g)

    def write_direction(self, g: Tensor, writes: GradWrites) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            writes.add(p, g[offset : offset + n].view_as(p))
            offset += n


def _kinds(rec: LayerRecord) -> dict[str, str]:
    mod = rec.module
    if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return {"weight": "mm", "bias": "sum"}
    if isinstance(mod, nn.Embedding):
        return {"weight": "embed"}
    return {"weight": "diag", "bias": "sum"}


def _batched(
    outputs: Sequence[Tensor | GradientEdge],
    cotangents: Sequence[Tensor],
    inputs: list[Tensor | GradientEdge],
    shapes: list[tuple[torch.Size, torch.dtype]],
    chunk_size: int | None,
    retain_graph: bool,
) -> list[Tensor]:
    """Gradients of ``outputs`` w.r.t. ``inputs`` for the ``m`` rows of ``cotangents``
    (each ``[m, *output.shape]``), in one batched backward per chunk of rows (or, with
    ``chunk_size=0``, one plain backward per row: no vmap, see :mod:`mtlbal.engine.fallback`)."""
    m = cotangents[0].shape[0]
    device = cotangents[0].device
    if chunk_size == 0:
        rows_out = []
        for t in range(m):
            gs = torch.autograd.grad(
                list(outputs),  # type: ignore[arg-type]
                inputs,  # type: ignore[arg-type]
                grad_outputs=[c[t] for c in cotangents],
                retain_graph=retain_graph or t < m - 1,
                allow_unused=True,
            )
            rows_out.append(
                [
                    torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                    for g, (shape, dtype) in zip(gs, shapes)
                ]
            )
        return [torch.stack([r[i] for r in rows_out]) for i in range(len(inputs))]
    step = m if chunk_size is None or chunk_size >= m else chunk_size
    parts: list[list[Tensor]] = []
    for start in range(0, m, step):
        stop = min(start + step, m)
        rows = stop - start
        grads = torch.autograd.grad(
            list(outputs),  # type: ignore[arg-type]
            inputs,  # type: ignore[arg-type]  # tensors and gradient edges mix fine
            grad_outputs=[c[start:stop] for c in cotangents],
            is_grads_batched=True,
            retain_graph=retain_graph or stop < m,
            allow_unused=True,
        )
        chunk: list[Tensor] = []
        for g, (shape, dtype) in zip(grads, shapes):
            if g is None:
                g = torch.zeros(rows, *shape, dtype=dtype, device=device)
            elif g.dim() != len(shape) + 1 or g.shape[0] != rows:
                g = g.expand(rows, *shape)
            chunk.append(g)
        parts.append(chunk)
    if len(parts) == 1:
        return parts[0]
    return [torch.cat([p[i] for p in parts], dim=0) for i in range(len(inputs))]


_SHARED = -1


def _frontier(
    task_losses: Sequence[Tensor],
    record_nodes: set[int],
    shared_ids: set[int],
    objectives_root: Any = None,
) -> tuple[list[list[tuple[Any, int]]], list[list[Tensor]]] | None:
    """Where each task's own sub-graph enters the part of the graph that several tasks reach.

    Returns, per task, the graph edges ``(node, input_nr)`` from nodes only that task reaches
    into nodes several tasks reach, and the parameters only that task reaches; or ``None``
    when the split does not apply (a recorded layer
    or a shared parameter inside one task's own sub-graph, a task loss shared by two tasks).
    """
    owner: dict[int, int] = {}

    def mark_shared(start: Any) -> None:
        stack = [start]
        while stack:
            fn = stack.pop()
            if owner.get(id(fn)) == _SHARED:
                continue
            owner[id(fn)] = _SHARED
            stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)

    roots = []
    for t, loss in enumerate(task_losses):
        root = loss.grad_fn
        if root is None:
            return None
        roots.append(root)
        stack = [root]
        while stack:
            fn = stack.pop()
            o = owner.get(id(fn))
            if o in (t, _SHARED):
                continue
            if o is not None:
                mark_shared(fn)
                continue
            owner[id(fn)] = t
            stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    if objectives_root is not None:
        # ℓ must depend on the model only through the task losses
        stop = {id(r) for r in roots}
        seen_o: set[int] = set()
        stack = [objectives_root]
        while stack:
            fn = stack.pop()
            if id(fn) in seen_o or id(fn) in stop:
                continue
            seen_o.add(id(fn))
            if id(fn) in owner:
                return None
            stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    out: list[list[tuple[Any, int]]] = []
    owned: list[list[Tensor]] = []
    for t, root in enumerate(roots):
        if owner[id(root)] != t:
            return None
        edges: list[tuple[Any, int]] = []
        mine: list[Tensor] = []
        seen: set[int] = set()
        stack = [root]
        while stack:
            fn = stack.pop()
            if id(fn) in seen:
                continue
            seen.add(id(fn))
            if id(fn) in record_nodes:
                return None  # a recorded layer only this task reaches
            var = getattr(fn, "variable", None)
            if var is not None:
                if id(var) in shared_ids:
                    return None  # a shared parameter only this task reaches
                mine.append(var)
            for nxt, nr in fn.next_functions:
                if nxt is None:
                    continue
                if owner.get(id(nxt)) == _SHARED:
                    if getattr(nxt, "variable", None) is not None:
                        return None  # a task branch feeding a shared parameter directly
                    edges.append((nxt, nr))
                else:
                    stack.append(nxt)
        out.append(edges)
        owned.append(mine)
    for edges in out:
        # one task entering the shared part at two nodes, one below the other (e.g. a head
        # that also reads a trunk weight through a term every task shares): its gradient at
        # the lower edge is a total derivative that already holds the upper edge's share, which
        # the batched backward would add again; decline the split
        front = {id(node) for node, _ in edges}
        if len(front) < 2:
            continue
        todo = [nxt for node, _ in edges for nxt, _ in node.next_functions]
        below: set[int] = set()
        while todo:
            fn = todo.pop()
            if fn is None or id(fn) in below:
                continue
            if id(fn) in front:
                return None
            below.add(id(fn))
            todo.extend(nxt for nxt, _ in fn.next_functions)
    return out, owned


def _task_split_cotangents(
    objectives: Tensor,
    task_losses: Sequence[Tensor],
    frontier: list[list[tuple[Any, int]]],
    owned: list[list[Tensor]],
    writes: GradWrites,
) -> tuple[list[GradientEdge], list[Tensor]]:
    """Per-task backward through each task's own sub-graph (no batching), then the cotangents
    of the objectives ``ℓ`` at the frontier: ``[m, *shape]`` per frontier edge, row ``t`` being
    ``Σ_s (∂ℓ_t/∂L_s) ∂L_s/∂(edge)``. The parameters only task ``s`` reaches get
    ``Σ_t (∂ℓ_t/∂L_s) ∂L_s/∂q`` staged in ``writes`` on the way."""
    m = objectives.shape[0]
    eye = torch.eye(m, dtype=objectives.dtype, device=objectives.device)
    dl = torch.autograd.grad(
        objectives,
        list(task_losses),
        eye,
        is_grads_batched=True,
        retain_graph=True,
        allow_unused=True,
    )
    cols = [g.reshape(m) if g is not None else objectives.new_zeros(m) for g in dl]
    c = torch.stack(cols, dim=1)  # C[t, s] = ∂ℓ_t/∂L_s
    col_sums = c.sum(0)
    keys: dict[tuple[int, int], int] = {}
    edges: list[GradientEdge] = []
    per_edge: list[dict[int, Tensor]] = []
    for s, (loss, fr) in enumerate(zip(task_losses, frontier)):
        uniq: list[tuple[Any, int]] = []
        local: set[tuple[int, int]] = set()
        for node, nr in fr:
            key = (id(node), nr)
            if key not in local:
                local.add(key)
                uniq.append((node, nr))
        params = owned[s]
        if not uniq and not params:
            continue
        targets: list[Tensor | GradientEdge] = [GradientEdge(n, nr) for n, nr in uniq]
        targets += params
        gs = torch.autograd.grad(
            loss,
            targets,  # type: ignore[arg-type]
            retain_graph=True,
            allow_unused=True,
        )
        for q, gq in zip(params, gs[len(uniq) :]):
            if gq is not None:
                writes.add(q, col_sums[s].to(gq.dtype) * gq)
        for (node, nr), g in zip(uniq, gs[: len(uniq)]):
            if g is None:
                continue
            key = (id(node), nr)
            if key not in keys:
                keys[key] = len(edges)
                edges.append(GradientEdge(node, nr))
                per_edge.append({})
            per_edge[keys[key]][s] = g
    cots: list[Tensor] = []
    for rows in per_edge:
        any_g = next(iter(rows.values()))
        stacked = torch.stack([rows.get(s, torch.zeros_like(any_g)) for s in range(m)])
        cots.append(torch.tensordot(c.to(stacked.dtype), stacked, dims=1))
    return edges, cots


def layerwise_per_task_grads(
    objectives: Tensor,
    records: Sequence[LayerRecord],
    shared_params: Sequence[Tensor],
    other_params: Sequence[Tensor] = (),
    *,
    chunk_size: int | None = None,
    retain_graph: bool = False,
    force_fallback: Iterable[Tensor] = (),
    per_task_transform: Callable[[Tensor, Tensor], Tensor] | None = None,
    task_losses: Sequence[Tensor] | None = None,
    writes: GradWrites | None = None,
    mode: BatchedBackward | None = None,
    policy: str = "cover",
) -> LayerwisePerTaskGrads:
    """Per-task gradients of ``shared_params`` from the recorded layer calls.

    Args:
        objectives: ``[m]`` per-task objectives.
        records: what :meth:`LayerwiseCapture.take` returned for this forward.
        shared_params: the shared parameters (layout of the Jacobian).
        other_params: parameters outside the shared part; each gets ``Σ_t ∂ℓ_t/∂q`` staged in
            ``writes`` (one ordinary backward restricted to them).
        chunk_size: tasks per batched backward.
        retain_graph: keep the graph after the last backward.
        force_fallback: shared parameters that must get dense per-task gradients (e.g. those a
            gradient transform acts on).
        per_task_transform: ``f(param, grads[m, *shape])`` applied to every fallback
            parameter's per-task gradients.
        task_losses: the ``m`` per-task losses ``L_t`` that ``objectives`` is a function of.
            When given, and each loss has its own sub-graph (its head) that joins the others
            only in the shared part, each head is backpropagated once for its own task (not
            ``m`` times batched, where most cotangents are zero), and the batched backward
            starts where the heads join, with cotangents ``Σ_s (∂ℓ_t/∂L_s)·∂L_s/∂(join)``.
            Exact for any loss weighting; ignored when the split does not apply.
        writes: where the gradients of ``other_params`` are staged (default: written to
            ``.grad`` at once, for standalone use).
        mode: where the batched backward cannot run on the graph (e.g. a
            ``torch.compile``'d model), take the rows one backward at a time instead
            (:class:`~mtlbal.engine.fallback.BatchedBackward` remembers the choice).
        policy: ``"cover"``: every parameter the recorded calls cover is rebuilt from them
            (the identity or the per-task weight gradients, whichever is cheaper);
            ``"cost"``: a covered weight takes the activation identity only where it costs
            less time and memory than the parameter's own batched backward (a bias follows
            its layer's weight; norm affine parameters take the batched backward, which forms
            them at the same cost without keeping ``m ×`` the layer's output); every other
            parameter takes the batched backward. :attr:`LayerwisePerTaskGrads.paths` says
            which path each parameter took and why. Where some parameters take the batched
            backward and every task's backward is large (the recorded layers' multiply-adds
            per graph node above ``2¹⁶``) on a CPU, it runs as ``m`` plain backward passes (the
            per-task loop: the same values, none of vmap's batching overhead, and no
            ``m ×`` activation gradients held at once; ``per_task_loop`` says so).
    """
    staged = writes if writes is not None else GradWrites()
    m = objectives.shape[0]
    shared = list(shared_params)
    shared_ids = {id(p) for p in shared}
    forced = {id(p) for p in force_fallback}
    root = objectives.grad_fn
    seen, global_counts = _walk_counts([root], shared_ids)

    # which records are live (in the graph of ℓ) and valid, and their local edge counts
    live: list[LayerRecord] = []
    local_total: dict[int, int] = {}
    invalid: set[int] = set()
    for rec in records:
        if id(rec.edge.node) not in seen:
            continue
        ok = rec.a._version == rec.a_version
        if not ok:
            invalid.update(id(p) for p in rec.params.values())
            continue
        live.append(rec)
        for pid, c in _local_counts(rec).items():
            local_total[pid] = local_total.get(pid, 0) + c

    # per parameter: the records using it, all of one kind
    uses: dict[int, list[tuple[LayerRecord, str]]] = {}
    for rec in live:
        kinds = _kinds(rec)
        for name, p in rec.params.items():
            uses.setdefault(id(p), []).append((rec, kinds[name]))
    covered: set[int] = set()
    for p in shared:
        pid = id(p)
        u = uses.get(pid)
        if (
            u
            and pid not in forced
            and pid not in invalid
            and len({k for _, k in u}) == 1
            and global_counts.get(pid, 0) == local_total.get(pid, 0)
        ):
            covered.add(pid)
    paths = _fallback_paths(shared, covered, forced, invalid, uses)
    if policy == "cost":
        covered = _choose_by_cost(shared, covered, uses, m, paths)
    elif policy != "cover":
        raise ValueError(f"unknown policy {policy!r} (expected 'cover' or 'cost')")
    needed = [rec for rec in live if any(id(p) in covered for p in rec.params.values())]
    # m plain backward passes instead of one vmapped one where every task's backward is large
    # (see _loop_pays); identical values, no m × activations held at once
    some_batched = any(id(p) not in covered for p in shared)
    loop = (
        policy == "cost"
        and some_batched
        and m > 1
        and objectives.device.type == "cpu"  # measured on CPU only (see _LOOP_WORK_PER_NODE)
        and _loop_pays(live, len(seen))
    )
    # a record not needed must not keep its layer's input alive through the backward (the
    # graph frees it as the backward passes): the records are this step's, used once
    keep = {id(rec) for rec in needed}
    for rec in records:
        if id(rec) not in keep:
            rec.a = rec.a.new_empty(0)
            rec.extra = {}
    fallback = [p for p in shared if id(p) not in covered]

    retain_after = retain_graph
    inputs: list[Tensor | GradientEdge] = [rec.edge for rec in needed]
    shapes = [(rec.out_shape, rec.out_dtype) for rec in needed]
    inputs += fallback
    shapes += [(p.shape, p.dtype) for p in fallback]
    others = list(other_params)
    used_split = False
    outputs: Sequence[Tensor | GradientEdge] = [objectives]
    cotangents = [torch.eye(m, dtype=objectives.dtype, device=objectives.device)]
    if task_losses is not None and inputs:
        record_nodes = {id(rec.edge.node) for rec in live}
        found = _frontier(task_losses, record_nodes, shared_ids, objectives.grad_fn)
        if found is not None:
            other_ids = {id(q) for q in others}
            owned = [[q for q in qs if id(q) in other_ids] for qs in found[1]]
            outputs, cotangents = _task_split_cotangents(
                objectives, task_losses, found[0], owned, staged
            )
            used_split = True
            done = {id(q) for qs in owned for q in qs}
            others = [q for q in others if id(q) not in done]
    if others:
        og = torch.autograd.grad(
            objectives.sum(), others, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        for q, g in zip(others, og):
            staged.add(q, g)
    if inputs and outputs and loop:
        grads = _batched(outputs, cotangents, inputs, shapes, 0, retain_after)
    elif inputs and outputs and mode is not None:
        outs_, cots_ = outputs, cotangents
        grads = mode.run(
            lambda retain: _batched(outs_, cots_, inputs, shapes, chunk_size, retain),
            lambda: _batched(outs_, cots_, inputs, shapes, 0, retain_after),
            retain_after,
        )
    elif inputs and outputs:
        grads = _batched(outputs, cotangents, inputs, shapes, chunk_size, retain_after)
    else:  # nothing of the shared part is reached by any task
        dev = objectives.device
        grads = [torch.zeros(m, *shape, dtype=dt, device=dev) for shape, dt in shapes]
    deltas = grads[: len(needed)]
    dense = {id(p): g for p, g in zip(fallback, grads[len(needed) :])}
    if per_task_transform is not None:
        for p in fallback:
            dense[id(p)] = per_task_transform(p, dense[id(p)])

    # factored terms: rows of every call using a parameter, concatenated
    rows_cache: dict[int, dict[str, Tensor]] = {}
    for rec, delta in zip(needed, deltas):
        mod = rec.module
        r: dict[str, Tensor] = {}
        if isinstance(mod, nn.Linear):
            r["a"] = rec.a.reshape(-1, rec.a.shape[-1])
            r["d"] = delta.reshape(m, -1, delta.shape[-1])
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            a_rows, d_rows = _conv_rows(rec, delta)
            assert d_rows is not None
            r["a"], r["d"] = a_rows, d_rows
        elif isinstance(mod, nn.Embedding):
            ids = rec.a.reshape(-1)
            de = delta.reshape(m, ids.shape[0], -1)
            if mod.padding_idx is not None:
                de = de * (ids != mod.padding_idx).to(de.dtype)[None, :, None]
            r["idx"], r["d"] = ids, de
        else:
            r["a"], r["d"] = _norm_rows(rec, delta)
        rows_cache[id(rec)] = r

    terms: dict[int, list[_Term]] = {}
    for p in shared:
        pid = id(p)
        if pid not in covered:
            continue
        u = [(rec, k) for rec, k in uses[pid] if id(rec) in rows_cache]
        kind = u[0][1]
        rs = [rows_cache[id(rec)] for rec, _ in u]
        d = rs[0]["d"] if len(rs) == 1 else torch.cat([x["d"] for x in rs], dim=1)
        a: Tensor | None = None
        idx: Tensor | None = None
        if kind in ("mm", "diag"):
            a = rs[0]["a"] if len(rs) == 1 else torch.cat([x["a"] for x in rs], dim=0)
        elif kind == "embed":
            idx = rs[0]["idx"] if len(rs) == 1 else torch.cat([x["idx"] for x in rs], dim=0)
        term = _Term(p, kind, d, a=a, idx=idx)
        if policy == "cost" and kind in ("mm", "embed"):
            term.identity = True  # chosen by _choose_by_cost
        terms[pid] = [term]
        if pid not in paths:
            if kind in ("mm", "embed") and term.uses_identity():
                paths[pid] = ("identity", "cheaper than the per-task weight gradients", False)
            else:
                paths[pid] = ("per-task", "rebuilt from the layer's output gradients", False)
    out = LayerwisePerTaskGrads(shared, terms, dense, m)
    out.task_split = used_split
    out.per_task_loop = loop
    out.paths = paths
    if writes is None:
        staged.commit()
    return out
