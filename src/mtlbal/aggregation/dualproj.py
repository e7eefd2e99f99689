"""DualProj — project the combined gradient onto the dual cone of the task gradients (the
GEM projection, Lopez-Paz & Ranzato, NeurIPS 2017, eq. 11; as an aggregator in Quinton & Rey,
arXiv:2406.16232).

``d = π(Jᵀu)``, the Euclidean projection of ``Jᵀu`` onto ``{x : J x ≥ 0}``. By the dual form
(Proposition 1 of the UPGrad paper) ``π(Jᵀu) = Jᵀv`` with

    v = argmin_{v ≥ u} vᵀ G v          (G = J Jᵀ, [m, m]),

solved exactly by the same active-set QP as :mod:`mtlbal.aggregation.upgrad`, with the same
numerics (``G/trace(G) + reg_eps·I``, ``reg_eps = 1e-4``; ``norm_eps = 0``). UPGrad projects
each task gradient and adds the projections; DualProj projects their sum once.

Scale: ``reduction="sum"`` (default) projects ``Σ_t g_t`` (``u = 1``); ``"mean"`` projects the
mean (``u = 1/m``, TorchJD's ``DualProj()``). Non-conflicting (``J d ≥ 0``, exactly for
``reg_eps = 0``); a non-conflicting sum is returned unchanged. Host sync: NumPy QP on the host.

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-2.0, 1.0]])
    >>> DualProj(reg_eps=0.0)(J)  # Σg = (−1, 1) conflicts with g_1; its projection
    tensor([0., 1.])
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtlbal.aggregation.upgrad import DualConeAggregator, dual_cone_problem, nonneg_qp

__all__ = ["DualProj", "dualproj_weights"]


def dualproj_weights(
    gramian: Tensor,
    pref: Tensor | None = None,
    *,
    norm_eps: float = 0.0,
    reg_eps: float = 1e-4,
) -> Tensor:
    """``v = argmin_{v ≥ u} vᵀ G̃ v`` (``[m]``, float64) with ``u = pref`` (default ones)."""
    a, u = dual_cone_problem(gramian, pref, norm_eps, reg_eps, "DualProj")
    try:
        x = nonneg_qp(a, a @ u)
    except np.linalg.LinAlgError as e:
        raise RuntimeError("DualProj: singular Gramian in the QP; use reg_eps > 0") from e
    return torch.as_tensor(u + x, dtype=torch.float64, device=gramian.device)


class DualProj(DualConeAggregator):
    """Projection of the summed (or mean) gradient onto the dual cone of the task gradients.

    Arguments as :class:`~mtlbal.aggregation.upgrad.DualConeAggregator` (``pref`` is ``u``,
    default ones, times ``1/m`` under ``"mean"``).
    """

    def _kernel(self, gramian: Tensor) -> Tensor:
        return dualproj_weights(gramian, self.pref, norm_eps=self.norm_eps, reg_eps=self.reg_eps)
