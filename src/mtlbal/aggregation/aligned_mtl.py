"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning",
CVPR 2023, arXiv:2305.19000); Aligned-MTL-UB at a cut point.

The task gradients ``J`` (``[m, n]``, rows ``g_t``) are replaced by the nearest matrix whose rows
are orthogonal with equal norms ``σ`` (an orthogonal Procrustes problem),
``Ĵ = σ U Vᵀ`` for the SVD ``J = U Σ Vᵀ`` (task space ``U``), and the aligned rows are combined
with pre-defined task weights ``w``. In task space, with the Gramian ``G = J Jᵀ = V_G Λ V_Gᵀ``
(eigenvalues sorted descending, the ``R`` eigenpairs above the rank threshold kept):

    B = σ · V_R Λ_R^{-1/2} V_Rᵀ        (``[m, m]``, symmetric)
    α = B w                             (``[m]``),   update ``d = Jᵀ α = Ĵᵀ w``

with the scale ``σ`` = ``√λ_R`` (``scale_mode="min"``, the paper's and the official code's
default: the smallest *retained* singular value), ``√median(λ_1..λ_R)`` (``"median"``; the
lower median for an even ``R``, as ``torch.median``) or ``√mean(λ_1..λ_R)`` (``"rmse"``).

Numerics follow the official code (SamsungLabs/MTL ``ProcrustesSolver``): the eigendecomposition
runs in float64, and the rank threshold is ``tol = max(λ) · m · eps`` with ``eps`` the *float32*
machine epsilon (``torch.finfo().eps`` there) whatever the dtype. TorchJD uses the eps of the
Gramian's dtype instead (≈1e-16 in float64), so it keeps near-collinear directions that the
official code drops; on well-conditioned Gramians the two agree. In ``"min"`` mode every
eigenvalue of ``B`` is ``√(λ_R/λ_i) ≤ 1``.

Degenerate Gramians give a defined, finite result: with rank 0 (every gradient zero) ``B = I``
(so ``α = w``, as TorchJD; the update ``Jᵀ α`` is then zero anyway); with rank ``R < m``
``α`` lies in the span of the retained eigenvectors. The computation is branch-free on tensor
values (masks instead of truncation); its one host sync is inside ``torch.linalg.eigh``, which
checks the solver's status on the host when the Gramian is on an accelerator (there is no
``eigh_ex``). ``host_sync`` is therefore ``True``; on the CPU there is none.

Scale convention: the official code sums the aligned rows (``w = 1``), so with
``reduction="sum"`` (default) and no ``weights`` this is the official update. TorchJD's
``AlignedMTL`` uses the preference vector ``w = 1/m`` (``m`` times smaller); get it with
``reduction="mean"``. Custom ``weights`` are multiplied by ``1`` (sum) or ``1/m`` (mean).

Aligned-MTL-UB: with ``Balancer(at=module)`` the Gramian is that of the per-task gradients of
the shared representation, flattened over the whole batch (per-sample entries kept, as the
official ``AlignedMTLUBBalancer``; LibMTL sums over the batch first, which changes ``G``).

Example:
    >>> import torch
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> AlignedMTL()(J)  # rows rescaled to the smaller norm, then summed
    tensor([1., 1.])
    >>> AlignedMTL(reduction="mean")(J)
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction

__all__ = ["AlignedMTL", "aligned_mtl_balance", "aligned_mtl_weights"]

ScaleMode = Literal["min", "median", "rmse"]

_EPS32 = float(torch.finfo(torch.float32).eps)


