"""CAGrad — conflict-averse gradient descent (Liu et al., NeurIPS 2021, arXiv:2110.14048).

Maximise the worst task's improvement inside a ball around the mean gradient
``g_0 = (1/m) Σ_t g_t``: ``max_d min_t ⟨g_t, d⟩`` s.t. ``‖d − g_0‖ ≤ c‖g_0‖``. Its dual, solved
on the simplex as the reference code does (scipy SLSQP from the uniform ``w``, bounds
``[0, 1]``, ``Σw = 1``), is

    w* = argmin_{w ∈ Δ_m}  wᵀ G b + c‖g_0‖ · sqrt(wᵀ G w + 1e-8),     b = 1/m,

and the update is ``d = g_0 + λ g_w`` with ``g_w = Jᵀw*`` and ``λ = c‖g_0‖ / (‖g_w‖ + 1e-8)``,
followed by the rescale: ``rescale=1`` (default) ``d /= 1 + c²``, ``2``: ``d /= 1 + c``, ``0``:
none. ``c = 0`` is plain gradient descent on the mean. Default ``c = 0.4`` (nash-mtl, the
paper's NYUv2/Cityscapes setting; LibMTL uses 0.5). ``‖g_0‖² = mean(G)`` (the reference adds
1e-8 inside that square root as well).

Everything is computed on the Gramian ``G`` (``[m, m]``): ``d = Jᵀ(b + λ w*)/rescale``.
One deliberate difference from the reference: ``G`` is divided by ``trace(G)/m`` before the
solve. The minimiser is invariant to that scale, but SLSQP's stopping tolerance is absolute,
so without it small gradients (e.g. ``‖g‖ ~ 1e-4``, objective ~1e-8) stop the solver at the
starting point. The ``1e-8`` guards act on the normalised scale, which makes ``d`` exactly
positively homogeneous in ``J``.

Scale: the paper's ``d`` is on the mean scale. ``reduction="sum"`` (default) multiplies it by
``m`` (as nash-mtl does, so ``c = 0`` gives ``Σ_t g_t``); ``"mean"`` keeps the paper's scale.

Host sync: the solve runs in SciPy on the host (one ``[m, m]`` copy per step). A solver that
reports failure raises (``on_failure="raise"``) or warns and uses its last iterate projected
on the simplex (``"warn"``, default).

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> CAGrad(c=0.4, rescale=2, reduction="mean")(J)  # symmetric: d = (1 + c)·g_0 / (1 + c)
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction

__all__ = ["CAGrad", "CAGradSolverWarning", "cagrad_weights"]

OnFailure = Literal["raise", "warn"]


class CAGradSolverWarning(UserWarning):
    """SLSQP reported a failure; the last iterate was used."""


def cagrad_weights(
    gramian: Tensor,
    c: float = 0.4,
    rescale: int = 1,
    *,
    ftol: float = 1e-12,
    max_iter: int = 200,
    on_failure: OnFailure = "warn",
) -> Tensor:
    """CAGrad weights (``[m]``, float64, mean scale): the update is ``Jᵀ w``.

    Args:
        gramian: ``G`` ``[m, m]``.
        c: radius scale of the ball around ``g_0``.
        rescale: 0, 1 (``/(1+c²)``) or 2 (``/(1+c)``).
        ftol, max_iter: SLSQP's stopping tolerance (on the normalised objective) and budget.
        on_failure: ``"raise"`` or ``"warn"`` when SLSQP reports failure.
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square Gramian [m, m], got {tuple(gramian.shape)}")
    if rescale not in (0, 1, 2):
        raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
    if c < 0:
        raise ValueError(f"c must be ≥ 0, got {c}")
    m = gramian.shape[0]
    g = gramian.detach().to(torch.float64).cpu().numpy()
    g = 0.5 * (g + g.T)
    if not np.isfinite(g).all():
        raise ValueError("CAGrad: the Gramian has non-finite entries")
    b = np.full(m, 1.0 / m)
    tr = float(np.trace(g))
    if tr <= 0.0:  # every gradient is zero: d = 0 whatever w
        w_out = b.copy()
    else:
        a = g / (tr / m)
        sqrt_phi = c * float(np.sqrt(max(float(b @ a @ b), 0.0) + 1e-8))
        ab = a @ b

        def obj(w: np.ndarray) -> float:
            return float(w @ ab + sqrt_phi * np.sqrt(max(float(w @ a @ w), 0.0) + 1e-8))

        def jac(w: np.ndarray) -> np.ndarray:
            aw = a @ w
            return ab + sqrt_phi * aw / np.sqrt(max(float(w @ aw), 0.0) + 1e-8)

        res = minimize(
            obj,
            b.copy(),
            jac=jac,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * m,
            constraints=(
                {"type": "eq", "fun": lambda w: 1.0 - w.sum(), "jac": lambda w: -np.ones(m)},
            ),
            options={"ftol": ftol, "maxiter": max_iter},
        )
        w = np.asarray(res.x, dtype=np.float64)
        if not res.success or not np.isfinite(w).all():
            msg = f"CAGrad: SLSQP failed ({res.message})"
            if on_failure == "raise" or not np.isfinite(w).all():
                raise RuntimeError(msg)
            warnings.warn(msg + "; using its last iterate", CAGradSolverWarning, stacklevel=3)
        w = np.clip(w, 0.0, None)
        w = w / w.sum() if w.sum() > 0 else b.copy()
        gw_norm = float(np.sqrt(max(float(w @ a @ w), 0.0)))
        lmbda = sqrt_phi / (gw_norm + 1e-8)
        w_out = b + lmbda * w
    if rescale == 1:
        w_out = w_out / (1.0 + c * c)
    elif rescale == 2:
        w_out = w_out / (1.0 + c)
    return torch.as_tensor(w_out, dtype=torch.float64, device=gramian.device)


class CAGrad(GramianAggregator):
    """Conflict-averse gradient descent.

    Args:
        c: radius scale (0.4 default).
        rescale: 1 (default, ``/(1+c²)``), 2 (``/(1+c)``) or 0.
        ftol: SLSQP tolerance on the normalised objective (1e-12; SciPy's default 1e-6 is what
            the reference uses, it stops earlier).
        max_iter: SLSQP iteration budget.
        on_failure: ``"warn"`` (default) or ``"raise"``.
        reduction: ``"sum"`` (``m·d``, default) or ``"mean"`` (the paper's scale).
    """

    # stateless in m: a missing-task step is the method on the present tasks' Gramian
    supports_missing_tasks = True

    host_sync = True
    # the dual is solved on G/(trace(G)/m) and every guard acts on that scale: d has degree 1
    homogeneity = 1

    def __init__(
        self,
        c: float = 0.4,
        *,
        rescale: int = 1,
        ftol: float = 1e-12,
        max_iter: int = 200,
        on_failure: OnFailure = "warn",
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if c < 0:
            raise ValueError(f"c must be ≥ 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        if on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}")
        self.c = float(c)
        self.rescale = int(rescale)
        self.ftol = float(ftol)
        self.max_iter = int(max_iter)
        self.on_failure: OnFailure = on_failure

    def hparams(self) -> dict[str, object]:
        return {
            "c": self.c,
            "rescale": self.rescale,
            "ftol": self.ftol,
            "max_iter": self.max_iter,
            "on_failure": self.on_failure,
            "reduction": self.reduction,
        }

    def _weights(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        w = cagrad_weights(
            gramian,
            self.c,
            self.rescale,
            ftol=self.ftol,
            max_iter=self.max_iter,
            on_failure=self.on_failure,
        )
        return w * (m * self._scale(m))
