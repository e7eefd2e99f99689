"""F-MTL: per-task sharpness-aware perturbation, loss and flatness directions aggregated apart.

Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat Regions"
(arXiv:2211.13723; later "Beyond Losses Reweighting: Empowering Multi-Task Learning via the
Generalization Perspective", ICCV 2025). Official code: VietHoang1512/FS-MTL (``nyuv2/train.py``
read at 1f20b2cd59ac, ``nyuv2/mtl.py`` at 1371ec52881a; not copied). The official NYUv2 loop's
MGDA variant also normalises every ``g_t`` and ``h_t`` to unit norm first; here that is the
wrapped aggregator's business (e.g. ``MGDA(normalization="l2")``).

For ``m`` tasks with objectives ``ℓ_t`` (the loss weighting's), shared parameters ``θ_s`` and
the task-specific ("head") parameters ``θ_h`` that ``ℓ_t`` reaches:

1. at ``θ``: ``g_t = ∇_{θ_s} ℓ_t`` (the rows of ``J``, ``[m, n]``) and ``g_t^h = ∇_{θ_h} ℓ_t``;
2. per task, the perturbation (SAM), normalised separately on the shared part and the heads::

       ε_t^s = ρ · g_t / ‖g_t‖              ε_t^h = ρ · g_t^h / ‖g_t^h‖
       (adaptive, ASAM:  ε = ρ · θ² ⊙ g / ‖|θ| ⊙ g‖)

3. per task, at ``θ + ε_t`` (one forward through the closure, then ``ℓ_t`` only):
   ``ĝ_t = ∇_{θ_s} ℓ_t(θ + ε_t)`` and ``ĝ_t^h``; the parameters are then restored bitwise;
4. the flatness directions ``h_t = ĝ_t − g_t`` (rows of ``H``, ``[m, n]``);
5. shared update ``Agg(J) + Agg(H)`` — the aggregator applied **separately** to the loss
   directions and the flatness directions, as in the official code; heads: ``Σ_t ĝ_t^h``
   (each head's sharpness-aware gradient).

With ``Sum`` as the aggregator (the default) the shared update is ``Σ_t ĝ_t``, per-task SAM.

Cost: ``m`` extra forwards (the closure) and ``m`` extra backward passes per step; memory
``2 m n`` for ``J`` and ``H``.

Documented choices where the paper and the code leave room:

* one ``ρ`` for the shared part and the heads (the code's choice; the bound allows two);
* the perturbed objectives are ``c_t · L_t(θ + ε_t)`` with ``c_t = ∂ℓ_t/∂L_t`` at ``θ`` (the
  loss weighting's multipliers, held fixed): the flatness term is measured on the same scale as
  the loss term;
* buffers of the shared modules (BatchNorm's running statistics) are put back after each
  perturbed forward, so the perturbed passes do not update them (the code disables them); the
  heads' buffers are yours (run the closure's heads in eval mode if they have BatchNorm);
* learnable strategy parameters (uncertainty weighting's) are not perturbed and get their plain
  gradient.

Shapes: ``J`` and ``H`` are ``[m, n]``; :func:`fmtl_direction` returns ``[n]``;
:func:`sam_perturbation` maps per-parameter gradients to per-parameter perturbations of the
same shapes.

Usage: the Balancer needs a closure (``Need.CLOSURE``) that re-runs the forward on the same
batch and returns the losses, as the step's losses were given (a dict or a sequence)::

    def closure():
        return {"a": loss_a(model(x)), "b": loss_b(model(x))}

    info = balancer.backward(closure(), closure=closure)   # or opt.backward(..., closure=...)

Example:
    >>> import torch, mtlbal
    >>> trunk = torch.nn.Linear(3, 4)
    >>> heads = torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in range(2)])
    >>> x = torch.randn(8, 3)
    >>> def closure():
    ...     z = trunk(x)
    ...     return {"a": heads[0](z).pow(2).mean(), "b": heads[1](z).abs().mean()}
    >>> b = mtlbal.Balancer(trunk, aggregator=mtlbal.aggregation.FMTL(rho=0.05))
    >>> info = b.backward(closure(), closure=closure)
    >>> info.extras["flat_norms"].shape        # ‖h_t‖ per task
    torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlbal import _distributed as dist_util
from mtlbal.aggregation.base import Aggregator, GramianAggregator, check_jacobian
from mtlbal.aggregation.sum import Sum
from mtlbal.step import Need, StepContext

__all__ = ["FMTL", "flat_pass", "fmtl_direction", "sam_perturbation"]


def sam_perturbation(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    rho: float,
    *,
    adaptive: bool = False,
    eps: float = 1e-12,
) -> list[Tensor]:
    """The SAM perturbation of one group of parameters: ``ε = ρ g/‖g‖`` (``‖·‖`` over the whole
    group), or ASAM's ``ε = ρ θ²⊙g / ‖|θ|⊙g‖`` with ``adaptive=True``. ``eps`` guards the norm
    (the official code's 1e-12). Returns one tensor per parameter, shaped like it."""
    if not grads:
        return []
    scaled = [p.detach().abs() * g for p, g in zip(params, grads)] if adaptive else list(grads)
    dt = torch.promote_types(grads[0].dtype, torch.float32)
    norm = torch.sqrt(sum((s.to(dt).pow(2).sum() for s in scaled), torch.zeros((), dtype=dt)))
    factor = rho / (norm + eps)
    if adaptive:
        return [(p.detach().pow(2) * g * factor).to(g.dtype) for p, g in zip(params, grads)]
    return [(g * factor).to(g.dtype) for g in grads]


def fmtl_direction(
    jacobian: Tensor,
    flat: Tensor,
    aggregator: Aggregator,
    ctx: StepContext | None = None,
) -> Tensor:
    """``Agg(J) + Agg(H)``: the aggregator applied to the loss directions ``J`` and to the
    flatness directions ``H`` separately (both ``[m, n]``); returns ``[n]``."""
    ctx = ctx if ctx is not None else StepContext()
    return aggregator.aggregate_jacobian(jacobian, ctx) + aggregator.aggregate_jacobian(flat, ctx)


class FMTL(Aggregator):
    """F-MTL around any aggregator (see the module docstring).

    Args:
        aggregator: applied to the loss directions and to the flatness directions separately;
            default :class:`~mtlbal.aggregation.Sum` (per-task SAM). Gramian-based ones
            (UPGrad, MGDA, PCGrad, …) and Jacobian ones both work.
        rho: the perturbation radius ``ρ > 0`` (the official NYUv2 default is 2 with
            ``adaptive=True``; use a small value, e.g. 0.05, without it).
        adaptive: ASAM's scale-invariant perturbation (the official code's default).

    Needs a closure: ``balancer.backward(losses, closure=closure)``; without one the step is
    refused (``ValueError``) before anything changes. Runs at the shared parameters (not at a
    cut point), without gradient accumulation or a ``GradScaler``. One extra host sync per
    step (``host_sync``): the perturbed losses and flatness directions are checked finite.
    """

    needs = frozenset({Need.GRAMIAN, Need.CLOSURE})
    host_sync = True
    homogeneity = None  # ρ is an absolute radius

    def __init__(
        self, aggregator: Aggregator | None = None, *, rho: float = 0.05, adaptive: bool = False
    ) -> None:
        inner = aggregator if aggregator is not None else Sum()
        if not isinstance(inner, Aggregator):
            raise TypeError(f"FMTL: aggregator must be an Aggregator, got {type(inner).__name__}")
        if isinstance(inner, FMTL) or Need.CLOSURE in inner.needs:
            raise ValueError("FMTL: the inner aggregator cannot itself need a closure")
        super().__init__(inner.reduction)
        rho = float(rho)
        if not rho > 0:
            raise ValueError(f"FMTL: rho must be > 0, got {rho}")
        self.aggregator = inner
        self._inner_given = aggregator is not None
        self.rho = rho
        self.adaptive = bool(adaptive)
        self.needs = frozenset({*inner.needs, Need.GRAMIAN, Need.CLOSURE})

    def hparams(self) -> dict[str, Any]:
        given = self.aggregator if self._inner_given else None  # None: the default Sum
        return {"aggregator": given, "rho": self.rho, "adaptive": self.adaptive}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    @property
    def inner_is_gramian(self) -> bool:
        return isinstance(self.aggregator, GramianAggregator)

    def forward(
        self, jacobian: Tensor, *, flat: Tensor | None = None, losses: Tensor | None = None
    ) -> Tensor:
        """Standalone: ``Agg(J) + Agg(H)`` for a Jacobian ``J`` and the flatness directions
        ``H = flat`` (both ``[m, n]``, checked like any Jacobian); ``flat`` is required."""
        if flat is None:
            raise ValueError(
                "FMTL: pass the flatness directions, FMTL(...)(J, flat=H); inside a Balancer "
                "they come from the closure's perturbed passes"
            )
        check_jacobian(jacobian, type(self).__name__)
        check_jacobian(flat, type(self).__name__)
        if flat.shape != jacobian.shape:
            raise ValueError(
                f"FMTL: flat has shape {tuple(flat.shape)}, the Jacobian {tuple(jacobian.shape)}"
            )
        return fmtl_direction(jacobian, flat, self.aggregator, StepContext(losses=losses))

    def aggregate_jacobian(self, jacobian: Tensor, ctx: StepContext | None = None) -> Tensor:
        ctx = ctx if ctx is not None else StepContext()
        flat = ctx.extras.get("flat_jacobian")
        if flat is None:
            raise ValueError(
                "FMTL needs the flatness directions of the step (a closure: "
                "balancer.backward(losses, closure=closure)); standalone, call "
                "fmtl_direction(J, H, aggregator)"
            )
        return fmtl_direction(jacobian, flat.to(jacobian.dtype), self.aggregator, ctx)

    def reset(self) -> None:
        super().reset()
        self.aggregator.reset()


def _pick(out: Any, names: Sequence[str], t: int) -> Tensor:
    """Task ``t``'s loss in what the closure returned (a dict by name, a sequence by position)."""
    name = names[t]
    if isinstance(out, Mapping):
        if name not in out:
            raise ValueError(
                f"F-MTL: the closure's losses have no task {name!r} (got {sorted(map(str, out))})"
            )
        loss = out[name]
    elif isinstance(out, Sequence) and not isinstance(out, (str, bytes)):
        if len(out) != len(names):
            raise ValueError(
                f"F-MTL: the closure returned {len(out)} losses for {len(names)} tasks"
            )
        loss = out[t]
    else:
        raise TypeError(
            f"F-MTL: the closure must return the losses (a dict or a sequence), got "
            f"{type(out).__name__}"
        )
    if not (isinstance(loss, Tensor) and loss.dim() == 0 and loss.requires_grad):
        raise ValueError(
            f"F-MTL: the closure's loss of task {name!r} must be a scalar tensor that requires grad"
        )
    return loss


def flat_pass(
    closure: Callable[[], Any],
    names: Sequence[str],
    shared: Sequence[Tensor],
    shared_grads: Sequence[Tensor],
    heads: Sequence[Tensor],
    head_grads: Sequence[Tensor],
    loss_weights: Tensor,
    *,
    rho: float,
    adaptive: bool,
    modules: Sequence[nn.Module] = (),
    world: int = 1,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """The ``m`` perturbed passes of one F-MTL step (what the Balancer runs).

    ``shared_grads`` / ``head_grads``: per parameter, the ``[m, *p.shape]`` gradients of the
    objectives at ``θ``; ``loss_weights``: ``c_t = ∂ℓ_t/∂L_t`` (held fixed). For each task the
    shared parameters and the heads are moved by their own SAM perturbation, ``closure()``
    re-runs the forward, ``c_t·L_t`` is differentiated, and every perturbed tensor — and the
    buffers of ``modules`` — is copied back from a saved copy (bitwise; also if the closure
    raises). Under DDP (``world > 1``) the perturbed gradients are averaged over the ranks, like
    the per-task gradients at ``θ``.

    Returns the flatness directions ``h_t = ĝ_t − g_t`` per shared parameter (``[m, *p.shape]``),
    the heads' summed sharpness-aware gradients ``Σ_t ĝ_t^h`` (per head parameter) and the
    perturbed losses ``[m]`` (detached).
    """
    m = len(names)
    params = [*shared, *heads]
    buffers = [b for mod in modules for b in mod.buffers()]
    flat: list[list[Tensor]] = [[] for _ in shared]
    head_sums = [torch.zeros_like(h) for h in heads]
    losses = []
    for t in range(m):
        eps = sam_perturbation([g[t] for g in shared_grads], shared, rho, adaptive=adaptive)
        eps += sam_perturbation([g[t] for g in head_grads], heads, rho, adaptive=adaptive)
        saved = [p.detach().clone() for p in params]
        saved_buffers = [b.detach().clone() for b in buffers]
        try:
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.add_(e)
            with torch.enable_grad():
                loss = _pick(closure(), names, t)
                objective = loss_weights[t].to(loss.dtype) * loss
                got = torch.autograd.grad(
                    objective, params, allow_unused=True, materialize_grads=True
                )
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
                for b, s in zip(buffers, saved_buffers):
                    b.copy_(s)
        got_l = list(got)
        if world > 1:
            got_l = [dist_util.all_mean(g) for g in got_l]
        for k, g in enumerate(got_l[: len(shared)]):
            flat[k].append(g - shared_grads[k][t])
        for k, g in enumerate(got_l[len(shared) :]):
            head_sums[k] = head_sums[k] + g
        losses.append(loss.detach())
    sam_losses = torch.stack(losses)
    if world > 1:
        sam_losses = dist_util.all_mean(sam_losses)
    return [torch.stack(f) for f in flat], head_sums, sam_losses