def aligned_mtl_balance(gramian: Tensor, scale_mode: ScaleMode = "min") -> Tensor:
    """The balance matrix ``B`` (``[m, m]``, float64) of Aligned-MTL for the Gramian ``[m, m]``.

    ``B = σ V_R Λ_R^{-1/2} V_Rᵀ`` over the eigenpairs with ``λ > max(λ)·m·eps_float32``;
    ``B = I`` when no eigenvalue passes (all-zero Gramian).
    """
    if scale_mode not in ("min", "median", "rmse"):
        raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square Gramian [m, m], got {tuple(gramian.shape)}")
    g = gramian.detach().to(torch.float64)
    g = 0.5 * (g + g.T)
    m = g.shape[0]
    lam, vec = torch.linalg.eigh(g)  # ascending
    lam = lam.flip(0)  # descending, as the official code sorts
    vec = vec.flip(1)
    tol = lam[0] * m * _EPS32
    keep = lam > tol  # a prefix of the descending order
    rank = keep.sum()
    has_rank = rank > 0
    rank_f = rank.to(g.dtype).clamp_min(1.0)
    safe = torch.where(keep, lam, torch.ones_like(lam))
    inv_sqrt = torch.where(keep, safe.rsqrt(), torch.zeros_like(lam))
    if scale_mode == "min":
        idx = (rank - 1).clamp_min(0)
        scale = lam.gather(0, idx.reshape(1)).reshape(())
    elif scale_mode == "median":
        # lower median of the R kept values (ascending index (R-1)//2) = descending R-1-(R-1)//2
        r1 = (rank - 1).clamp_min(0)
        idx = r1 - torch.div(r1, 2, rounding_mode="floor")
        scale = lam.gather(0, idx.reshape(1)).reshape(())
    else:
        scale = torch.where(keep, lam, torch.zeros_like(lam)).sum() / rank_f
    sigma = torch.where(has_rank, scale.clamp_min(0.0), torch.zeros_like(scale)).sqrt()
    b = sigma * (vec * inv_sqrt) @ vec.T
    eye = torch.eye(m, dtype=g.dtype, device=g.device)
    return torch.where(has_rank, b, eye)


def aligned_mtl_weights(
    gramian: Tensor, weights: Tensor | None = None, scale_mode: ScaleMode = "min"
) -> Tensor:
    """Aligned-MTL coefficients ``α = B w`` (``[m]``, float64): the update is ``Jᵀ α``.

    Args:
        gramian: ``G = J Jᵀ`` ``[m, m]``.
        weights: the pre-defined task weights ``w`` ``[m]`` (default ones, the official code).
        scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.
    """
    b = aligned_mtl_balance(gramian, scale_mode)
    m = b.shape[0]
    if weights is None:
        w = torch.ones(m, dtype=b.dtype, device=b.device)
    else:
        if weights.shape != (m,):
            raise ValueError(f"weights must have shape [{m}], got {tuple(weights.shape)}")
        w = weights.detach().to(device=b.device, dtype=b.dtype)
    return b @ w


class AlignedMTL(GramianAggregator):
    """Aligned-MTL: align the task gradients to a condition number of 1, then weight them.

    Args:
        weights: pre-defined task weights ``w`` (``[m]``, a sequence or tensor); default all
            ones (the official code). Their length must match the number of tasks.
        scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``; see the module docstring.
        reduction: ``"sum"`` (default; ``w`` as given, the official scale) or ``"mean"``
            (``w/m``; with default weights this is TorchJD's ``AlignedMTL``).

    Stateless. Use at ``"params"`` (Aligned-MTL) or at a cut point (Aligned-MTL-UB). One host
    sync per step on accelerators (``torch.linalg.eigh``'s status check).
    """

    # stateless in m: a missing-task step is the method on the present tasks' Gramian
    supports_missing_tasks = True

    host_sync = True
    # B = σ V Λ^{-1/2} Vᵀ has degree 0 (σ ∝ c, Λ^{-1/2} ∝ 1/c; the rank threshold is relative),
    # so d = Jᵀ B w has degree 1
    homogeneity = 1

    def __init__(
        self,
        *,
        weights: Sequence[float] | Tensor | None = None,
        scale_mode: ScaleMode = "min",
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
        self.scale_mode: ScaleMode = scale_mode
        if weights is None:
            self.task_weights: Tensor | None = None
        else:
            w = torch.as_tensor(weights, dtype=torch.float64).detach().clone()
            if w.dim() != 1 or w.numel() == 0:
                raise ValueError(f"weights must be a non-empty vector, got shape {tuple(w.shape)}")
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"weights must be finite, got {w.tolist()}")
            self.task_weights = w

    def hparams(self) -> dict[str, object]:
        return {
            "weights": None if self.task_weights is None else self.task_weights.tolist(),
            "scale_mode": self.scale_mode,
            "reduction": self.reduction,
        }

    def _weights(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        w = self.task_weights
        if w is not None and w.numel() != m:
            raise ValueError(f"AlignedMTL was given {w.numel()} task weights for {m} tasks")
        return aligned_mtl_weights(gramian, w, self.scale_mode) * self._scale(m)
