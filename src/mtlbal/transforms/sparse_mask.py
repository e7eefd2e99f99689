"""Sparse training against gradient conflict: a fixed mask on the shared parameters.

Zhang, Shen, Cao, Dai, Zhou, Zhang, Zhang, Shutova, "Sparse Training for Multi-Task Learning:
Mitigating Gradient Conflict", arXiv:2411.18615. Only a subset of the shared (encoder)
parameters is trained; the binary mask ``M`` is chosen once, before training, and kept fixed:

    θ_s ← θ_s − η · M ⊙ update(g̃_1 … g̃_m),      g̃_t = M ⊙ g_t

The mask is applied to **each task's gradient before aggregation** (``per_task``), so gradient
methods and their statistics (norms, cosines, conflict incidence) see only the live
coordinates, which is the paper's reading of sparse training as a projection of the task
gradients onto the selected subspace (its Eq. 9 does not fix the order; masking first is the
documented choice here). Where no per-task gradients of the parameters exist (no aggregator, or
a cut point: there the per-task gradients are at the representation), the mask acts on the
combined gradient of the trunk (``combined``) and the statistics at the cut are those of the
representation, unmasked.

**Selection** (``selection``, on ``score``):

* ``"psn"`` (the paper's Parameter Selection per Neuron, default): for every neuron keep the
  top-``k`` input connections (``k`` given, or ``ratio·fan_in`` rounded, at least 1); a neuron
  with ``fan_in ≤ k`` keeps all of them.
* ``"global"``: keep the top ``ratio`` of all selectable weights of the shared part together.

``score="weight"`` ranks by ``|θ|`` at selection time (the paper); ``score="grad"`` ranks by
``|∇θ|`` from given gradients (``grads=``, e.g. accumulated over a few batches) or from
``closure()`` (a function returning a scalar loss, e.g. ``Σ_t L_t`` on one batch).

**What a neuron is.** Linear ``[out, in]``: a row (``in`` inputs). Convolution
``[C_out, C_in/g, k…]``: an output channel with ``C_in/g·∏k`` inputs. Transposed convolution
``[C_in, C_out/g, k…]``: an output channel, gathered across the input-channel dimension of its
group. ``nn.MultiheadAttention``: every row of ``in_proj_weight`` (or ``q/k/v_proj_weight``) is a
neuron, and ``out_proj`` is a Linear. Any other parameter with two or more dimensions: dim 0
indexes neurons, the rest are their inputs.

**Biases, norm layers, embeddings** (not neurons' input connections): trainable by default;
``biases="freeze"``, ``norms="freeze"`` and ``embeddings="freeze"`` freeze them entirely.
Biases are every 1-D (or 0-D) parameter outside norm layers, including ``in_proj_bias`` and
``bias_k``/``bias_v``. Norm layers are BatchNorm/InstanceNorm/LayerNorm/GroupNorm/RMSNorm
(their running statistics are buffers that train mode still updates: put those modules in eval
mode to freeze them). ``skip=`` lists parameters left fully trainable.

**Frozen stays frozen.** Masked entries get a zero gradient, and :meth:`after_step` writes the
frozen entries back (``θ ← where(M, θ, θ_0)``) so they stay bitwise unchanged under any
optimizer, including decoupled weight decay (AdamW) and momentum fed by weight decay (SGD).
:func:`mtlbal.wrap` calls it after every ``step()``; with a bare Balancer call
``balancer.after_step()`` right after ``optimizer.step()``. The reference values ``θ_0`` are
copied from the parameters at the first backward after construction or after
:meth:`load_state_dict` (so load the model weights before training resumes), one copy of each
masked parameter, kept out of ``state_dict`` (the checkpointed model already holds them).

State: the masks (``state_dict``); no host sync per step.

Example:
    >>> import torch, mtlbal
    >>> trunk = torch.nn.Linear(8, 4)
    >>> mask = SparseMask(trunk, k=2)             # every neuron (row) keeps its 2 largest |w|
    >>> mask.mask_for(trunk.weight).sum(1)
    tensor([2, 2, 2, 2])
    >>> g = mask.per_task(trunk.weight, torch.ones(3, 4, 8))   # [m, *shape], 3 tasks
    >>> int(g[0].count_nonzero())
    8
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mtlbal.transforms.base import GradientTransform

__all__ = ["SparseMask", "global_mask", "psn_mask"]

Selection = Literal["psn", "global"]
Score = Literal["weight", "grad"]
Rule = Literal["train", "freeze"]

_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_EMBEDDINGS: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


# ---------------------------------------------------------------------- neuron layouts
def _to_neurons(x: Tensor, groups: int | None) -> Tensor:
    """``[n_neurons, fan_in]`` view of a weight (``groups`` set: transposed-conv layout)."""
    if groups is None:
        return x.reshape(x.shape[0], -1)
    c_in, c_out_g = x.shape[0], x.shape[1]
    k = int(math.prod(x.shape[2:]))
    y = x.reshape(groups, c_in // groups, c_out_g, k).permute(0, 2, 1, 3)
    return y.reshape(groups * c_out_g, (c_in // groups) * k)


def _from_neurons(y: Tensor, shape: torch.Size, groups: int | None) -> Tensor:
    if groups is None:
        return y.reshape(shape)
    c_in, c_out_g = shape[0], shape[1]
    k = int(math.prod(shape[2:]))
    x = y.reshape(groups, c_out_g, c_in // groups, k).permute(0, 2, 1, 3)
    return x.reshape(shape)


def psn_mask(scores: Tensor, k: int) -> Tensor:
    """Per-neuron top-``k``: ``scores`` ``[n_neurons, fan_in]`` → bool mask of that shape.

    Rows with ``fan_in ≤ k`` keep every entry.
    """
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    fan_in = scores.shape[1]
    if fan_in <= k:
        return torch.ones_like(scores, dtype=torch.bool)
    idx = scores.topk(k, dim=1).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask


def global_mask(scores: Sequence[Tensor], ratio: float) -> list[Tensor]:
    """Keep the top ``ratio`` of all entries of ``scores`` together; one bool mask per tensor."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = max(1, round(ratio * flat.numel()))
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[flat.topk(keep).indices] = True
    out, offset = [], 0
    for s in scores:
        out.append(chosen[offset : offset + s.numel()].view(s.shape))
        offset += s.numel()
    return out


