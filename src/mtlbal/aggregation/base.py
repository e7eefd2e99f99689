"""Gradient-level strategies: ``J [m, n] → g [n]``; Gramian-based ones map ``G [m, m] → w [m]``."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mtlbal._stateful import Stateful
from mtlbal.step import Need, StepContext

__all__ = ["Aggregator", "GramianAggregator", "Reduction", "check_gramian", "check_jacobian"]

Reduction = Literal["sum", "mean"]


def _symmetry_tol(dtype: torch.dtype) -> float:
    """Relative tolerance of the symmetry check: ``max(1e-6, √eps)`` of the dtype (1e-6 in
    float64, ≈3.5e-4 in float32), room for a ``J Jᵀ`` whose two triangles were rounded apart."""
    return max(1e-6, math.sqrt(torch.finfo(dtype).eps))


def _check_floating(x: Tensor, what: str, who: str) -> None:
    if not (x.is_floating_point() and not x.is_complex()):
        raise TypeError(f"{who}: the {what} must be a real floating-point tensor, got {x.dtype}")


def check_jacobian(jacobian: Tensor, who: str) -> None:
    """Refuse a Jacobian that is not a finite, real floating-point ``[m, n]`` tensor.

    ``who`` names the caller in the message. One host read (the finiteness check).
    """
    _check_floating(jacobian, "Jacobian", who)
    if jacobian.dim() != 2:
        raise ValueError(f"{who}: expected a Jacobian of shape [m, n], got {tuple(jacobian.shape)}")
    if jacobian.shape[0] == 0:
        raise ValueError(f"{who}: the Jacobian has no task rows")
    if not bool(torch.isfinite(jacobian).all()):
        raise ValueError(f"{who}: the Jacobian has non-finite (nan/inf) entries")


def check_gramian(gramian: Tensor, who: str, *, values: bool = True) -> None:
    """Refuse what is not a Gramian: non-floating, not ``[m, m]``, non-finite or not symmetric.

    Symmetry is relative to the scale of ``G``: ``max|G − Gᵀ| ≤ tol · max|G|`` with
    ``tol = max(1e-6, √eps(dtype))``. With ``values=False`` only the dtype and the shape are
    checked (no copy to the host). ``who`` names the caller in the message.
    """
    _check_floating(gramian, "Gramian", who)
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"{who}: expected a square Gramian [m, m], got {tuple(gramian.shape)}")
    if gramian.shape[0] == 0:
        raise ValueError(f"{who}: the Gramian is empty (no tasks)")
    if not values:
        return
    # one copy to the host (free on the CPU), then NumPy: no torch scalar reads
    g = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(g).all():
        raise ValueError(f"{who}: the Gramian has non-finite (nan/inf) entries")
    asym = float(np.abs(g - g.T).max())
    scale = float(np.abs(g).max())
    tol = _symmetry_tol(gramian.dtype)
    if asym > tol * scale:
        raise ValueError(
            f"{who}: the Gramian is not symmetric (max|G − Gᵀ| = {asym:.3e} > "
            f"{tol:.1e} · max|G| = {tol * scale:.3e})"
        )


class Aggregator(Stateful):
    """Base class: combine per-task gradients into one update direction.

    Scale convention (one flag for every method, ``reduction``): with ``"sum"`` (the default) a
    method is scaled so that, where it reduces to equal weighting, it returns ``Σ_t g_t``, the
    gradient of ``Σ_t L_t``; with ``"mean"`` it returns ``(1/m) Σ_t g_t`` there. Methods whose
    paper yields a convex combination (MGDA) are multiplied by ``m`` under ``"sum"``.

    Attributes:
        requires: ``"gramian"`` if the method needs only ``G = J Jᵀ`` (then the engine may never
            build ``J``), ``"jacobian"`` otherwise.
        host_sync: whether the solver copies to the host (documented per method).
        homogeneity: the degree ``d`` of positive homogeneity of the update, when it has one:
            scaling every task gradient (and, for loss-aware methods, every loss) by ``c > 0``
            scales the update by ``c**d`` (up to round-off). ``1`` for most methods; ``0`` for
            a direction that does not depend on the gradients' scale (Nash-MTL, normalised
            MGDA); ``None`` when no degree holds (an absolute epsilon or threshold in the
            method). Set per instance where it depends on the configuration.
    """

    requires: Literal["gramian", "jacobian"] = "jacobian"
    host_sync: bool = False
    needs: frozenset[Need] = frozenset({Need.GRAMIAN})
    homogeneity: float | None = None

    def __init__(self, reduction: Reduction = "sum") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction: Reduction = reduction

    def forward(self, jacobian: Tensor, *, losses: Tensor | None = None) -> Tensor:
        """Aggregate a Jacobian ``[m, n]`` into a direction ``[n]`` (standalone use);
        ``losses`` (``[m]``) for a method that declares ``Need.LOSSES``.

        Raises ``TypeError``/``ValueError`` unless ``jacobian`` is a finite, real
        floating-point ``[m, n]`` tensor (see :func:`check_jacobian`).
        """
        check_jacobian(jacobian, type(self).__name__)
        if losses is not None and tuple(losses.shape) != (jacobian.shape[0],):
            raise ValueError(
                f"{type(self).__name__}: losses of shape {tuple(losses.shape)} for "
                f"{jacobian.shape[0]} tasks"
            )
        return self.aggregate_jacobian(jacobian, StepContext(losses=losses))

    def aggregate_jacobian(self, jacobian: Tensor, ctx: StepContext | None = None) -> Tensor:
        """The direction from a checked Jacobian (and the step's context)."""
        raise NotImplementedError

    def _scale(self, m: int) -> float:
        return 1.0 if self.reduction == "sum" else 1.0 / m


class GramianAggregator(Aggregator):
    """An aggregator of the form ``g = Jᵀ w(G)``: only the Gramian is needed.

    Subclasses implement the kernel :meth:`_weights`; the public :meth:`weights` (standalone
    use) validates its input first (:func:`check_gramian`: one read of the ``m × m`` Gramian on
    the host). Inside a :class:`~mtlbal.Balancer` the kernel is called directly: the Balancer
    forms the Gramian itself (symmetric by construction), checks it finite in its one host sync
    and hands it over in float64.
    """

    requires: Literal["gramian", "jacobian"] = "gramian"

    def weights(self, gramian: Tensor, *, losses: Tensor | None = None) -> Tensor:
        """Weights ``[m]`` from the Gramian ``[m, m]``, in the configured ``reduction`` scale
        (standalone use). ``losses`` (``[m]``) for a method that declares ``Need.LOSSES``.

        Raises ``TypeError`` for a non-floating Gramian and ``ValueError`` for one that is not
        ``[m, m]``, not finite, or not symmetric (relative to its scale).
        """
        check_gramian(gramian, type(self).__name__)
        if losses is not None and tuple(losses.shape) != (gramian.shape[0],):
            raise ValueError(
                f"{type(self).__name__}: losses of shape {tuple(losses.shape)} for "
                f"{gramian.shape[0]} tasks"
            )
        return self.solve(gramian, StepContext(losses=losses))

    def solve(self, gramian: Tensor, ctx: StepContext) -> Tensor:
        """Weights from a Gramian the caller has checked, with the step's context (what the
        :class:`~mtlbal.Balancer` calls). Methods that need more than ``G`` override it."""
        return self._weights(gramian)

    def _weights(self, gramian: Tensor) -> Tensor:
        """The method's kernel: weights from a validated Gramian."""
        raise NotImplementedError

    def aggregate_jacobian(self, jacobian: Tensor, ctx: StepContext | None = None) -> Tensor:
        g64 = jacobian.to(torch.float64)
        gram = g64 @ g64.T
        w = self.solve((gram + gram.T) / 2, ctx if ctx is not None else StepContext())
        return w.to(jacobian.dtype) @ jacobian
