"""FULLER-style multi-level gradient calibration (Huang et al., ICCV 2023, arXiv:2307.16617).

FULLER trains one multi-modal backbone (camera and LiDAR branches, fused) for several tasks and
calibrates gradients at two levels:

1. **Task level** ("inter-gradient calibration"): the per-task gradients produced by the heads
   are combined at the backbone's last layer. Here: a cut point at the trunk's output ``z``
   (``Z_t = ∂ℓ_t/∂z``, ``[m, *z.shape]``) combined by a configurable aggregator, then one
   backward through the trunk with the combined gradient.
2. **Modality level** ("intra-gradient calibration"): before that calibrated gradient enters the
   modality branches, the gradients at the branch outputs ``f_k`` are brought to one norm,
   ``g_k ← g_k·τ/‖g_k‖`` with ``τ`` the mean of the branch norms (or max, min, a fixed value);
   see :mod:`mtlbal.transforms.branch_calibration`.

**Documented choices, not the paper's published rule.** The paper's text available to us (the
abstract and the Fig. 2 caption; no code was released) does not give the task-level rule, the
magnitude target or the norm granularity. This preset defaults to

* task level: :class:`~mtlbal.aggregation.PCGrad` at the trunk output. It removes exactly the
  conflicting components between task gradients (the paper's stated aim at this level), and it
  reduces to the plain sum (equal weighting) when the tasks do not conflict, so the preset
  never rescales a conflict-free update. Any aggregator can be passed instead (``MGDA()`` gives
  MGDA-UB at the cut, ``AlignedMTL()`` Aligned-MTL-UB);
* modality level: the mean of the branch norms, batch-level norms (``per_sample=True`` for
  per-sample norms).

Cost: one batched backward through the heads (``m`` tasks), one backward through the trunk to
the branch outputs, one backward into the branches; no host sync beyond the aggregator's own
(PCGrad: none).

Example:
    >>> import torch, mtlbal
    >>> cam, lid = torch.nn.Linear(3, 4), torch.nn.Linear(5, 4)
    >>> fuse = torch.nn.Linear(8, 6)
    >>> heads = torch.nn.ModuleList([torch.nn.Linear(6, 1) for _ in range(2)])
    >>> b = fuller([cam, lid, fuse], task_cut=fuse, branches=[cam, lid])
    >>> z = fuse(torch.cat([cam(torch.randn(4, 3)), lid(torch.randn(4, 5))], 1))
    >>> info = b.backward([heads[0](z).pow(2).mean(), heads[1](z).mean()])
    >>> n = info.extras["branch_norms"]             # before calibration; after: both equal
    >>> n.shape
    torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from mtlbal.aggregation.base import Aggregator
from mtlbal.aggregation.pcgrad import PCGrad
from mtlbal.balancer import Balancer
from mtlbal.transforms.branch_calibration import BranchCalibration, Target
from mtlbal.weighting.base import LossWeighting

__all__ = ["fuller", "fuller_modality_level", "fuller_task_level"]

SharedSpec = nn.Module | Iterable[nn.Module] | Iterable[Tensor]


def fuller(
    shared: SharedSpec,
    task_cut: nn.Module | None,
    branches: Sequence[nn.Module] | None,
    *,
    aggregator: Aggregator | None = None,
    target: Target = "mean",
    per_sample: bool = False,
    weighting: LossWeighting | None = None,
    seed: int | None = 0,
    **balancer_kwargs: Any,
) -> Balancer:
    """A Balancer for FULLER-style calibration (see the module docstring).

    Args:
        shared: the backbone (branches, fusion and trunk), as for :class:`~mtlbal.Balancer`.
        task_cut: the module whose output is the trunk's last representation (the task-level
            cut point), downstream of the fusion; ``None``: modality level only.
        branches: the modality branch modules (two or more, each returning one tensor that
            the fusion consumes); ``None``: task level only.
        aggregator: the task-level rule; default ``PCGrad(seed=seed)``.
        target: the modality-level norm target: ``"mean"`` (default), ``"max"``, ``"min"``
            or a fixed norm.
        per_sample: per-sample norms at the modality level (default batch-level).
        weighting: an optional loss weighting applied before both levels.
        seed: seed of the default PCGrad.
        **balancer_kwargs: passed to :class:`~mtlbal.Balancer` (``transforms``,
            ``diagnostics``, ``nonfinite``, …).
    """
    if task_cut is None and branches is None:
        raise ValueError("fuller needs a task-level cut point, modality branches, or both")
    if task_cut is None and aggregator is not None:
        raise ValueError(
            "a task-level aggregator needs the task-level cut point (task_cut=the trunk's "
            "last layer)"
        )
    calib = (
        None
        if branches is None
        else BranchCalibration(list(branches), target=target, per_sample=per_sample)
    )
    if task_cut is not None and aggregator is None:
        aggregator = PCGrad(seed=seed)
    return Balancer(
        shared,
        weighting=weighting,
        aggregator=aggregator,
        at="params" if task_cut is None else task_cut,
        branches=calib,
        **balancer_kwargs,
    )


def fuller_task_level(
    shared: SharedSpec,
    task_cut: nn.Module,
    *,
    aggregator: Aggregator | None = None,
    **kwargs: Any,
) -> Balancer:
    """Task level only: ``aggregator`` (default PCGrad) at the cut point ``task_cut``."""
    return fuller(shared, task_cut, None, aggregator=aggregator, **kwargs)


def fuller_modality_level(
    shared: SharedSpec,
    branches: Sequence[nn.Module],
    *,
    target: Target = "mean",
    per_sample: bool = False,
    **kwargs: Any,
) -> Balancer:
    """Modality level only: the gradient of ``Σ_t ℓ_t`` is norm-matched across the branches."""
    return fuller(shared, None, branches, target=target, per_sample=per_sample, **kwargs)
