"""Modality-level gradient calibration: bring the gradients entering modality branches to one norm.

The modality half of FULLER-style multi-level calibration (Huang et al., "FULLER: Unified
Multi-modality Multi-task 3D Perception via Multi-level Gradient Calibration", ICCV 2023,
arXiv:2307.16617). For ``K ≥ 1`` branch outputs ``f_1 … f_K`` whose gradients (after the
task-level combined gradient went through the fusion and the trunk) are ``g_k = ∂ℓ/∂f_k``:

    n_k = ‖g_k‖                                      (batch level: over the whole tensor)
    τ   = mean{n_k : n_k > 0}  (or max, min, or a fixed value)
    g_k ← g_k · τ / n_k        (g_k = 0 stays 0)

so every branch receives a gradient of norm ``τ``, whatever module fused them (concatenation,
sum, attention, …). With ``per_sample=True`` the norms are taken per sample over the non-batch
dimensions (``n_k`` has shape ``[B]``) and every sample is matched separately (the branches must
then share the leading batch dimension).

The paper states only that the gradient magnitudes are "calibrated again to the same level"
before entering the modality branches; the target (mean of the branch norms) and the
granularity (batch) are documented choices of this library, not the paper's published rule.

No host sync: the zero-norm case is handled with ``torch.where``.

Shapes: ``grads`` is a list of ``K`` tensors of any shapes (batch level), or with a common
leading dimension ``B`` (per sample). Norms are computed in at least float32.

Example:
    >>> import torch
    >>> a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])
    >>> out = calibrate_branch_grads([a, b])        # norms 5 and 1 → both 3
    >>> [round(float(o.norm()), 4) for o in out]
    [3.0, 3.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["BranchCalibration", "Target", "branch_norms", "calibrate_branch_grads"]

Target = Literal["mean", "max", "min"] | float


def _norm_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def branch_norms(grads: Sequence[Tensor], *, per_sample: bool = False) -> Tensor:
    """Norms of the branch gradients: ``[K]`` (batch level) or ``[K, B]`` (per sample)."""
    if not grads:
        raise ValueError("no branch gradient was given")
    dt = _norm_dtype(grads[0])
    if per_sample:
        sizes = {int(g.shape[0]) if g.dim() > 0 else -1 for g in grads}
        if len(sizes) != 1 or -1 in sizes:
            raise ValueError(
                "per-sample calibration needs branch outputs with a common leading batch "
                f"dimension, got shapes {[tuple(g.shape) for g in grads]}"
            )
        return torch.stack([g.to(dt).reshape(g.shape[0], -1).norm(dim=1) for g in grads])
    return torch.stack([g.to(dt).norm() for g in grads])


def _target(norms: Tensor, target: Target) -> Tensor:
    """Common norm ``τ`` over the branch axis (dim 0) of ``norms``; zero norms are ignored."""
    live = norms > 0
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        if not target >= 0:
            raise ValueError(f"a fixed target norm must be ≥ 0, got {target}")
        return torch.full_like(norms[0], float(target))
    if target == "mean":
        count = live.sum(0).clamp_min(1).to(norms.dtype)
        return norms.sum(0) / count
    if target == "max":
        return norms.amax(0)
    if target == "min":
        inf = torch.full_like(norms, float("inf"))
        low = torch.where(live, norms, inf).amin(0)
        return torch.where(torch.isinf(low), torch.zeros_like(low), low)
    raise ValueError(f"target must be 'mean', 'max', 'min' or a number ≥ 0, got {target!r}")


def calibrate_branch_grads(
    grads: Sequence[Tensor],
    *,
    target: Target = "mean",
    per_sample: bool = False,
    norms: Tensor | None = None,
) -> list[Tensor]:
    """Rescale every branch gradient to the common norm ``τ`` (see the module docstring).

    Args:
        grads: the gradients at the ``K`` branch outputs.
        target: ``"mean"`` (default) / ``"max"`` / ``"min"`` of the non-zero branch norms, or a
            fixed norm ``≥ 0``.
        per_sample: norms per sample (leading dimension) instead of per batch.
        norms: the branch norms to use instead of those of ``grads`` (``[K]``, or ``[K, n]``
            per sample): under DDP, the norms of the global gradient.

    Returns:
        the rescaled gradients, same shapes and dtypes; an all-zero gradient stays zero.
    """
    if norms is None:
        norms = branch_norms(grads, per_sample=per_sample)
    tau = _target(norms, target)
    tiny = torch.finfo(norms.dtype).tiny
    scale = torch.where(norms > 0, tau / norms.clamp_min(tiny), torch.zeros_like(norms))
    out = []
    for g, s in zip(grads, scale):
        if per_sample:
            s = s.reshape(-1, *([1] * (g.dim() - 1)))
        out.append((g.to(s.dtype) * s).to(g.dtype))
    return out


class BranchCalibration:
    """Configuration of the modality level: which branch modules, which target, which norm.

    Pass it (or just the list of branch modules, for the defaults) to
    ``Balancer(..., branches=...)``. The Balancer captures each branch's output (a detached
    leaf replaces it in the forward, as at a cut point); after the task-level combined
    gradient has gone through the fusion and the rest of the trunk, the gradients at the
    branch outputs are rescaled by :func:`calibrate_branch_grads` and backpropagated into
    each branch.

    Args:
        modules: two or more branch modules (each must return one tensor).
        target: ``"mean"`` (default), ``"max"``, ``"min"`` or a fixed norm.
        per_sample: per-sample norms instead of batch-level ones (default ``False``).

    If a branch module runs several times between two backward calls, all its captured outputs
    count as one branch (batch level: one norm over all of them; per sample: the k-th captures
    of every branch are matched together, so every branch must run the same number of times).
    """

    def __init__(
        self,
        modules: Sequence[torch.nn.Module],
        *,
        target: Target = "mean",
        per_sample: bool = False,
    ) -> None:
        mods = list(modules)
        if len(mods) < 2:
            raise ValueError(f"modality calibration needs at least two branches, got {len(mods)}")
        if not all(isinstance(m, torch.nn.Module) for m in mods):
            raise TypeError("branches must be nn.Module instances")
        if len({id(m) for m in mods}) != len(mods):
            raise ValueError("the same module is listed twice among the branches")
        _target(torch.ones(2), target)  # validate early
        self.modules = mods
        self.target: Target = target
        self.per_sample = bool(per_sample)

    def __call__(self, grads: Sequence[Tensor], norms: Tensor | None = None) -> list[Tensor]:
        return calibrate_branch_grads(
            grads, target=self.target, per_sample=self.per_sample, norms=norms
        )

    def __repr__(self) -> str:
        # the branches are modules of the model (shown by class name, not rebuilt by eval);
        # the other arguments are shown when they differ from their defaults
        names = ", ".join(type(m).__name__ for m in self.modules)
        extra = "" if self.target == "mean" else f", target={self.target!r}"
        extra += ", per_sample=True" if self.per_sample else ""
        return f"BranchCalibration([{names}]{extra})"
