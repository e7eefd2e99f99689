"""Sum — equal weighting of the task gradients, ``d = Σ_t g_t = Jᵀ 1``.

The gradient of ``Σ_t L_t`` at the shared part: the baseline every other aggregator is scaled
against (see the "Scale" section of the concepts page). TorchJD's ``Sum`` is the same.
``Mean`` is the same method with ``reduction="mean"`` (``d = (1/m) Σ_t g_t``); both names exist
so that a user switching from TorchJD finds the one they used, and ``Sum(reduction="mean")``
equals ``Mean()``.

Cost: as an aggregator it asks the Balancer for the per-task gradients (``Need.GRAMIAN``), which
a plain loss-level ``Balancer(trunk)`` (no aggregator: one backward of ``Σ_t L_t``) does not
form. Use it for comparisons, diagnostics and composition (``CRMOGM`` over it is a no-op), not
to save compute. The heads get their raw gradients, as with every aggregator.

Properties: permutation equivariant, positively homogeneous of degree 1, no state, no host sync.

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> Sum()(J)
    tensor([0., 1.])
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction

__all__ = ["Sum", "sum_weights"]


def sum_weights(gramian: Tensor) -> Tensor:
    """Weights ``1`` (``[m]``, float64, on the Gramian's device): the update is ``Σ_t g_t``."""
    return torch.ones(gramian.shape[0], dtype=torch.float64, device=gramian.device)


class Sum(GramianAggregator):
    """Equal weights: ``Σ_t g_t`` (``reduction="mean"``: their mean).

    Args:
        reduction: ``"sum"`` (default: weights 1) or ``"mean"`` (weights ``1/m``, = ``Mean()``).
    """

    homogeneity = 1

    def __init__(self, *, reduction: Reduction = "sum") -> None:
        super().__init__(reduction)

    def hparams(self) -> dict[str, object]:
        return {"reduction": self.reduction}

    def _weights(self, gramian: Tensor) -> Tensor:
        return sum_weights(gramian) * self._scale(gramian.shape[0])
