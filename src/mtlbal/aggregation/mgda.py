"""MGDA (Sener & Koltun, NeurIPS 2018, arXiv:1810.04650); MGDA-UB at a cut point.

The min-norm point of the convex hull of the task gradients:

    w* = argmin_{w ∈ Δ_m} ‖Jᵀ w‖² = argmin_{w ∈ Δ_m} wᵀ G w

solved on the Gramian ``G`` (``[m, m]``) by Frank–Wolfe (the paper's Algorithm 2): start from
the best pair (the exact two-task solution), then move toward the vertex ``argmin_t (G w)_t``
with the exact line search, until the step changes ``w`` by less than ``tol`` (L1) or
``max_iter`` is reached. The reference code clips every line search to ``[0.001, 0.999]``;
``line_search="reference"`` reproduces that (its weights never reach 0 or 1 exactly and it stops
slightly above the optimum), the default follows the paper.
At a cut point (``Balancer(at=module)``) the same
solver on the representation's Gramian is MGDA-UB.

Optional gradient normalisation before solving (``"l2"``: ``‖g_t‖``, ``"loss"``: ``L_t``,
``"loss+"``: ``L_t·‖g_t‖``) follows the original code: the weights are then applied to the
*raw* gradients, ``w_t / n_t``.

Scale: the solution is a convex combination; with ``reduction="sum"`` (default) it is
multiplied by ``m`` so that MGDA on identical gradients returns ``Σ_t g_t``.

Host sync: the solver runs in float64 on the host (NumPy), one ``[m, m]`` copy per step.

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> MGDA(reduction="mean")(J)
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction

__all__ = ["MGDA", "mgda_weights", "min_norm_2"]

Normalization = Literal["none", "l2", "loss", "loss+"]


def min_norm_2(v11: float, v12: float, v22: float, *, clip: float = 0.0) -> tuple[float, float]:
    """``argmin_{γ∈[0,1]} ‖γ a + (1−γ) b‖²`` from ``aᵀa, aᵀb, bᵀb``; returns ``(γ, cost)``.

    At the boundaries the paper's rule returns ``γ = 1`` / ``0``; the reference code (and its
    copies in LibMTL and nash-mtl) returns ``1 − clip`` / ``clip`` with ``clip = 0.001``.
    """
    if v12 >= v11:
        return 1.0 - clip, v11
    if v12 >= v22:
        return clip, v22
    gamma = -1.0 * (v12 - v22) / (v11 + v22 - 2.0 * v12)
    return gamma, v22 + gamma * (v12 - v22)


def _mgda_numpy(g: np.ndarray, max_iter: int, tol: float, clip: float) -> np.ndarray:
    m = g.shape[0]
    if m == 1:
        return np.ones(1)
    # the best pair, all pairs at once (the same rule as min_norm_2, first minimum in (i, j)
    # order as the reference's double loop)
    ii, jj = np.triu_indices(m, k=1)
    a11, a12, a22 = g[ii, ii], g[ii, jj], g[jj, jj]
    inner = ~((a12 >= a11) | (a12 >= a22))
    safe = np.where(inner, a11 + a22 - 2.0 * a12, 1.0)
    gam = np.where(a12 >= a11, 1.0 - clip, np.where(a12 >= a22, clip, (a22 - a12) / safe))
    cost = np.where(a12 >= a11, a11, np.where(a12 >= a22, a22, a22 + gam * (a12 - a22)))
    k = int(np.argmin(cost))
    sol = np.zeros(m)
    sol[ii[k]], sol[jj[k]] = gam[k], 1.0 - gam[k]
    if m == 2:
        return sol
    for _ in range(max_iter):
        grad = g @ sol
        t = int(np.argmin(grad))
        v11 = float(sol @ grad)
        v12 = float(grad[t])
        v22 = float(g[t, t])
        gamma, _ = min_norm_2(v11, v12, v22, clip=clip)
        new = gamma * sol
        new[t] += 1.0 - gamma
        change = np.abs(new - sol).sum()
        sol = new
        if change < tol:
            break
    return sol


def mgda_weights(
    gramian: Tensor,
    *,
    max_iter: int = 250,
    tol: float = 1e-5,
    norms: Tensor | None = None,
    clip: float = 0.0,
) -> Tensor:
    """Convex MGDA weights ``[m]`` (on the simplex) for the Gramian ``[m, m]``.

    ``clip``: 0 for the paper's exact line search, 0.001 for the reference code's
    (which never lets a weight reach exactly 0 or 1, and so stops ~0.1–2% above the optimum).

    With ``norms`` (``[m]``, positive) the problem is solved for the normalised gradients
    ``g_t / n_t`` and the returned weights are ``w_t / n_t`` (apply them to the raw gradients).
    """
    g = gramian.detach().to(torch.float64)
    if norms is not None:
        n = norms.detach().to(torch.float64).clamp_min(1e-12)
        g = g / (n[:, None] * n[None, :])
    sol = _mgda_numpy(g.cpu().numpy(), max_iter, tol, clip)
    w = torch.as_tensor(sol, dtype=torch.float64, device=gramian.device)
    if norms is not None:
        w = w / norms.detach().to(torch.float64).clamp_min(1e-12)
    return w


class MGDA(GramianAggregator):
    """Multiple-gradient descent: the min-norm element of the tasks' convex hull.

    Args:
        normalization: ``"none"`` (default, as LibMTL and nash-mtl), ``"l2"``, ``"loss"`` or
            ``"loss+"``; see the module docstring.
        max_iter: Frank–Wolfe iterations (250 as LibMTL).
        tol: stop when the L1 change of ``w`` is below this (1e-5 as the reference).
        line_search: ``"paper"`` (default): the exact two-point step, ``γ ∈ [0, 1]``;
            ``"reference"``: the reference code's step clipped to ``[0.001, 0.999]``.
        reduction: ``"sum"`` (× m, default) or ``"mean"`` (the convex combination).
    """

    host_sync = True

    def __init__(
        self,
        *,
        normalization: Normalization = "none",
        max_iter: int = 250,
        tol: float = 1e-5,
        line_search: Literal["paper", "reference"] = "paper",
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if line_search not in ("paper", "reference"):
            raise ValueError(f"line_search must be 'paper' or 'reference', got {line_search!r}")
        self.line_search = line_search
        if normalization not in ("none", "l2", "loss", "loss+"):
            raise ValueError(f"unknown normalization {normalization!r}")
        self.normalization: Normalization = normalization
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self._losses: Tensor | None = None

    def hparams(self) -> dict[str, object]:
        return {"normalization": self.normalization, "reduction": self.reduction}

    def set_losses(self, losses: Tensor) -> None:
        """Losses of the current step (needed by the ``"loss"``/``"loss+"`` normalisations)."""
        self._losses = losses.detach()

    def _weights(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        norms: Tensor | None = None
        if self.normalization != "none":
            gnorm = gramian.detach().to(torch.float64).diagonal().clamp_min(0).sqrt()
            if self.normalization == "l2":
                norms = gnorm
            else:
                if self._losses is None:
                    raise ValueError(
                        f"MGDA(normalization={self.normalization!r}) needs the losses: "
                        "use it through a Balancer, or call set_losses() first"
                    )
                loss = self._losses.to(torch.float64)
                norms = loss if self.normalization == "loss" else loss * gnorm
        clip = 0.0 if self.line_search == "paper" else 0.001
        w = mgda_weights(gramian, max_iter=self.max_iter, tol=self.tol, norms=norms, clip=clip)
        return w * (m * self._scale(m))
