"""PBI — penalty-based boundary intersection (Zhang & Li, "MOEA/D: A Multiobjective
Evolutionary Algorithm Based on Decomposition", IEEE TEVC 2007, doi:10.1109/TEVC.2007.892759),
as TorchJD 0.18's ``torchjd.scalarization.PBI``.

With a preference direction ``ŵ = p / ‖p‖`` (``p`` ``[m]``, non-negative), a reference
(ideal) point ``z*`` (a lower bound on the losses, 0 by default) and ``f = L − z*``,

    d₁ = fᵀŵ,    d₂ = ‖f − d₁ ŵ‖,    S(L) = d₁ + θ d₂,

the distance travelled along the preference ray plus ``θ`` times the distance to it. As in
TorchJD, ``d₂ = sqrt(‖f − d₁ŵ‖² + 1e-12)``, so its gradient stays finite on the ray (where it
is exactly 0) and ``S`` moves by at most 1e-6 there. The task weights are

    w = ∂S/∂L = ŵ + θ (f − d₁ ŵ) / d₂,

and the objectives handed to the Balancer are ``ℓ_t = w_t L_t + c`` (``w`` and
``c = (S − wᵀL)/m`` detached): their sum is ``S``, their gradients ``w_t ∇L_t``. ``S`` is
homogeneous of degree 1 in ``f``, so ``wᵀf = S`` (up to the 1e-12).

Defaults: ``θ = 5`` (MOEA/D's experiments; too large or too small a ``θ`` worsens the result,
the paper notes). The class computes the weights in float64 (``m`` numbers): near the ray
``f − d₁ŵ`` is pure round-off, and in float32 that round-off (~1e-7 ``‖f‖``) is not small
against the 1e-6 floor of ``d₂``, so float32 weights there would be off by tens of percent.
The preference defaults to equal entries (``ŵ = 1/√m``): on the ray, equal
losses get the weight ``1/√m`` each (``∇S = ∇ Σ_t L_t / √m``). The preference and the
reference are configuration, fixed for the run (to sweep a Pareto front, build one PBI per
preference or call :func:`pbi_weights`).

Domain: the reference point is a lower bound, so a loss below its ``z*_t`` (below 0 without a
reference) makes the step refused naming the task (through the Balancer's one host sync).
TorchJD does not check this.

Shapes: ``L`` ``[m]`` → weights ``[m]``. No state, no host sync.

Example:
    >>> import torch
    >>> pbi = PBI(theta=5.0)
    >>> pbi(torch.tensor([2.0, 2.0]))  # on the ray: w = ŵ
    tensor([0.7071, 0.7071])
    >>> w = pbi(torch.tensor([1.0, 3.0]))  # off the ray: the larger loss is pushed down
    >>> bool(w[1] > 0 > w[0])
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses
from mtlbal.weighting.cosmos import _preference, _wide

__all__ = ["PBI", "pbi_weights"]

_EPS = 1e-12


def pbi_weights(
    losses: Tensor,
    preference: Tensor,
    theta: float,
    reference: Tensor | None = None,
    eps: float = _EPS,
) -> tuple[Tensor, Tensor]:
    """``(S, w)``: the PBI scalarization ``d₁ + θ d₂`` (a scalar) and its gradient ``∂S/∂L``
    (``[m]``) for losses, preference and reference ``[m]`` (closed form, no autograd)."""
    f = losses if reference is None else losses - reference.to(losses)
    p = preference.to(device=losses.device, dtype=losses.dtype)
    u = p / torch.linalg.vector_norm(p)
    d1 = (f * u).sum()
    perp = f - d1 * u
    d2 = ((perp * perp).sum() + eps).sqrt()
    return d1 + theta * d2, u + theta * perp / d2


class PBI(LossWeighting):
    """Penalty-based boundary intersection with a fixed preference direction.

    Args:
        theta: ``θ ≥ 0``, the penalty on the distance to the preference ray (5).
        preference: ``p`` (``[m]``, non-negative, not all 0); ``None``: equal entries.
        reference: ``z*`` (``[m]``), a lower bound on the losses; ``None``: the origin.
        num_tasks: optional; checked against the vectors and the number of losses.
    """

    preference: Tensor | None
    reference: Tensor | None

    def __init__(
        self,
        theta: float = 5.0,
        preference: Tensor | Sequence[float] | None = None,
        reference: Tensor | Sequence[float] | None = None,
        *,
        num_tasks: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta < 0:
            raise ValueError(f"theta must be a number ≥ 0, got {theta!r}")
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        self.theta = theta
        self.num_tasks = num_tasks
        self.register_buffer("preference", _preference(preference, num_tasks, "PBI"), False)
        ref = None
        if reference is not None:
            given = torch.as_tensor(reference).detach()
            if given.dim() != 1:
                raise ValueError(f"PBI: reference must be a vector [m], got {tuple(given.shape)}")
            n = (
                num_tasks
                if num_tasks is not None
                else (None if self.preference is None else self.preference.shape[0])
            )
            if n is not None and given.shape[0] != n:
                raise ValueError(f"PBI: reference has {given.shape[0]} entries for {n} tasks")
            dtype = torch.get_default_dtype()
            if given.is_floating_point():
                dtype = torch.promote_types(given.dtype, dtype)
            ref = given.to(dtype=dtype, device="cpu").clone()
            if not bool(torch.isfinite(ref).all()):
                raise ValueError(f"PBI: reference must be finite, got {ref.tolist()}")
        self.register_buffer("reference", ref, persistent=False)

    def hparams(self) -> dict[str, object]:
        def plain(t: Tensor | None) -> list[float] | None:
            return None if t is None else [float(v) for v in t.tolist()]

        return {
            "theta": self.theta,
            "preference": plain(self.preference),
            "reference": plain(self.reference),
            "num_tasks": self.num_tasks,
        }

    def _vectors(self, losses: Tensor) -> tuple[Tensor, Tensor | None]:
        m = losses.shape[0]
        if self.num_tasks is not None and m != self.num_tasks:
            raise ValueError(f"PBI was built for {self.num_tasks} tasks, got {m} losses")
        for name, t in (("preference", self.preference), ("reference", self.reference)):
            if t is not None and t.shape[0] != m:
                raise ValueError(f"PBI has a {name} of {t.shape[0]} entries, got {m} losses")
        pref = torch.ones_like(losses) if self.preference is None else self.preference
        ref = self.reference
        return pref.to(losses), None if ref is None else ref.to(losses)

    def _solve(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        # in float64: near the ray, f − d₁ŵ is round-off, and float32 round-off (~1e-7 ‖f‖)
        # is not small against the 1e-6 floor of d₂
        work = _wide(raw)
        pref, ref = self._vectors(work)
        value, w = pbi_weights(work, pref, float(self.theta), ref)
        return value.to(raw.dtype), w.to(raw.dtype), ref

    def current_weights(self, losses: Tensor) -> Tensor:
        return self._solve(losses.detach())[1]

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        raw = losses.detach()
        value, w, ref = self._solve(raw)
        shift = (value - (w * raw).sum()) / losses.shape[0]
        ok = raw >= (0.0 if ref is None else ref.to(raw.dtype))
        what = (
            "PBI measures the losses from its reference point z*, a lower bound on them "
            f"(z* = {'0' if ref is None else self.hparams()['reference']}); pass a lower reference"
        )
        return WeightedLosses(w * losses + shift, w, domain=(ok, what))
