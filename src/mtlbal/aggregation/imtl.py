"""IMTL-G — impartial gradient balancing (Liu et al., "Towards Impartial Multi-task Learning",
ICLR 2021).

Find the update ``d = Σ_t α_t g_t`` whose projections onto every unit task gradient
``u_t = g_t/‖g_t‖`` are equal, with ``Σ_t α_t = 1``. The paper's closed form: with
``D = [g_1 − g_t]_{t=2..m}`` and ``U = [u_1 − u_t]_{t=2..m}`` (``[m−1, n]`` each),

    α_{2:m} = g_1 Uᵀ (D Uᵀ)^{-1},        α_1 = 1 − Σ_{t≥2} α_t.

Everything in it is an inner product, so it is computed on the Gramian ``G`` (``[m, m]``):
``⟨g_i, u_s⟩ = G_is/‖g_s‖``. The ``[m−1, m−1]`` system is solved in float64 with the
pseudo-inverse: identical to the solve when ``D Uᵀ`` is non-singular, and the minimum-norm
solution when it is not (e.g. two identical task gradients, where ``d`` is still unique). The
reference code instead retries the inverse with ``+1e-8·I``. ``α`` may be negative.

Scale: the paper's ``α`` sums to 1 (identical gradients give their mean). With
``reduction="sum"`` (default) the weights are multiplied by ``m``, so identical gradients give
``Σ_t g_t``; ``reduction="mean"`` returns the paper's ``α`` (TorchJD's ``IMTLG`` scale).

The paper applies IMTL-G to the gradients at the shared representation: use
``Balancer(..., at=module)``; at ``"params"`` it acts on the shared parameters' gradients.
Zero-norm gradients are guarded by ``eps`` in ``‖g_t‖``. No host sync.

Example:
    >>> import torch
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> IMTLG(reduction="mean").weights(J @ J.T)
    tensor([0.3333, 0.6667], dtype=torch.float64)
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction

__all__ = ["IMTLG", "imtlg_weights"]


def imtlg_weights(gramian: Tensor, eps: float = 1e-12) -> Tensor:
    """IMTL-G weights ``α`` (``[m]``, float64, ``Σα = 1``) from the Gramian ``[m, m]``."""
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square Gramian [m, m], got {tuple(gramian.shape)}")
    g = gramian.detach().to(torch.float64)
    m = g.shape[0]
    if m == 1:
        return torch.ones(1, dtype=g.dtype, device=g.device)
    norms = g.diagonal().clamp_min(0).sqrt().clamp_min(eps)
    c = g / norms[None, :]  # c[i, s] = ⟨g_i, u_s⟩
    e = c[:, :1] - c[:, 1:]  # e[i, s] = ⟨g_i, u_1 − u_{s+1}⟩, [m, m−1]
    r = e[0]  # g_1 Uᵀ
    mat = e[:1] - e[1:]  # (D Uᵀ)[t, s] = ⟨g_1 − g_{t+1}, u_1 − u_{s+1}⟩
    rest = r @ torch.linalg.pinv(mat)
    return torch.cat([(1 - rest.sum()).reshape(1), rest])


class IMTLG(GramianAggregator):
    """IMTL-G: equal projections of the update onto every task's unit gradient.

    Args:
        eps: guard on the gradient norms.
        reduction: ``"sum"`` (``m·α``, default) or ``"mean"`` (the paper's ``Σα = 1``).
    """

    # torch.linalg.pinv runs an SVD whose status is checked on the host (one sync per step,
    # measured by the cost suite's profiler count)
    host_sync = True

    def __init__(self, *, eps: float = 1e-12, reduction: Reduction = "sum") -> None:
        super().__init__(reduction)
        self.eps = float(eps)

    def hparams(self) -> dict[str, object]:
        return {"reduction": self.reduction}

    def _weights(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        return imtlg_weights(gramian, self.eps) * (m * self._scale(m))
