"""RLW — Random Loss Weighting (Lin et al., "Reasonable Effectiveness of Random Weighting",
TMLR 2022, arXiv:2111.10603).

Every step draws ``ε ~ N(0, I_m)`` and weights the losses with ``λ = softmax(ε)``:
``ℓ_t = λ_t · L_t``.

Scale (the libraries disagree): the paper, LibMTL and SamsungLabs use ``softmax(ε)`` (weights
sum to 1); nash-mtl and IGB use ``m·softmax(ε)`` (sum ``m``). ``reduction="sum"`` (default)
is ``m·softmax(ε)``: the expected weight of every task is 1, as with ``Σ_t L_t``;
``reduction="mean"`` is the paper's ``softmax(ε)``.

Missing tasks: the draw is over the present tasks only, ``ε ~ N(0, I_{m'})`` and
``λ = softmax(ε)`` (times ``m'`` for ``reduction="sum"``): the step is RLW on the ``m'`` tasks
that have a loss (the generator advances by ``m'`` draws).

Randomness: a CPU ``torch.Generator`` seeded by ``seed``; its state is saved in ``state_dict``,
so a resumed run draws the same weights. Skipped steps draw nothing. No host sync (the draw
is on the CPU and copied to the losses' device).

Example:
    >>> import torch
    >>> rlw = RLW(seed=0)
    >>> w = rlw.objectives(torch.tensor([1.0, 2.0, 3.0]), LossContext()).weights
    >>> round(float(w.sum()), 6)
    3.0
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["RLW", "rlw_weights"]


def rlw_weights(noise: Tensor, reduction: Literal["sum", "mean"] = "sum") -> Tensor:
    """``softmax(ε)``, times ``m`` for ``reduction="sum"``; ``noise`` is ``ε`` (``[m]``)."""
    w = torch.softmax(noise, dim=0)
    return w * noise.shape[0] if reduction == "sum" else w


class RLW(LossWeighting):
    """Random loss weights ``softmax(ε)``, ``ε ~ N(0, I)``, redrawn every step.

    Args:
        num_tasks: optional; checked against the number of losses when given.
        seed: generator seed (``None``: nondeterministic).
        reduction: ``"sum"`` (``m·softmax``, default) or ``"mean"`` (the paper's ``softmax``).
    """

    linear_in_losses = True
    supports_missing_tasks = True

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        seed: int | None = 0,
        reduction: Literal["sum", "mean"] = "sum",
    ) -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.num_tasks = num_tasks
        self.seed = seed
        self.reduction: Literal["sum", "mean"] = reduction
        self._gen = self.add_generator(seed)
        self._last: Tensor | None = None

    def hparams(self) -> dict[str, object]:
        return {"num_tasks": self.num_tasks, "seed": self.seed, "reduction": self.reduction}

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        noise = torch.randn(losses.shape[0], generator=self._gen, dtype=torch.float64)
        w = rlw_weights(noise, self.reduction).to(device=losses.device, dtype=losses.dtype)
        self._last = w
        return WeightedLosses(w * losses, w)

    def current_weights(self, losses: Tensor) -> Tensor:
        """The weights drawn at the last step (ones, or their sum-1 scale, before any)."""
        if self._last is not None and self._last.shape == losses.shape:
            return self._last.to(device=losses.device, dtype=losses.dtype)
        w = torch.ones_like(losses).detach()
        return w if self.reduction == "sum" else w / losses.shape[0]

    def reset_extra(self) -> None:
        self._last = None

    @property
    def is_stateful(self) -> bool:
        return False