class SparseMask(GradientTransform):
    """Train only a fixed, pre-selected subset of the shared parameters.

    Args:
        params: module(s) or parameters to mask; ``None`` (default): the Balancer's shared
            part, bound when the Balancer is built. Selection happens then (or here, when
            given): build it before training.
        k: ``"psn"``: inputs kept per neuron (the paper uses 300 on pre-trained ViT/Swin/SAM).
        ratio: ``"psn"``: share of each neuron's inputs kept (``max(1, round(ratio·fan_in))``);
            ``"global"``: share of all selectable weights kept.
        selection: ``"psn"`` (default) or ``"global"``.
        score: ``"weight"`` (``|θ|``, default) or ``"grad"`` (``|∇θ|``).
        grads: for ``score="grad"``: gradients, a mapping parameter → tensor or a sequence in
            the order of the parameters.
        closure: for ``score="grad"`` without ``grads``: returns a scalar loss to differentiate.
        biases / norms / embeddings: ``"train"`` (default) or ``"freeze"``.
        skip: parameters left fully trainable.
        restore: write frozen entries back in :meth:`after_step` (default ``True``).
    """

    # per-parameter: the number of tasks does not enter
    supports_missing_tasks = True

    def __init__(
        self,
        params: nn.Module | Iterable[nn.Module] | Iterable[Tensor] | None = None,
        *,
        k: int | None = None,
        ratio: float | None = None,
        selection: Selection = "psn",
        score: Score = "weight",
        grads: Mapping[Tensor, Tensor] | Sequence[Tensor] | None = None,
        closure: Callable[[], Tensor] | None = None,
        biases: Rule = "train",
        norms: Rule = "train",
        embeddings: Rule = "train",
        skip: Iterable[Tensor] = (),
        restore: bool = True,
    ) -> None:
        super().__init__()
        if selection not in ("psn", "global"):
            raise ValueError(f"selection must be 'psn' or 'global', got {selection!r}")
        if score not in ("weight", "grad"):
            raise ValueError(f"score must be 'weight' or 'grad', got {score!r}")
        for name, rule in (("biases", biases), ("norms", norms), ("embeddings", embeddings)):
            if rule not in ("train", "freeze"):
                raise ValueError(f"{name} must be 'train' or 'freeze', got {rule!r}")
        if selection == "psn":
            if (k is None) == (ratio is None):
                raise ValueError("selection='psn' needs exactly one of k (per neuron) or ratio")
            if k is not None and (not isinstance(k, int) or k < 1):
                raise ValueError(f"k must be a positive int, got {k!r}")
        else:
            if ratio is None or k is not None:
                raise ValueError("selection='global' needs ratio (and no k)")
        if ratio is not None and not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if score == "grad" and grads is None and closure is None:
            raise ValueError("score='grad' needs grads= or closure=")
        self.k = k
        self.ratio = ratio
        self.selection: Selection = selection
        self.score: Score = score
        self.biases: Rule = biases
        self.norms: Rule = norms
        self.embeddings: Rule = embeddings
        self.restore = bool(restore)
        self._grads = grads
        self._closure = closure
        self._skip = {id(p) for p in skip}
        self.params: list[Tensor] = []
        self._index: dict[int, int] = {}
        self._frozen: dict[int, Tensor] = {}
        self._selected = False
        if params is not None:
            tensors, modules = _split(params)
            self._select(tensors, modules)

    # what the mask is selected on, not configuration data
    repr_omits = ("params", "grads", "closure", "skip")

    def hparams(self) -> dict[str, object]:
        return {
            "k": self.k,
            "ratio": self.ratio,
            "selection": self.selection,
            "score": self.score,
            "biases": self.biases,
            "norms": self.norms,
            "embeddings": self.embeddings,
            "restore": self.restore,
        }

    # ------------------------------------------------------------------ selection
    def bind(self, shared_params: list[Tensor], shared_modules: list[nn.Module]) -> None:
        if not self._selected:
            self._select(shared_params, shared_modules)
            return
        shared = {id(p) for p in shared_params}
        outside = [i for i, p in enumerate(self.params) if id(p) not in shared]
        if outside:
            raise ValueError(
                f"SparseMask covers {len(outside)} parameter(s) that the Balancer does not "
                "balance: masks apply to the shared part only"
            )

    def _classify(
        self, tensors: Sequence[Tensor], modules: Sequence[nn.Module]
    ) -> list[tuple[Tensor, str, int | None]]:
        """``(param, kind, groups)`` with kind in weight/bias/norm/embedding."""
        kinds: dict[int, tuple[str, int | None]] = {}
        for root in modules:
            for mod in root.modules():
                for name, p in mod.named_parameters(recurse=False):
                    if id(p) in kinds:
                        continue
                    if isinstance(mod, _NORMS):
                        kinds[id(p)] = ("norm", None)
                    elif isinstance(mod, _EMBEDDINGS):
                        kinds[id(p)] = ("embedding", None)
                    elif isinstance(mod, nn.modules.conv._ConvTransposeNd) and name == "weight":
                        kinds[id(p)] = ("weight", int(mod.groups))
                    elif isinstance(mod, nn.MultiheadAttention) and name in _MHA_WEIGHTS:
                        kinds[id(p)] = ("weight", None)
                    else:
                        kinds[id(p)] = ("weight" if p.dim() >= 2 else "bias", None)
        out: list[tuple[Tensor, str, int | None]] = []
        seen: set[int] = set()
        params: list[Tensor] = list(tensors)
        for root in modules:
            params.extend(root.parameters())
        for t in params:
            if id(t) in seen or not t.requires_grad:
                continue
            seen.add(id(t))
            kind, groups = kinds.get(id(t), ("weight" if t.dim() >= 2 else "bias", None))
            out.append((t, kind, groups))
        return out

    def _scores(self, weights: list[Tensor]) -> list[Tensor]:
        if self.score == "weight":
            return [w.detach().abs() for w in weights]
        if self._grads is not None:
            if isinstance(self._grads, Mapping):
                by_id = {id(k): v for k, v in self._grads.items()}
                missing = [i for i, w in enumerate(weights) if id(w) not in by_id]
                if missing:
                    raise ValueError(
                        f"grads= lacks {len(missing)} of the {len(weights)} selectable weights"
                    )
                gs = [by_id[id(w)] for w in weights]
            else:
                raise TypeError(
                    "grads= must be a mapping {parameter: gradient} (a sequence is ambiguous "
                    "once biases and norm layers are set aside)"
                )
        else:
            assert self._closure is not None
            with torch.enable_grad():
                loss = self._closure()
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("closure must return a scalar loss tensor")
            gs = list(torch.autograd.grad(loss, weights, allow_unused=True, materialize_grads=True))
        for w, g in zip(weights, gs):
            if g.shape != w.shape:
                raise ValueError(
                    f"a gradient of shape {tuple(g.shape)} was given for a weight of shape "
                    f"{tuple(w.shape)}"
                )
        return [g.detach().abs().to(w.device) for w, g in zip(weights, gs)]

    def _select(self, tensors: Sequence[Tensor], modules: Sequence[nn.Module]) -> None:
        entries = self._classify(tensors, modules)
        if not entries:
            raise ValueError("SparseMask found no parameter that requires grad")
        rules = {"bias": self.biases, "norm": self.norms, "embedding": self.embeddings}
        masks: list[Tensor | None] = [None] * len(entries)
        sel = [
            i
            for i, (p, kind, _) in enumerate(entries)
            if kind == "weight" and id(p) not in self._skip
        ]
        for i, (p, kind, _) in enumerate(entries):
            if id(p) not in self._skip and kind != "weight" and rules[kind] == "freeze":
                masks[i] = torch.zeros_like(p, dtype=torch.bool)
        if sel:
            scores = self._scores([entries[i][0] for i in sel])
            views = [_to_neurons(s, entries[i][2]) for s, i in zip(scores, sel)]
            if self.selection == "psn":
                chosen = []
                for v in views:
                    kk = self.k if self.k is not None else max(1, round(self.ratio * v.shape[1]))  # type: ignore[operator]
                    chosen.append(psn_mask(v, kk))
            else:
                assert self.ratio is not None
                chosen = global_mask(views, self.ratio)
            for i, c in zip(sel, chosen):
                p, _, groups = entries[i]
                masks[i] = _from_neurons(c, p.shape, groups).contiguous()
        self.params = [p for p, _, _ in entries]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        for i, mask in enumerate(masks):
            full = mask is not None and bool(mask.all())  # selection time only
            self.add_state(f"mask_{i}", None)
            setattr(self, f"mask_{i}", None if (mask is None or full) else mask)
        self._selected = True
        self._frozen = {}

    # ------------------------------------------------------------------ queries
    def mask_for(self, param: Tensor) -> Tensor | None:
        """The bool mask of ``param`` (``True`` = trainable), or ``None`` if fully trainable."""
        i = self._index.get(id(param))
        if i is None:
            return None
        mask: Tensor | None = getattr(self, f"mask_{i}")
        if mask is not None and mask.device != param.device:
            mask = mask.to(param.device)
            setattr(self, f"mask_{i}", mask)
        return mask

    def trainable_fraction(self) -> float:
        """Share of the covered entries that are trainable (host sync; for reporting)."""
        total = sum(p.numel() for p in self.params)
        live = 0
        for p in self.params:
            m = self.mask_for(p)
            live += p.numel() if m is None else int(m.sum())
        return live / max(total, 1)

    def applies_to(self, param: Tensor) -> bool:
        return self.mask_for(param) is not None

    # ------------------------------------------------------------------ the transform
    def _remember(self, param: Tensor) -> None:
        if self.restore and id(param) not in self._frozen:
            self._frozen[id(param)] = param.detach().clone()

    def per_task(self, param: Tensor, grads: Tensor) -> Tensor:
        mask = self.mask_for(param)
        if mask is None:
            return grads
        self._remember(param)
        return torch.where(mask, grads, torch.zeros((), dtype=grads.dtype, device=grads.device))

    def combined(self, param: Tensor, grad: Tensor) -> Tensor:
        return self.per_task(param, grad)

    @torch.no_grad()
    def after_step(self) -> None:
        """Write the frozen entries back (bitwise) after the optimizer step."""
        if not self.restore:
            return
        for p in self.params:
            ref = self._frozen.get(id(p))
            mask = self.mask_for(p)
            if ref is None or mask is None:
                continue
            p.copy_(torch.where(mask, p, ref))

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """The mask is configuration, not running state: only the reference copy is dropped."""
        self._frozen = {}

    def extra_state(self) -> dict[str, Any]:
        return {"shapes": [tuple(p.shape) for p in self.params]}

    # ------------------------------------------------------------------ copy / pickle
    def __getstate__(self) -> dict[str, Any]:
        # the lookups keyed by id(param) do not survive a copy (deepcopy, pickle): the frozen
        # references travel by position in ``params``, and the index is rebuilt on arrival
        state = dict(super().__getstate__())
        pos = {id(p): i for i, p in enumerate(self.params)}
        state["_index"] = {}
        state["_frozen"] = {pos[k]: v for k, v in self._frozen.items() if k in pos}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        frozen = state.pop("_frozen", {})
        super().__setstate__(state)
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._frozen = {id(self.params[i]): v for i, v in frozen.items()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        shapes = [tuple(s) for s in state.get("shapes", [])]
        mine = [tuple(p.shape) for p in self.params]
        if self._selected and shapes != mine:
            raise ValueError(
                f"SparseMask state was saved for parameters of shapes {shapes}, "
                f"this one covers {mine}"
            )
        self._frozen = {}


def _split(
    params: nn.Module | Iterable[nn.Module] | Iterable[Tensor],
) -> tuple[list[Tensor], list[nn.Module]]:
    if isinstance(params, nn.Module):
        return [], [params]
    tensors: list[Tensor] = []
    modules: list[nn.Module] = []
    for x in params:
        if isinstance(x, nn.Module):
            modules.append(x)
        elif isinstance(x, Tensor):
            tensors.append(x)
        else:
            raise TypeError(f"SparseMask takes modules or parameters, got {type(x).__name__}")
    return tensors, modules
