"""Mean — equal weighting of the task gradients, ``d = (1/m) Σ_t g_t``.

TorchJD's ``Mean`` (its default scale). This is :class:`~mtlbal.aggregation.Sum` with
``reduction="mean"`` as the default: ``Mean()`` equals ``Sum(reduction="mean")`` and
``Mean(reduction="sum")`` equals ``Sum()``. Like ``Sum``, it asks for the per-task gradients
(``Need.GRAMIAN``); a plain ``Balancer(trunk)`` forms the same shared update (times ``m``) with
one backward.

Properties: permutation equivariant, positively homogeneous of degree 1, no state, no host sync.

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> Mean()(J)
    tensor([0.0000, 0.5000])
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction

__all__ = ["Mean", "mean_weights"]


def mean_weights(gramian: Tensor) -> Tensor:
    """Weights ``1/m`` (``[m]``, float64, on the Gramian's device): the update is the mean."""
    m = gramian.shape[0]
    return torch.full((m,), 1.0 / m, dtype=torch.float64, device=gramian.device)


class Mean(GramianAggregator):
    """Equal weights ``1/m``: the mean of the task gradients.

    Args:
        reduction: ``"mean"`` (default here: weights ``1/m``) or ``"sum"`` (weights 1, = ``Sum()``).
    """

    homogeneity = 1

    def __init__(self, *, reduction: Reduction = "mean") -> None:
        super().__init__(reduction)

    def hparams(self) -> dict[str, object]:
        return {"reduction": self.reduction}

    def _weights(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        # mean_weights is the "mean" scale; _scale(m) is 1/m for "mean", so undo it once
        return mean_weights(gramian) * (m * self._scale(m))
