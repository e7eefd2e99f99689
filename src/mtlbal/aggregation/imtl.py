"""IMTL-G — impartial gradient balancing (Liu et al., "Towards Impartial Multi-task Learning",
ICLR 2021).

Find the update ``d = Σ_t α_t g_t`` whose projections onto every unit task gradient
``u_t = g_t/‖g_t‖`` are equal, with ``Σ_t α_t = 1``. The paper's closed form: with
``D = [g_1 − g_t]_{t=2..m}`` and ``U = [u_1 − u_t]_{t=2..m}`` (``[m−1, n]`` each),

    α_{2:m} = g_1 Uᵀ (D Uᵀ)^{-1},        α_1 = 1 − Σ_{t≥2} α_t.

Everything in it is an inner product, so it is computed on the Gramian ``G`` (``[m, m]``):
``⟨g_i, u_s⟩ = G_is/‖g_s‖``. Equivalently ``α`` solves the ``[m, m]`` linear system

    ⟨Jᵀα, u_1 − u_t⟩ / max_s ‖g_s‖ = 0  (t = 2..m),        Σ_t α_t = 1,

which is solved in float64 by the pseudo-inverse with a *relative* rank tolerance
(singular values below ``√eps · σ_max`` dropped, ``eps`` of the Gramian's dtype). When the
system is non-singular this is the paper's closed form exactly. When it is (numerically)
singular — task gradients that are positive multiples of each other, where every ``α`` with
``Σα = 1`` has equal projections — the answer is the **minimum-norm** ``α``: for ``m``
collinear gradients ``α = 1/m``, i.e. their mean (``Σ_t g_t`` under ``"sum"``), which agrees
with every task. Without the tolerance, round-off in ``u_1 − u_t`` decided the answer (an update
against every task could come out). The reference code retries the inverse with ``+1e-8·I``.
``α`` may be negative.

Scale: the paper's ``α`` sums to 1 (identical gradients give their mean). With
``reduction="sum"`` (default) the weights are multiplied by ``m``, so identical gradients give
``Σ_t g_t``; ``reduction="mean"`` returns the paper's ``α`` (TorchJD's ``IMTLG`` scale).

The paper applies IMTL-G to the gradients at the shared representation: use
``Balancer(..., at=module)``; at ``"params"`` it acts on the shared parameters' gradients.
A zero gradient (``‖g_t‖ ≤ eps``, default 0: exactly zero) has no direction: its ``u_t`` is
taken as 0. No host sync.

Example:
    >>> import torch
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> IMTLG(reduction="mean").weights(J @ J.T)
    tensor([0.3333, 0.6667], dtype=torch.float64)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction

__all__ = ["IMTLG", "imtlg_weights"]


def imtlg_weights(gramian: Tensor, eps: float = 0.0, rtol: float | None = None) -> Tensor:
    """IMTL-G weights ``α`` (``[m]``, float64, ``Σα = 1``) from the Gramian ``[m, m]``.

    ``rtol``: relative rank tolerance of the pseudo-inverse (default ``√eps`` of the Gramian's
    dtype); a singular system gives the minimum-norm ``α``. ``eps``: gradients with
    ``‖g_t‖ ≤ eps`` count as zero.
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square Gramian [m, m], got {tuple(gramian.shape)}")
    if rtol is None:
        rtol = math.sqrt(torch.finfo(gramian.dtype).eps)
    g = gramian.detach().to(torch.float64)
    m = g.shape[0]
    if m == 1:
        return torch.ones(1, dtype=g.dtype, device=g.device)
    norms = g.diagonal().clamp_min(0).sqrt()
    nonzero = norms > eps
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, norms, 1.0), 0.0)
    c = g * inv[None, :]  # c[i, s] = ⟨g_i, u_s⟩
    e = c[:, :1] - c[:, 1:]  # e[i, s] = ⟨g_i, u_1 − u_{s+1}⟩, [m, m−1]
    # rows: ⟨Jᵀα, u_1 − u_{s+1}⟩ (made dimensionless) = 0, and Σα = 1
    smax = norms.max()
    a = torch.cat(
        [e.T / torch.where(smax > 0, smax, 1.0), torch.ones(1, m, dtype=g.dtype, device=g.device)]
    )
    b = torch.zeros(m, dtype=g.dtype, device=g.device)
    b[-1] = 1.0
    return torch.linalg.pinv(a, rtol=rtol) @ b


class IMTLG(GramianAggregator):
    """IMTL-G: equal projections of the update onto every task's unit gradient.

    Args:
        eps: gradients with ``‖g_t‖ ≤ eps`` count as zero (default 0: exactly zero).
        rtol: relative rank tolerance of the solve (default ``√eps`` of the Gramian's dtype).
        reduction: ``"sum"`` (``m·α``, default) or ``"mean"`` (the paper's ``Σα = 1``).
    """

    # stateless in m: a missing-task step is the method on the present tasks' Gramian
    supports_missing_tasks = True

    # torch.linalg.pinv runs an SVD whose status is checked on the host (one sync per step,
    # measured by the cost suite's profiler count)
    host_sync = True

    def __init__(
        self, *, eps: float = 0.0, rtol: float | None = None, reduction: Reduction = "sum"
    ) -> None:
        super().__init__(reduction)
        self.eps = float(eps)
        self.rtol = rtol
        # α solves a dimensionless system (its rows divided by max‖g_s‖, Σα = 1): α has degree
        # 0 and d = Jᵀα degree 1, unless an absolute eps decides which gradients count as zero
        self.homogeneity = 1 if self.eps == 0 else None

    def hparams(self) -> dict[str, object]:
        return {"eps": self.eps, "rtol": self.rtol, "reduction": self.reduction}

    def _weights(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        return imtlg_weights(gramian, self.eps, self.rtol) * (m * self._scale(m))
