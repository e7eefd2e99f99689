"""TrimmedMean — coordinate-wise trimmed mean (Yin, Chen, Ramchandran & Bartlett,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018,
arXiv:1803.01498).

For every coordinate ``k`` of the shared part, sort the ``m`` values ``J[:, k]``, drop the
``b = trim_number`` largest and the ``b`` smallest, and average the ``m − 2b`` left:

    d_k = 1/(m − 2b) · Σ_{i = b+1}^{m−b} J_(i),k        (J_(i),k: the i-th smallest)

It needs the Jacobian (the selection is per coordinate, not a weighting of rows), so under a
Balancer the engine forms ``J`` (at the parameters or at a cut point; not at a cut point under
DDP, where only the Gramian is gathered).

Scale: the paper's output is a mean (TorchJD's convention, ``reduction="mean"``); the default
``reduction="sum"`` multiplies by ``m``, so that ``m`` identical gradients give ``Σ_t g_t``.
``trim_number = 0`` is ``Mean``/``Sum``. With ``m = 2b + 1`` it is the coordinate-wise median.

Requirements: ``m ≥ 2b + 1``; otherwise a ``ValueError``.

Computation: one sort along the tasks; for ``b = 1`` none: the column minima and maxima, the
sum of the values strictly between them plus the kept copies of the two extremes (ties handled
exactly; no ``Σ − extremes`` subtraction, which a huge outlier would cancel).

Properties: permutation equivariant, positively homogeneous of degree 1 (sorting commutes with
a positive scale), no state, no host sync. ``StepInfo.weights`` reports the loss weights (no
per-task weight exists).

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, -1.0], [2.0, 0.0], [30.0, 5.0]])
    >>> TrimmedMean(trim_number=1, reduction="mean")(J)
    tensor([2., 0.])
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbal.aggregation.base import Aggregator, Reduction
from mtlbal.step import StepContext

__all__ = ["TrimmedMean", "trimmed_mean"]


def trimmed_mean(jacobian: Tensor, trim_number: int) -> Tensor:
    """The coordinate-wise mean of ``J`` (``[m, n]``) without the ``trim_number`` largest and
    smallest values of each column; ``[n]``, in ``J``'s dtype."""
    m = jacobian.shape[0]
    if m < 2 * trim_number + 1:
        raise ValueError(
            f"TrimmedMean: {m} tasks with trim_number={trim_number}: needs at least "
            f"2 * trim_number + 1 = {2 * trim_number + 1} tasks"
        )
    b = trim_number
    if b == 0:
        return jacobian.mean(dim=0)
    if b > 1:
        return jacobian.sort(dim=0).values[b : m - b].mean(dim=0)
    # b = 1 without a sort: the column minima and maxima, the values strictly between them
    # summed, and the kept copies of the two extremes added (ties handled exactly; no
    # Σ-all-minus-extremes subtraction, which a huge outlier would cancel)
    lo, hi = jacobian.amin(dim=0), jacobian.amax(dim=0)
    at_lo, at_hi = jacobian == lo, jacobian == hi
    total = torch.where(at_lo | at_hi, 0.0, jacobian).sum(dim=0)
    n_lo = at_lo.sum(dim=0) - 1  # kept copies of the minimum (beyond the dropped one)
    n_hi = at_hi.sum(dim=0) - 1
    total = total + n_lo.to(total.dtype) * lo + n_hi.to(total.dtype) * hi
    # lo == hi: a constant column (the counts above would count it twice)
    return torch.where(lo == hi, lo, total / (m - 2))


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean of the task gradients.

    Args:
        trim_number: ``b``, how many of the largest and of the smallest values are dropped in
            every coordinate (``2b`` in all).
        reduction: ``"sum"`` (default, ``m`` times the trimmed mean) or ``"mean"`` (the paper's
            and TorchJD's).
    """

    requires = "jacobian"
    homogeneity = 1
    # a robust aggregator's tolerance is a count out of m: a step with fewer tasks is refused
    supports_missing_tasks = False
    missing_tasks_note = (
        "its trim_number is set for a fixed number of tasks "
        "(and needs at least 2 * trim_number + 1 of them)"
    )

    def __init__(self, trim_number: int, *, reduction: Reduction = "sum") -> None:
        super().__init__(reduction)
        if isinstance(trim_number, bool) or not isinstance(trim_number, int) or trim_number < 0:
            raise ValueError(
                f"TrimmedMean: trim_number must be an integer ≥ 0, got {trim_number!r}"
            )
        self.trim_number = trim_number

    def hparams(self) -> dict[str, object]:
        return {"trim_number": self.trim_number, "reduction": self.reduction}

    def aggregate_jacobian(self, jacobian: Tensor, ctx: StepContext | None = None) -> Tensor:
        m = jacobian.shape[0]
        return trimmed_mean(jacobian, self.trim_number) * (m * self._scale(m))
