"""COSMOS scalarization (Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep
Multi-Objective Learning", ICDM 2021, arXiv:2103.13392), as TorchJD 0.18's
``torchjd.scalarization.COSMOS``.

With a preference vector ``r`` (``[m]``, on the simplex in the paper) and a penalty ``λ ≥ 0``,

    S(L) = rᵀL − λ · cos(r, L),        cos(r, L) = rᵀL / (‖r‖ ‖L‖),

a linear scalarization that also rewards aligning the loss vector with the preference ray. Its
gradient weights every task gradient by

    w = ∂S/∂L = r − λ · ( r / (‖r‖ ‖L‖) − (rᵀL) L / (‖r‖ ‖L‖³) ),

so ``∇S = Σ_t w_t ∇L_t``. The objectives handed to the Balancer are ``ℓ_t = w_t L_t + c``
(``w`` and the constant ``c = (S − wᵀL)/m`` detached): their sum is ``S`` in value, their
gradients are ``w_t ∇L_t`` (any gradient aggregator sees task ``t``'s share of ``∇S``).

Defaults: ``λ`` has none (the paper uses 0.01 to 8 depending on the data set); the preference
defaults to the centre of the simplex, ``r = 1/m`` (the mean of the paper's Dirichlet(1)
draws), so equal losses give the gradient of the *mean* loss (``cos = 1`` is a maximum there:
its gradient vanishes). The full method also feeds ``r`` to the network and draws a new ``r``
every step; that is the model's business: this class is the objective for one fixed ``r``
(build one per preference, or call :func:`cosmos_weights`).

Domain: ``cos(r, L)`` is undefined at ``L = 0``; a step whose losses are all 0 is refused
naming the tasks (through the Balancer's one host sync, no read here). TorchJD's
``cosine_similarity`` clamps the norm product at 1e-8 instead, which only differs there.

The weights are computed in float64 (``m`` numbers) and returned in the losses' dtype.

Shapes: ``L`` ``[m]`` → weights ``[m]``. No state, no host sync.

Example:
    >>> import torch
    >>> cosmos = COSMOS(lambda_=1.0, preference=[0.5, 0.5])
    >>> cosmos(torch.tensor([1.0, 1.0]))  # on the preference ray: w = r
    tensor([0.5000, 0.5000])
    >>> cosmos(torch.tensor([1.0, 3.0]))  # the larger loss is pushed toward the ray
    tensor([0.3658, 0.5447])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["COSMOS", "cosmos_weights"]


def cosmos_weights(losses: Tensor, preference: Tensor, lambda_: float) -> tuple[Tensor, Tensor]:
    """``(S, w)``: the COSMOS scalarization ``rᵀL − λ cos(r, L)`` (a scalar) and its gradient
    ``∂S/∂L`` (``[m]``), for losses and preference ``[m]`` (closed form, no autograd)."""
    r = preference.to(device=losses.device, dtype=losses.dtype)
    dot = (r * losses).sum()
    nr = torch.linalg.vector_norm(r)
    nl = torch.linalg.vector_norm(losses)
    denom = nr * nl
    cos = dot / denom
    dcos = r / denom - dot * losses / (denom * nl * nl)
    return dot - lambda_ * cos, r - lambda_ * dcos


class COSMOS(LossWeighting):
    """COSMOS: a preference-weighted sum penalised by the cosine to the preference ray.

    Args:
        lambda_: ``λ ≥ 0``, the cosine penalty (0: plain linear scalarization ``rᵀL``).
        preference: ``r`` (``[m]``, non-negative, not all 0); ``None``: ``1/m`` each.
        num_tasks: optional; checked against the preference and the number of losses.
    """

    preference: Tensor | None

    def __init__(
        self,
        lambda_: float,
        preference: Tensor | Sequence[float] | None = None,
        *,
        num_tasks: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(lambda_, (int, float)) or isinstance(lambda_, bool) or lambda_ < 0:
            raise ValueError(f"lambda_ must be a number ≥ 0, got {lambda_!r}")
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        self.lambda_ = lambda_
        self.num_tasks = num_tasks
        pref = _preference(preference, num_tasks, "COSMOS")
        self.register_buffer("preference", pref, persistent=False)

    def hparams(self) -> dict[str, object]:
        pref = self.preference
        return {
            "lambda_": self.lambda_,
            "preference": None if pref is None else [float(v) for v in pref.tolist()],
            "num_tasks": self.num_tasks,
        }

    def _pref(self, losses: Tensor) -> Tensor:
        m = losses.shape[0]
        if self.num_tasks is not None and m != self.num_tasks:
            raise ValueError(f"COSMOS was built for {self.num_tasks} tasks, got {m} losses")
        if self.preference is None:
            return torch.full_like(losses, 1.0 / m).detach()
        if self.preference.shape[0] != m:
            raise ValueError(
                f"COSMOS has a preference of {self.preference.shape[0]} entries, got {m} losses"
            )
        return self.preference.to(device=losses.device, dtype=losses.dtype)

    def _solve(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        work = _wide(raw)  # float64: m numbers, no round-off worth discussing
        value, w = cosmos_weights(work, self._pref(work), float(self.lambda_))
        return value.to(raw.dtype), w.to(raw.dtype)

    def current_weights(self, losses: Tensor) -> Tensor:
        return self._solve(losses.detach())[1]

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        raw = losses.detach()
        value, w = self._solve(raw)
        m = losses.shape[0]
        shift = (value - (w * raw).sum()) / m
        ok = (raw != 0).any().expand(m)
        what = "COSMOS takes cos(r, L), undefined when every loss is 0"
        return WeightedLosses(w * losses + shift, w, domain=(ok, what))


def _wide(x: Tensor) -> Tensor:
    """``x`` in float64 (float32 on MPS, which has no float64)."""
    return x.to(torch.float32 if x.device.type == "mps" else torch.float64)


def _preference(pref: Tensor | Sequence[float] | None, m: int | None, who: str) -> Tensor | None:
    """Validate a preference vector (``None`` stays ``None``) and store it at the default dtype
    or its own, whichever is wider."""
    if pref is None:
        return None
    given = torch.as_tensor(pref).detach()
    if given.dim() != 1 or given.shape[0] < 1:
        raise ValueError(
            f"{who}: preference must be a non-empty vector [m], got {tuple(given.shape)}"
        )
    if m is not None and given.shape[0] != m:
        raise ValueError(f"{who}: preference has {given.shape[0]} entries for {m} tasks")
    dtype = torch.get_default_dtype()
    if given.is_floating_point():
        dtype = torch.promote_types(given.dtype, dtype)
    out = given.to(dtype=dtype, device="cpu").clone()
    if not bool(torch.isfinite(out).all()) or bool((out < 0).any()) or not bool((out > 0).any()):
        raise ValueError(f"{who}: preference must be finite, ≥ 0 and not all 0, got {out.tolist()}")
    return out
