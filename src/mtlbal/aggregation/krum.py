"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017, arXiv:1703.02757).

A robust aggregator from federated learning: with ``f = n_byzantine`` possibly adversarial rows
among ``m``, each row ``i`` gets the score

    s(i) = Σ_{j ∈ N(i)} ‖g_i − g_j‖

where ``N(i)`` are the ``m − f − 2`` rows closest to ``g_i`` (``i`` excluded). Krum returns the
row of smallest score; Multi-Krum (``n_selected = k``) returns the mean of the ``k`` rows of
smallest scores. Distances come from the Gramian, ``‖g_i − g_j‖² = G_ii + G_jj − 2 G_ij``, so
the engine never builds ``J``.

Scale: the paper's output is a mean of the selected rows (weights ``1/k``, TorchJD's
convention, ``reduction="mean"``); the default ``reduction="sum"`` multiplies by ``m``, so that
``m`` identical gradients give ``Σ_t g_t``.

Ties (where this differs from TorchJD): scores are often exactly equal — with ``m − f − 2 = 1``
two mutual nearest neighbours always have the same score — and the paper does not say which row
to take. TorchJD takes whichever ``torch.topk`` returns first (it depends on the task order).
Here the rows tied at the selection boundary *share* the remaining selections equally, so the
result is permutation equivariant and identical gradients get equal weights. Scores count as
tied within ``m_c · √(8 ε ‖G‖_diag)`` (``m_c = m − f − 2``, ``ε`` the float64 machine epsilon):
the resolution of distances computed from a Gramian (cancellation in ``G_ii + G_jj − 2G_ij``);
it scales with the gradients, so the method stays positively homogeneous. Without a tie at the
boundary the result equals TorchJD's (tests/unit/test_krum.py).

Requirements: ``m ≥ f + 3`` (at least one neighbour per score) and ``m ≥ k``; otherwise a
``ValueError``. The paper's robustness guarantee needs ``2f + 2 < m``; that is not enforced.

Properties: permutation equivariant, positively homogeneous of degree 1, no state, no host
sync (sorting and masks on the Gramian's device).

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [-5.0, 5.0], [8.0, -3.0]])
    >>> Krum(n_byzantine=1, reduction="mean").weights(J @ J.T)
    tensor([1., 0., 0., 0., 0.], dtype=torch.float64)
    >>> Krum(n_byzantine=2, reduction="mean").weights(J @ J.T)  # 0 and 1: mutual nearest, tied
    tensor([0.5000, 0.5000, 0.0000, 0.0000, 0.0000], dtype=torch.float64)
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction

__all__ = ["Krum", "krum_weights"]

_EPS64 = torch.finfo(torch.float64).eps


def krum_weights(gramian: Tensor, n_byzantine: int, n_selected: int = 1) -> Tensor:
    """Multi-Krum weights (``[m]``, float64, summing to 1: the mean of the selected rows).

    Rows tied at the selection boundary share the remaining selections equally (see the
    module docstring). Raises ``ValueError`` unless ``m ≥ n_byzantine + 3`` and
    ``m ≥ n_selected``.
    """
    g = gramian.to(torch.float64)
    m = g.shape[0]
    n_closest = m - n_byzantine - 2
    if n_closest < 1:
        raise ValueError(
            f"Krum: {m} tasks with n_byzantine={n_byzantine}: needs at least "
            f"n_byzantine + 3 = {n_byzantine + 3} tasks"
        )
    if n_selected > m:
        raise ValueError(f"Krum: n_selected={n_selected} is more than the {m} tasks")
    sq = g.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * g).clamp_min(0).sqrt()
    dist = dist + torch.diag(torch.full((m,), float("inf"), dtype=g.dtype, device=g.device))
    scores = dist.sort(dim=1).values[:, :n_closest].sum(1)
    tol = n_closest * (8 * _EPS64 * sq.max().clamp_min(0)).sqrt()
    boundary = scores.sort().values[n_selected - 1]
    below = scores < boundary - tol
    tied = (scores - boundary).abs() <= tol
    n_below = below.sum().to(g.dtype)
    share = (n_selected - n_below) / tied.sum().to(g.dtype)
    w = torch.where(below, 1.0, torch.where(tied, share, 0.0))
    return w / n_selected


class Krum(GramianAggregator):
    """(Multi-)Krum: the mean of the ``n_selected`` rows closest to their neighbours.

    Args:
        n_byzantine: ``f``, the number of rows that may be adversarial (``≥ 0``).
        n_selected: ``k``, how many rows are averaged (Multi-Krum; 1: Krum).
        reduction: ``"sum"`` (default, ``m`` times the mean of the selected rows) or ``"mean"``
            (the paper's and TorchJD's mean).
    """

    homogeneity = 1
    # a robust aggregator's tolerance is a count out of m: a step with fewer tasks is refused
    supports_missing_tasks = False
    missing_tasks_note = (
        "its n_byzantine tolerance is set for a fixed number of tasks "
        "(and needs at least n_byzantine + 3 of them)"
    )

    def __init__(
        self, n_byzantine: int, n_selected: int = 1, *, reduction: Reduction = "sum"
    ) -> None:
        super().__init__(reduction)
        if isinstance(n_byzantine, bool) or not isinstance(n_byzantine, int) or n_byzantine < 0:
            raise ValueError(f"Krum: n_byzantine must be an integer ≥ 0, got {n_byzantine!r}")
        if isinstance(n_selected, bool) or not isinstance(n_selected, int) or n_selected < 1:
            raise ValueError(f"Krum: n_selected must be an integer ≥ 1, got {n_selected!r}")
        self.n_byzantine = n_byzantine
        self.n_selected = n_selected

    def hparams(self) -> dict[str, object]:
        return {
            "n_byzantine": self.n_byzantine,
            "n_selected": self.n_selected,
            "reduction": self.reduction,
        }

    def _weights(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        w = krum_weights(gramian, self.n_byzantine, self.n_selected)
        return w * (m * self._scale(m))
