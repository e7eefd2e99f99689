"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, arXiv:1711.02257).

Learnable task weights ``w`` (``[m]``, initialised to 1) trained so that the weighted gradient
norms at a layer ``W`` (the last shared layer by default) follow the tasks' relative training
rates:

    G_t = ‖∇_W (w_t L_t)‖ = w_t ‖∇_W L_t‖,   Ḡ = mean_t G_t
    L̃_t = L_t / L_t(0),   r_t = L̃_t / mean_j L̃_j
    L_grad = Σ_t | G_t − Ḡ · r_t^α |          (the target Ḡ·r_t^α is a constant)

``∂L_grad/∂w`` is written to ``w.grad``; the network receives ``∇ Σ_t w_t L_t`` with ``w``
detached. After each optimizer step the weights are renormalised to ``Σ_t w_t = m`` (done
in place at the start of the next step, which is the same thing: the renormalised value is what
every later computation sees). ``L(0)`` is the loss of the first step.

Missing tasks (a step without some tasks' losses, ``P`` the present ones): the step is
GradNorm on ``P``: ``Ḡ`` and ``r_t`` are taken over ``P``, the network receives
``∇ Σ_{t∈P} w_t L_t``, and ``∂L_grad/∂w`` is exactly 0 in the absent entries. ``L_t(0)`` is the
loss of the first step *that had task t* (NaN until then). The renormalisation that follows
this step's update rescales the present weights only, to ``Σ_{t∈P} w_t = m − Σ_{t∉P} w_t``:
the absent weights are left as they are and ``Σ_t w = m`` still holds (the paper's constraint;
it is applied at the start of the next step, as above, for the tasks of the step that was
updated: ``renorm_mask`` in the state). Should the absent weights alone reach ``m`` (possible
only if an optimizer moved them, e.g. momentum), the renormalisation is over every task, with
a warning.

Shapes: ``L`` ``[m]``; ``w`` ``[m]``; layer norms ``[m]``.

Cost at the parameters: the Balancer takes ``‖∇_W L_t‖`` with one backward per task restricted
to ``W`` (each through its own head), or — when ``W`` is a Linear layer's parameters and
``N (d_in + m d_out) < 0.7 m d_in d_out`` (``N`` rows of its input) — from the layer-wise
identity ``‖δ_tᵀ a‖² = ⟨(a aᵀ) δ_t, δ_t⟩`` (:mod:`mtlbal.engine.layerwise`: ``δ_t`` the per-task
gradients at the layer's output, ``a`` its input), which forms no per-task weight gradient. Both
are exact.

Example:
    >>> import torch
    >>> gn = GradNorm(num_tasks=3)
    >>> gn(torch.tensor([1.0, 2.0, 3.0]))
    tensor([1., 1., 1.])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlbal.step import Need
from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["GradNorm", "gradnorm_loss"]


def gradnorm_loss(
    w: Tensor, layer_norms: Tensor, losses: Tensor, initial_losses: Tensor, alpha: float
) -> Tensor:
    """``L_grad = Σ_t |w_t n_t − Ḡ r_t^α|`` with ``Ḡ`` and ``r`` treated as constants.

    Args:
        w: ``[m]`` task weights (the gradient flows to them).
        layer_norms: ``[m]`` ``‖∇_W L_t‖`` (detached).
        losses: ``[m]`` current losses; ``initial_losses``: ``[m]`` ``L(0)``.
        alpha: the asymmetry ``α``.
    """
    g = w * layer_norms
    g_bar = g.detach().mean()
    ratio = losses.detach() / initial_losses.clamp_min(torch.finfo(losses.dtype).tiny)
    r = ratio / ratio.mean()
    target = (g_bar * r.pow(alpha)).detach()
    return (g - target).abs().sum()


class GradNorm(LossWeighting):
    """Gradient normalisation of task weights.

    Args:
        num_tasks: number of tasks ``m``.
        alpha: asymmetry ``α`` (paper: 1.5 on NYUv2; 0 equalises the gradient norms).
        layer: the parameters ``W`` (a module or tensors) where norms are measured. Default:
            the last module of the shared part that has parameters (in registration order).
            With a cut point (``Balancer(at=module)``) the norms are measured at the shared
            representation instead (``‖∇_z L_t‖``), the representation form of GradNorm.
        min_weight: positive floor applied before renormalisation.

    The weights are ``parameters()`` of the Balancer: give them to an optimizer (the paper
    leaves the learning rate open; both public re-implementations use the model's optimizer),
    or let :func:`mtlbal.wrap` step them.
    """

    needs = frozenset({Need.LAYER_NORMS})
    initial_losses: Tensor | None
    renorm_mask: Tensor | None
    supports_missing_tasks = True

    def __init__(
        self,
        num_tasks: int,
        *,
        alpha: float = 1.5,
        layer: nn.Module | Sequence[Tensor] | None = None,
        min_weight: float = 1e-6,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        self.num_tasks = num_tasks
        self._m = num_tasks
        self.alpha = float(alpha)
        self.min_weight = float(min_weight)
        self.weights = nn.Parameter(torch.ones(num_tasks))
        self.add_state("initial_losses", None)
        # the tasks whose weights the last step updated, when it lacked some (None: all)
        self.add_state("renorm_mask", None)
        self._layer: list[Tensor] = []
        if layer is not None:
            self._layer = (
                [p for p in layer.parameters() if p.requires_grad]
                if isinstance(layer, nn.Module)
                else list(layer)
            )
            if not self._layer:
                raise ValueError("GradNorm layer has no parameter that requires grad")

    # the layer is a module or tensors of the model, not configuration data
    repr_omits = ("layer",)

    def hparams(self) -> dict[str, object]:
        return {"num_tasks": self.num_tasks, "alpha": self.alpha, "min_weight": self.min_weight}

    def bind(self, shared_params: list[Tensor], at_module: object | None) -> None:
        if self._layer:
            return
        modules = at_module if isinstance(at_module, list) else []
        last: list[Tensor] = []
        for root in modules:
            for mod in root.modules():
                own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
                if own:
                    last = own
        if not last:
            if not shared_params:
                raise ValueError("GradNorm needs a layer: pass layer=... or shared modules")
            last = [shared_params[-1]]
        self._layer = last

    def grad_norm_params(self) -> list[Tensor]:
        return self._layer

    def _renormalize(self) -> None:
        # replaced, not changed in place (the step is a transaction: a refused step restores
        # the previous tensor)
        with torch.no_grad():
            mask = self.renorm_mask
            if mask is not None:
                mask = mask.to(self.weights.device)
                w = self.weights.clamp_min(self.min_weight)
                target = self._m - torch.where(mask, 0.0, self.weights).sum()
                if bool(target > 0):  # one host read, after missing-task steps only
                    scaled = w * (target / torch.where(mask, w, 0.0).sum())
                    self.weights.data = torch.where(mask, scaled, self.weights)
                    self.renorm_mask = None
                    return
                warnings.warn(
                    "GradNorm: the weights of the tasks absent from the last step sum to "
                    f"{float(self._m - target)!r} ≥ m = {self._m} (moved by the optimizer): "
                    "renormalising every weight",
                    stacklevel=3,
                )
                self.renorm_mask = None
            w = self.weights.clamp_min(self.min_weight)
            self.weights.data = w * (self._m / w.sum())

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        if ctx.layer_grad_norms is None:
            raise RuntimeError("GradNorm needs the layer gradient norms from the Balancer")
        self._renormalize()
        present = ctx.present
        if present is None:
            if self.initial_losses is None:
                self.initial_losses = losses.detach().clone()
            else:
                # a task first seen now (after missing-task steps: NaN): its L(0) is this loss
                init = self.initial_losses.to(losses.device)
                self.initial_losses = torch.where(init.isnan(), losses.detach(), init)
            initial = self.initial_losses
            w: Tensor = self.weights
        else:
            idx = torch.tensor(present, device=losses.device)
            # L(0) per task: its loss at the first step that had it (NaN until then)
            first = (
                torch.full((self._m,), float("nan"), dtype=losses.dtype, device=losses.device)
                if self.initial_losses is None
                else self.initial_losses.to(losses.device)
            )
            mine = first[idx]
            self.initial_losses = first.index_put(
                (idx,), torch.where(mine.isnan(), losses.detach(), mine)
            )
            initial = self.initial_losses[idx]
            w = self.weights[idx.to(self.weights.device)]
            mask = torch.zeros(self._m, dtype=torch.bool, device=self.weights.device)
            self.renorm_mask = mask.index_fill(0, idx.to(mask.device), True)
        lg = gradnorm_loss(
            w.to(losses.dtype),
            ctx.layer_grad_norms.to(losses.dtype),
            losses,
            initial.to(losses.dtype),
            self.alpha,
        )
        (grad_w,) = torch.autograd.grad(lg, self.weights)
        wd = w.detach().to(losses.dtype, copy=True)
        # ∇_w of the GradNorm loss, written to w.grad by the Balancer's commit stage
        return WeightedLosses(wd * losses, wd, param_grads=[(self.weights, grad_w.detach())])

    def current_weights(self, losses: Tensor) -> Tensor:
        w = self.weights.detach().clamp_min(self.min_weight)
        return (w * (self._m / w.sum())).to(losses.dtype)

    def reset(self) -> None:
        super().reset()
        with torch.no_grad():
            self.weights.fill_(1.0)
