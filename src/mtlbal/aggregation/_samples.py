"""Independent samples for the stochastic multi-objective methods (MoDo, SDMGrad).

Both methods update their task weights with the product ``∇F_ξᵀ ∇F_ξ'`` of the Jacobians of two
*independent* samples (mini-batches) ``ξ``, ``ξ'``: with one batch, ``J Jᵀ`` is a biased estimate
of the Gramian of the expected gradients, which breaks the methods' convergence guarantees.
Inside a :class:`~mtlbal.Balancer` the samples are ordinary tasks: give the Balancer the losses
of every task on every sample, sample-major (all tasks of sample 0, then of sample 1, …), e.g.
with :func:`stack_samples`. The Balancer then forms the Gramian of all ``k·m`` rows; its
off-diagonal block ``[0:m, m:2m]`` is the cross matrix ``J₀ J₁ᵀ``.

This module holds the pieces both methods share: the layout check, the cross block, the
spreading of the task weights over the samples' rows, and the Euclidean projection onto the
probability simplex.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtlbal.step import StepContext

__all__ = ["cross_block", "project_simplex", "spread_weights", "stack_samples"]

SEP = "@"


def stack_samples(*samples: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The losses of ``k`` independent samples as one dict for the Balancer, sample-major.

    Each argument maps the task names to their losses on one sample (mini-batch); every sample
    must have the same tasks. The result maps ``f"{task}@{s}"`` to the loss of ``task`` on
    sample ``s``, all tasks of sample 0 first (in the first sample's order), then sample 1, …
    — the layout :class:`MoDo` and :class:`SDMGrad` (``samples=k``) expect and check.

    Example:
        >>> import torch
        >>> a, b = torch.tensor(1.0), torch.tensor(2.0)
        >>> list(stack_samples({"seg": a, "depth": b}, {"seg": a, "depth": b}))
        ['seg@0', 'depth@0', 'seg@1', 'depth@1']
    """
    if len(samples) < 2:
        raise ValueError(f"stack_samples: expected at least 2 samples, got {len(samples)}")
    names = list(samples[0])
    if not names:
        raise ValueError("stack_samples: sample 0 has no task")
    out: dict[str, Tensor] = {}
    for s, sample in enumerate(samples):
        if sorted(sample) != sorted(names):
            raise ValueError(
                f"stack_samples: sample {s} has tasks {sorted(sample)}, sample 0 has "
                f"{sorted(names)}"
            )
        for t in names:
            if SEP in t:
                raise ValueError(f"stack_samples: task name {t!r} contains {SEP!r}")
            out[f"{t}{SEP}{s}"] = sample[t]
    return out


def check_samples(samples: int, who: str) -> int:
    """``samples`` must be 1, 2 or 3."""
    if isinstance(samples, bool) or samples not in (1, 2, 3):
        raise ValueError(f"{who}: samples must be 1, 2 or 3, got {samples!r}")
    return int(samples)


def check_layout(n_rows: int, samples: int, ctx: StepContext | None, who: str) -> int:
    """The number of tasks ``m`` (``n_rows = samples · m``), after checking the layout.

    With task names in ``ctx`` (inside a Balancer) and ``samples > 1``, row ``s·m + t`` must be
    ``f"{task_t}@{s}"`` with the same ``task_t`` in every sample (what :func:`stack_samples`
    builds); a clear ``ValueError`` otherwise.
    """
    if n_rows % samples:
        raise ValueError(
            f"{who}: {n_rows} rows cannot be {samples} samples of the same tasks "
            "(expected samples × tasks rows, sample-major; see stack_samples)"
        )
    m = n_rows // samples
    tasks = None if ctx is None else ctx.tasks
    if samples == 1 or tasks is None:
        return m
    base = []
    for t in range(m):
        name = tasks[t]
        if not name.endswith(f"{SEP}0"):
            raise ValueError(
                f"{who}: with samples={samples} the tasks must be named 'task@s', sample-major "
                f"(use mtlbal.aggregation.stack_samples); task {name!r} is in position {t}"
            )
        base.append(name[: -len(SEP) - 1])
    for s in range(1, samples):
        for t in range(m):
            want = f"{base[t]}{SEP}{s}"
            if tasks[s * m + t] != want:
                raise ValueError(
                    f"{who}: expected task {want!r} in position {s * m + t} (samples={samples}, "
                    f"sample-major: every sample lists the same tasks in the same order), got "
                    f"{tasks[s * m + t]!r}"
                )
    return m


def cross_block(gramian: Tensor, samples: int, m: int) -> Tensor:
    """The matrix the weight update uses: ``J₀ J₁ᵀ`` (rows of sample 0 times those of sample 1)
    for ``samples ≥ 2``, the Gramian itself for ``samples = 1``."""
    if samples == 1:
        return gramian
    return gramian[:m, m : 2 * m]


def spread_weights(w: Tensor, samples: int) -> Tensor:
    """Weights of the ``samples · m`` rows from the task weights ``w`` ``[m]``.

    ``samples = 1``: ``w``. ``samples = 2``: ``w / 2`` on both samples (the update is the task
    weights applied to the mean of the two samples' gradients). ``samples = 3``: ``w`` on the
    last sample (``ζ``, independent of the two that chose ``w``), zero on the first two.
    """
    if samples == 1:
        return w
    if samples == 2:
        return torch.cat([w / 2, w / 2])
    return torch.cat([torch.zeros_like(w)] * (samples - 1) + [w])


def project_simplex(y: Tensor) -> Tensor:
    """Euclidean projection of ``y`` ``[m]`` onto the probability simplex ``{x ≥ 0, Σx = 1}``.

    Sort-based (Held, Wolfe & Crowder 1974; Duchi et al. 2008): with ``u`` sorted decreasingly,
    ``ρ = max{j : u_j > (Σ_{i≤j} u_i − 1)/j}`` and ``θ = (Σ_{i≤ρ} u_i − 1)/ρ``, the projection
    is ``max(y − θ, 0)``. Branch-free (no host sync).
    """
    u = torch.sort(y, descending=True).values
    css = torch.cumsum(u, 0) - 1
    k = torch.arange(1, y.shape[0] + 1, dtype=y.dtype, device=y.device)
    rho = (u * k > css).sum() - 1  # the condition holds on a prefix; ρ ≥ 0 always
    theta = css.gather(0, rho.reshape(1)) / (rho + 1).to(y.dtype)
    return (y - theta).clamp_min(0)


def check_pref(pref: Sequence[float] | Tensor | None, who: str) -> Tensor | None:
    """A preference vector as a finite float64 tensor (``None`` stays ``None``)."""
    if pref is None:
        return None
    p = torch.as_tensor(pref, dtype=torch.float64).detach().clone().reshape(-1)
    if p.numel() == 0 or not bool(torch.isfinite(p).all()):
        raise ValueError(f"{who}: pref must be a non-empty finite vector, got {p.tolist()}")
    return p
