"""ConFIG — conflict-free inverse gradients (Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free
Training of Physics Informed Neural Networks", ICLR 2025, arXiv:2408.11104).

The direction that has the same positive cosine with every task gradient, scaled by the sum of
the gradients' projections on it (the paper's Eq. 2, with its "projection length"):

    U = [g_1/‖g_1‖ … g_m/‖g_m‖]ᵀ            (zero rows stay zero)
    x = U⁺ w                                (w = 1, or a preference vector)
    u = x / ‖x‖,   d = (Σ_i ⟨g_i, u⟩) · u

For ``m ≤ n`` and linearly independent gradients ``U x = w`` holds exactly: every task sees the
same improvement rate ``⟨g_i, u⟩/‖g_i‖``, positive, so the update conflicts with none. With
dependent gradients ``x`` is the least-squares (minimum-norm) solution and that guarantee is
lost. Where ``w`` is orthogonal to the gradients' span (``g_2 = −g_1``) the exact ``x`` is 0
and so is ``d``; the references normalise the rounding residue of ``x`` instead and return an
arbitrary direction there (here ``x`` below ``max(m, n)·eps·‖U⁺‖‖w‖`` counts as 0).

Numerics: ``U`` and its pseudo-inverse are computed in float64. When the cosine matrix
``K = U Uᵀ`` (``[m, m]``) is well conditioned (``λ_min ≥ 1e-6 λ_max``, no singular value under
the cutoff), ``U⁺w = Uᵀ K⁻¹ w`` from one ``m × m`` eigendecomposition (``J Jᵀ`` is the only
``O(m² n)`` work); otherwise one thin SVD of ``U`` (singular values below ``rtol · σ_max``
dropped; ``rtol=None``: ``max(m, n) · eps(float64)``, the ``torch.linalg.pinv``/TorchJD
default). Pitfall of the references: TorchJD (``pinv``) and the
official ``conflictfree`` (``lstsq``, ``rcond = max(m, n)·eps``) work in the gradients' dtype; in
float32 with ``n ~ 10⁶`` parameters that cutoff is ``≈ 0.12 σ_max``, so the direction of two
gradients with cosine above ~0.97 is silently truncated to the rank-1 answer. For ``m = 2`` the
official operator uses a closed form (``ConFIG_update_double``) that gives the same direction.

Scale: ``d`` is already on the sum scale (identical gradients give ``Σ_t g_t``), as TorchJD's
``ConFIG`` (``reduction="sum"``, default); ``"mean"`` divides by ``m``. Homogeneity 1.

It needs the Jacobian (``U`` is row-normalised ``J``); under DDP only at the shared parameters
(a cut point's Jacobian is not gathered). Host sync: the SVD
(``torch.linalg.svd``) checks its convergence on the host on CUDA.

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> d = ConFIG()(J)
    >>> torch.allclose((J @ d) / J.norm(dim=1), ((J @ d) / J.norm(dim=1))[0].expand(2))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlbal.aggregation.base import Aggregator, Reduction
from mtlbal.step import StepContext

__all__ = ["ConFIG", "config_direction"]


def config_direction(
    jacobian: Tensor, pref: Tensor | None = None, *, rtol: float | None = None
) -> Tensor:
    """The ConFIG update ``d`` (``[n]``, float64, sum scale) of ``J`` (``[m, n]``).

    ``pref``: the weight vector ``w`` of ``U x = w`` (default ones). ``rtol``: relative cutoff of
    the pseudo-inverse (``None``: ``max(m, n)·eps(float64)``).
    """
    g = jacobian.detach().to(torch.float64)
    m = g.shape[0]
    w = (
        torch.ones(m, dtype=g.dtype, device=g.device)
        if pref is None
        else pref.detach().to(device=g.device, dtype=g.dtype).reshape(-1)
    )
    if w.shape[0] != m:
        raise ValueError(f"ConFIG: pref has {w.shape[0]} entries for {m} tasks")
    # fast path, exact when chosen: through the cosine matrix K = U Uᵀ (m × m) instead of an
    # [m, n] SVD. For a full-row-rank U, U⁺w = Uᵀ K⁻¹ w; K's eigenvalues carry round-off of
    # eps·λ_max, so the path is taken only when λ_min/λ_max ≥ 1e-6 (relative error ~1e-10)
    # and no singular value of U is under the pseudo-inverse's cutoff (σ² = λ)
    gram = g @ g.T
    sq = gram.diagonal()
    if bool((sq > 0).all()):
        inv_norm = sq.rsqrt()
        cos = gram * inv_norm[:, None] * inv_norm[None, :]
        lam, vec = torch.linalg.eigh((cos + cos.T) / 2)
        eps = torch.finfo(g.dtype).eps
        cut = max(g.shape) * eps if rtol is None else rtol
        lo, hi = (float(v) for v in lam[[0, -1]].tolist())
        if hi > 0 and lo >= max(1e-6, 4 * cut * cut) * hi:
            y = vec @ ((vec.T @ w) / lam)  # K⁻¹ w
            c = y * inv_norm  # x = U⁺w = Jᵀ c
            xx = c @ gram @ c  # ‖x‖²
            if float(xx) <= 0:  # w = 0
                return torch.zeros(g.shape[1], dtype=g.dtype, device=g.device)
            return ((gram @ c).sum() / xx * c) @ g
    return _config_svd(g, w, rtol)


def _config_svd(g: Tensor, w: Tensor, rtol: float | None) -> Tensor:
    """The ConFIG update from one thin SVD of ``U`` (any rank; ``g`` float64)."""
    norms = g.norm(dim=1, keepdim=True)
    units = torch.where(norms > 0, g / torch.where(norms > 0, norms, 1.0), 0.0)
    # x = U⁺w from one thin SVD, U = P diag(σ) Qᵀ: singular values ≤ rtol·σ_max are dropped,
    # as torch.linalg.pinv does (rtol = max(m, n)·eps by default)
    eps = torch.finfo(g.dtype).eps
    p, sv, qt = torch.linalg.svd(units, full_matrices=False)
    cut = (max(g.shape) * eps if rtol is None else rtol) * sv.max()
    keep = sv > cut
    inv = torch.where(keep, 1.0 / torch.where(keep, sv, 1.0), 0.0)
    x = qt.T @ (inv * (p.T @ w))
    # x = 0 exactly when w ⊥ range(U) (gradients that cancel, g_2 = −g_1): what is left is
    # rounding, whose direction is arbitrary; below max(m, n)·eps·‖U⁺‖·‖w‖ it is taken as 0
    floor = max(g.shape) * eps * inv.max() * w.norm()
    nx = torch.where(x.norm() > floor, x.norm(), 0.0)
    u = torch.where(nx > 0, x / torch.where(nx > 0, nx, 1.0), 0.0)
    return (g @ u).sum() * u


class ConFIG(Aggregator):
    """Conflict-free inverse gradients: equal cosine with every task, projection length.

    Args:
        pref: optional preference vector ``w`` (``[m]``, default ones): the target ratios of
            the tasks' cosines with the update.
        rtol: relative singular-value cutoff of the pseudo-inverse (``None``: torch's default).
        reduction: ``"sum"`` (default, the paper's and TorchJD's) or ``"mean"``.
    """

    host_sync = True
    homogeneity = 1

    def __init__(
        self,
        *,
        pref: Tensor | Sequence[float] | None = None,
        rtol: float | None = None,
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if rtol is not None and rtol < 0:
            raise ValueError(f"rtol must be ≥ 0, got {rtol}")
        if pref is None:
            self.pref: Tensor | None = None
        elif isinstance(pref, Tensor):
            self.pref = pref.detach().clone().to(torch.float64)
        else:
            self.pref = torch.as_tensor(pref, dtype=torch.float64)
        self.rtol = None if rtol is None else float(rtol)

    def hparams(self) -> dict[str, object]:
        return {
            "pref": None if self.pref is None else self.pref.tolist(),
            "rtol": self.rtol,
            "reduction": self.reduction,
        }

    def aggregate_jacobian(self, jacobian: Tensor, ctx: StepContext | None = None) -> Tensor:
        m = jacobian.shape[0]
        d = config_direction(jacobian, self.pref, rtol=self.rtol)
        return (d * self._scale(m)).to(jacobian.dtype)
