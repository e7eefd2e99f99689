"""UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv:2406.16232).

Project every task gradient onto the dual cone ``{x : J x ≥ 0}`` of all task gradients and
add the projections up. By the paper's Proposition 1 the projection of ``Jᵀu`` is ``Jᵀv`` with

    v = argmin_{v ≥ u} vᵀ G v            (G = J Jᵀ, [m, m])

so for task ``i`` (``u_i = p_i e_i``, preference ``p``) one small QP over the Gramian gives
``v_i`` and the update is ``Jᵀ w`` with ``w = Σ_i v_i``.

Solver (exact, no dependency): substituting ``v = u + x`` turns each QP into the
non-negative quadratic program ``min_{x ≥ 0} ½ xᵀ A x + (A u)ᵀ x`` with ``A = G̃``, solved in
float64 by a primal–dual active-set iteration (a few exact linear solves on the free set),
with the Lawson–Hanson active-set method (finite termination) as the fallback when that does
not reach a KKT point. The KKT conditions of the result are always checked: a violation
raises ``RuntimeError`` instead of returning a wrong answer.

Numerics, as TorchJD: ``G̃ = G / trace(G) + reg_eps·I`` (``reg_eps = 1e-4``). Scaling ``G`` does
not change the minimiser; the regulariser makes ``G̃`` positive definite and slightly biases
the solution (set ``reg_eps=0`` for the exact projection when ``G`` is non-singular).
Unlike TorchJD, whose default treats every Gramian with ``trace < 1e-4`` as zero (so UPGrad
silently becomes the mean once ``Σ‖g_t‖² < 1e-4``), ``norm_eps`` defaults to 0: only an all-zero
Gramian is treated as zero, and the method stays positively homogeneous at every scale.

Scale: with ``reduction="sum"`` (default) the preference is ``p = 1`` and identical task
gradients give ``Σ_t g_t``; ``reduction="mean"`` uses ``p = 1/m`` (TorchJD's default and the
paper's "mean" scale: TorchJD's ``UPGrad()`` equals ``UPGrad(reduction="mean")``, and ``m``
times it equals the default here). A given ``pref`` is multiplied by ``1`` or ``1/m`` likewise.

Properties: non-conflicting (``J d ≥ 0``, exactly for ``reg_eps = 0``), permutation
equivariant, positively homogeneous (``d(sJ) = s·d(J)``, ``s > 0``). Weights are not
differentiable. Host sync: the QPs run on the host (NumPy), one ``[m, m]`` copy per step.

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> d = UPGrad(reg_eps=0.0)(J)
    >>> bool((J @ d >= -1e-6).all())
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction

__all__ = ["UPGrad", "batched_nonneg_qp", "nonneg_qp", "upgrad_weights"]


def _lawson_hanson(a: np.ndarray, q: np.ndarray, thr: float, limit: int) -> np.ndarray:
    m = q.shape[0]
    x = np.zeros(m)
    free = np.zeros(m, dtype=bool)
    for _ in range(limit):
        neg_grad = -(a @ x + q)
        cand = ~free & (neg_grad > thr)
        if not cand.any():
            return x
        free[int(np.argmax(np.where(cand, neg_grad, -np.inf)))] = True
        for _ in range(limit):
            z = np.zeros(m)
            idx = np.flatnonzero(free)
            z[idx] = np.linalg.solve(a[np.ix_(idx, idx)], -q[idx])
            if (z[idx] > 0).all():
                x = z
                break
            bad = free & (z <= 0)
            step = float(np.min(x[bad] / (x[bad] - z[bad])))
            x = x + step * (z - x)
            free &= x > thr
            x[~free] = 0.0
        else:
            raise RuntimeError("nonneg_qp: inner active-set loop did not terminate")
    raise RuntimeError(f"nonneg_qp: no convergence in {limit} iterations")


def _primal_dual_active_set(a: np.ndarray, q: np.ndarray, limit: int) -> np.ndarray | None:
    """Semismooth Newton on ``min(x, a x + q) = 0``; ``None`` if the active set cycles."""
    m = q.shape[0]
    active = q >= 0  # where the gradient at x = 0 already points into the constraint
    for _ in range(limit):
        x = np.zeros(m)
        idx = np.flatnonzero(~active)
        if idx.size:
            x[idx] = np.linalg.solve(a[np.ix_(idx, idx)], -q[idx])
        lam = a @ x + q
        lam[idx] = 0.0
        new = x < lam
        if (new == active).all():
            return x
        active = new
    return None


def _kkt_residual(a: np.ndarray, q: np.ndarray, x: np.ndarray) -> float:
    grad = a @ x + q
    return max(
        float(np.max(-x, initial=0.0)),
        float(np.max(-grad, initial=0.0)),
        float(np.max(np.abs(x * grad), initial=0.0)),
    )


def nonneg_qp(
    a: np.ndarray,
    q: np.ndarray,
    *,
    tol: float = 1e-12,
    max_iter: int = 0,
    method: Literal["auto", "lawson-hanson"] = "auto",
) -> np.ndarray:
    """``argmin_{x ≥ 0} ½ xᵀ a x + qᵀ x`` for a symmetric positive definite ``a`` (``[m, m]``).

    ``"auto"`` first tries a primal–dual active-set (semismooth Newton) iteration, which
    usually ends in 2–3 linear solves, and keeps its answer only if it satisfies the KKT
    conditions; otherwise (or with ``method="lawson-hanson"``) the Lawson–Hanson active-set
    method, generalised from least squares to a PD quadratic, which terminates finitely.
    Raises ``RuntimeError`` if it does not terminate within ``max_iter`` outer iterations
    (default ``3m + 10``) or if the KKT conditions of the result do not hold.
    """
    m = q.shape[0]
    scale = max(1.0, float(np.abs(q).max(initial=0.0)), float(np.abs(a).max(initial=0.0)))
    limit = max_iter or 3 * m + 10

    def ok(x: np.ndarray) -> tuple[bool, float]:
        kkt = _kkt_residual(a, q, x)
        bound = 1e-7 * scale * max(1.0, float(np.abs(x).max(initial=0.0)))
        return bool(np.isfinite(kkt) and kkt <= bound), kkt

    if method == "auto":
        x_pdas = _primal_dual_active_set(a, q, limit)
        if x_pdas is not None and ok(x_pdas)[0]:
            return x_pdas
    elif method != "lawson-hanson":
        raise ValueError(f"unknown method {method!r}")
    x = _lawson_hanson(a, q, tol * scale, limit)
    good, kkt = ok(x)
    if not good:
        raise RuntimeError(f"nonneg_qp: KKT conditions violated by {kkt:.3e}")
    return x


def dual_cone_problem(
    gramian: Tensor, pref: Tensor | None, norm_eps: float, reg_eps: float, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """The QP matrix ``G̃ = G/trace(G) + reg_eps·I`` (``reg_eps·I`` when ``trace(G) ≤
    norm_eps``), float64 on the host, and the preference vector (default ones)."""
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square Gramian [m, m], got {tuple(gramian.shape)}")
    m = gramian.shape[0]
    g = gramian.detach().to(torch.float64).cpu().numpy()
    g = 0.5 * (g + g.T)
    if not np.isfinite(g).all():
        raise ValueError(f"{name}: the Gramian has non-finite entries")
    p = np.ones(m) if pref is None else pref.detach().to(torch.float64).cpu().numpy().reshape(-1)
    if p.shape[0] != m:
        raise ValueError(f"pref has {p.shape[0]} entries for {m} tasks")
    tr = float(np.trace(g))
    a = g / tr if tr > norm_eps else np.zeros_like(g)
    return a + reg_eps * np.eye(m), p


def batched_nonneg_qp(
    a: Tensor, q: Tensor, *, max_iter: int = 0, who: str = "batched_nonneg_qp"
) -> Tensor:
    """``X[i] = argmin_{x ≥ 0} ½ xᵀ a x + q[i]ᵀ x`` for every row ``i`` of ``q`` (``[k, m]``),
    all sharing one symmetric positive definite ``a`` (``[m, m]``); float64, on ``a``'s device.

    One primal–dual active-set (semismooth Newton) iteration for all the problems at once:
    each problem's free-set system ``a[F, F] x_F = −q_F`` is gathered into a batch padded to the
    largest free set (identity on the padding) and solved by one batched Cholesky; problems
    whose active set has settled leave the batch. The KKT conditions of every result are then
    checked in one batched product; a problem that cycles, exceeds ``max_iter`` (default
    ``3m + 10``), whose system is not numerically positive definite, or whose result violates
    KKT is solved again by :func:`nonneg_qp` (Lawson–Hanson, finite termination), which raises
    ``RuntimeError`` if that fails too. One host read per iteration (the settled check).
    """
    k, m = q.shape
    a = a.to(torch.float64)
    q = q.to(device=a.device, dtype=torch.float64)
    x_all = torch.zeros(k, m, dtype=torch.float64, device=a.device)
    if k == 0 or m == 0:
        return x_all
    limit = max_iter or 3 * m + 10
    todo = torch.arange(k, device=a.device)  # problems still iterating
    active = q >= 0  # where the gradient at x = 0 already points into the constraint
    # a with an identity block appended: padding slot r of a batch gathers index m + r, so the
    # padded systems are block-diagonal [a[F, F], I] without any masking of the batch
    ext = torch.block_diag(a, torch.eye(m, dtype=torch.float64, device=a.device))
    q_ext = torch.cat([q, torch.zeros_like(q)], 1)
    cols = torch.arange(m, device=a.device)
    redo: list[Tensor] = []  # problems handed to the exact fallback
    for _ in range(limit):
        if todo.numel() == 0:
            break
        free = ~active
        count = free.sum(1)
        width = int(count.max())
        # the free indices of each problem first (stable), padded to the widest free set
        idx = torch.argsort(active.to(torch.int8), dim=1, stable=True)[:, :width]
        valid = cols[:width][None, :] < count[:, None]
        pidx = torch.where(valid, idx, m + cols[:width][None, :])
        x = torch.zeros(todo.numel(), m, dtype=torch.float64, device=a.device)
        if width > 0:
            sub = ext[pidx[:, :, None], pidx[:, None, :]]
            rhs = -q_ext[todo].gather(1, pidx)[:, :, None]
            chol, info = torch.linalg.cholesky_ex(sub)
            half = torch.linalg.solve_triangular(chol, rhs, upper=False)
            sol = torch.linalg.solve_triangular(chol.mT, half, upper=True)[:, :, 0]
            bad = info != 0
            x = x.scatter(1, idx, torch.where(valid & ~bad[:, None], sol, 0.0))
        else:
            bad = torch.zeros(todo.numel(), dtype=torch.bool, device=a.device)
        lam = torch.where(free, 0.0, x @ a + q[todo])
        new = x < lam
        settled = (new == active).all(1) & ~bad
        x_all[todo[settled]] = x[settled]
        redo.append(todo[bad])
        keep = ~settled & ~bad
        todo, active = todo[keep], new[keep]
    redo.append(todo)  # still cycling after the budget
    # KKT of every result, at once (the tolerance of nonneg_qp)
    grad = x_all @ a + q
    kkt = torch.stack(
        [(-x_all).clamp_min(0).amax(1), (-grad).clamp_min(0).amax(1), (x_all * grad).abs().amax(1)]
    ).amax(0)
    scale = torch.maximum(q.abs().amax(1), a.abs().max()).clamp_min(1.0)
    bound = 1e-7 * scale * x_all.abs().amax(1).clamp_min(1.0)
    failed = ~(kkt <= bound)
    failed[torch.cat(redo)] = True
    rows = torch.nonzero(failed).flatten().tolist()
    if rows:
        a_np = a.cpu().numpy()
        q_np = q.cpu().numpy()
        for r in rows:
            try:
                x_all[r] = torch.as_tensor(nonneg_qp(a_np, q_np[r]), device=a.device)
            except np.linalg.LinAlgError as e:
                raise RuntimeError(
                    f"{who}: singular Gramian in the QP; use reg_eps > 0 (default 1e-4)"
                ) from e
    return x_all


def dual_cone_tensors(
    gramian: Tensor, pref: Tensor | None, norm_eps: float, reg_eps: float, name: str
) -> tuple[Tensor, Tensor]:
    """As :func:`dual_cone_problem`, as float64 tensors on ``G``'s device (one host read: the
    finiteness and trace checks)."""
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square Gramian [m, m], got {tuple(gramian.shape)}")
    m = gramian.shape[0]
    g = gramian.detach().to(torch.float64)
    g = 0.5 * (g + g.T)
    p = (
        torch.ones(m, dtype=torch.float64, device=g.device)
        if pref is None
        else pref.detach().to(device=g.device, dtype=torch.float64).reshape(-1)
    )
    if p.shape[0] != m:
        raise ValueError(f"pref has {p.shape[0]} entries for {m} tasks")
    finite, tr = torch.stack([torch.isfinite(g).all().to(torch.float64), g.trace()]).tolist()
    if not finite:
        raise ValueError(f"{name}: the Gramian has non-finite entries")
    a = g / tr if tr > norm_eps else torch.zeros_like(g)
    return a + reg_eps * torch.eye(m, dtype=torch.float64, device=g.device), p


def upgrad_weights(
    gramian: Tensor,
    pref: Tensor | None = None,
    *,
    norm_eps: float = 0.0,
    reg_eps: float = 1e-4,
) -> Tensor:
    """UPGrad weights ``w = Σ_i v_i`` (``[m]``, float64) for the Gramian ``G`` (``[m, m]``).

    ``v_i = argmin_{v ≥ p_i e_i} vᵀ G̃ v`` with ``G̃ = G/trace(G) + reg_eps·I`` (``G̃ = reg_eps·I``
    when ``trace(G) ≤ norm_eps``). ``pref`` defaults to ones (the sum scale). The ``m`` QPs
    share ``G̃`` and are solved together (:func:`batched_nonneg_qp`), on ``G``'s device.
    """
    a, p = dual_cone_tensors(gramian, pref, norm_eps, reg_eps, "UPGrad")
    # problem i: x = v_i − u_i with u_i = p_i e_i, so q_i = G̃ u_i = p_i G̃[:, i] (row i, G̃ symmetric)
    x = batched_nonneg_qp(a, p[:, None] * a, who="UPGrad")
    return p + x.sum(0)


class DualConeAggregator(GramianAggregator):
    """Shared settings of the dual-cone methods (:class:`UPGrad`, :class:`DualProj`).

    Args:
        pref: optional preference vector ``[m]``, a tensor or a sequence (default all ones; see
            the module's scale note).
        norm_eps: a Gramian whose trace is ``≤ norm_eps`` is treated as zero (default 0; TorchJD
            uses 1e-4).
        reg_eps: ``reg_eps·I`` added to the trace-normalised Gramian (1e-4, as TorchJD).
        reduction: ``"sum"`` (default) or ``"mean"`` (TorchJD's scale).
    """

    # stateless in m: a missing-task step is the method on the present tasks' Gramian
    supports_missing_tasks = True

    host_sync = True

    def __init__(
        self,
        *,
        pref: Tensor | Sequence[float] | None = None,
        norm_eps: float = 0.0,
        reg_eps: float = 1e-4,
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if norm_eps < 0 or reg_eps < 0:
            raise ValueError(f"norm_eps and reg_eps must be ≥ 0, got {norm_eps}, {reg_eps}")
        if pref is None:
            self.pref: Tensor | None = None
        elif isinstance(pref, Tensor):
            self.pref = pref.detach().clone()
        else:
            self.pref = torch.as_tensor(pref, dtype=torch.float64)
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)
        # the QP sees G/trace(G): its weights do not depend on the scale, so d = Jᵀv has degree
        # 1, unless a Gramian below the absolute norm_eps is treated as zero
        self.homogeneity = 1 if self.norm_eps == 0 else None

    def hparams(self) -> dict[str, object]:
        return {
            "pref": None if self.pref is None else self.pref.tolist(),
            "norm_eps": self.norm_eps,
            "reg_eps": self.reg_eps,
            "reduction": self.reduction,
        }

    def _kernel(self, gramian: Tensor) -> Tensor:
        raise NotImplementedError

    def _weights(self, gramian: Tensor) -> Tensor:
        return self._kernel(gramian) * self._scale(gramian.shape[0])


class UPGrad(DualConeAggregator):
    """Unconflicting projection of gradients (sum of the dual-cone projections).

    Arguments as :class:`DualConeAggregator`.
    """

    def _kernel(self, gramian: Tensor) -> Tensor:
        return upgrad_weights(gramian, self.pref, norm_eps=self.norm_eps, reg_eps=self.reg_eps)
