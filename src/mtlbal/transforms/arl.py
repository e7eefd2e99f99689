"""ARL: per-modality gradient coefficients inversely proportional to each modality's variance.

Wei, Luo, Luo, "Improving Multimodal Learning via Imbalanced Learning" (ICCV 2025,
arXiv:2507.10203): Asymmetric Representation Learning. A bias-variance analysis of a fused
predictor shows that the best dependence on each modality is *imbalanced*: inversely
proportional to the variance of that modality's prediction. ARL adds, for each modality ``k``,
an auxiliary prediction from that modality's representation alone (sharing the fusion head's
parameters: no new parameters), trains it jointly with the multimodal loss (its bias term), and
re-weights the optimisation of each modality encoder by a coefficient from the unimodal
variances.

Here, for ``K`` modality branches with outputs ``f_k`` and auxiliary losses ``A_k`` (tasks of
the Balancer, e.g. ``{"fused": L, "aux_a": A_a, "aux_b": A_b}``)::

    v_k = A_k                                   (the unimodal variance estimate, detached)
    κ_k = (1 / v_k) / ((1/K) Σ_j 1 / v_j)       (inverse-variance, mean 1)
    ∂ℓ/∂f_k ← κ_k · ∂ℓ/∂f_k                     (the gradient entering branch k)

so the dependence ratio ``κ_a / κ_b = v_b / v_a`` is the inverse of the variance ratio, and
equal variances leave every gradient unchanged (the plain sum). The gradient at ``f_k`` is the
one of the whole objective (multimodal and auxiliary losses, after any task-level
combination), as in the official code, which scales it where the encoder's output leaves it.
This is the alternative to FULLER's modality-level magnitude *equalisation*
(:class:`~mtlbal.transforms.BranchCalibration`): it goes in the same ``branches=`` slot.

**Documented choices.** The official code (shicaiwei123/ICCV2025-ARL, ``main_arl_variance.py``
@51a9de33bb8a and ``models/backbone.py`` @0e851afb6ebc, read, not copied) differs from the
paper's statement, and this class follows the paper's:

* variance estimate: the code uses the mean entropy of each auxiliary softmax (normalised over
  the modalities, floored at 0.3) for classification; here ``v_k`` is the auxiliary loss itself:
  the mean squared error of an (asymptotically) unbiased unimodal regressor is its variance,
  and for classification its cross-entropy plays the entropy's role;
* coefficients: the code multiplies the inverse-entropy weights by the *other* modality's mean
  absolute logit, takes a softmax with temperature 8 and scales the encoder gradient by
  ``1 + w_k``, from epoch 5 on; here ``κ_k`` is the paper's inverse-variance ratio, from the
  first step (``eps`` floors ``v_k``).

No host sync; under DDP the auxiliary losses are the global ones, so every rank applies the same
``κ``. Shapes: ``variances`` ``[K]`` → ``κ`` ``[K]``.

Example:
    >>> import torch
    >>> arl_coefficients(torch.tensor([1.0, 3.0]))      # the noisier modality gets 1/3 of it
    tensor([1.5000, 0.5000])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlbal.transforms.branch_calibration import BranchCalibration

__all__ = ["ARL", "arl_coefficients"]


def arl_coefficients(variances: Tensor, *, eps: float = 1e-12) -> Tensor:
    """``κ_k = (1/v_k) / mean_j(1/v_j)``: inverse-variance coefficients with mean 1 (``[K]``).
    ``eps`` floors the variances (a zero variance would take every weight)."""
    if variances.dim() != 1 or variances.numel() < 2:
        raise ValueError(f"ARL needs [K ≥ 2] variances, got shape {tuple(variances.shape)}")
    inv = 1.0 / variances.clamp_min(eps)
    return inv / inv.mean()


class ARL(BranchCalibration):
    """ARL's modality re-weighting (see the module docstring); pass it as ``branches=``.

    Args:
        modules: the modality branch modules (two or more), as for
            :class:`~mtlbal.transforms.BranchCalibration`.
        aux_tasks: for each branch, the name of the task whose loss is that modality's
            auxiliary (unimodal) loss, in the order of ``modules``; those losses must be among
            the Balancer's tasks at every step (their weight in the objective is the loss
            weighting's: ``Equal`` gives the paper's ``L + Σ_k A_k``).
        eps: floor of the variances.

    Each step reports ``info.extras["branch_weights"]`` (``κ``, ``[K]``) and
    ``info.extras["branch_norms"]`` (the gradient norms at the branch outputs before scaling).

    Example:
        >>> import torch, mtlbal
        >>> ea, eb = torch.nn.Linear(3, 4), torch.nn.Linear(5, 4)
        >>> head = torch.nn.Linear(4, 1)                # shared by the fused and unimodal paths
        >>> b = mtlbal.Balancer([ea, eb, head], branches=ARL([ea, eb], aux_tasks=["a", "b"]))
        >>> fa, fb = ea(torch.randn(8, 3)), eb(torch.randn(8, 5))
        >>> y = torch.randn(8, 1)
        >>> info = b.backward({"fused": (head(fa + fb) - y).pow(2).mean(),
        ...                    "a": (head(fa) - y).pow(2).mean(),
        ...                    "b": (head(fb) - y).pow(2).mean()})
        >>> info.extras["branch_weights"].shape
        torch.Size([2])
    """

    def __init__(
        self, modules: Sequence[nn.Module], aux_tasks: Sequence[str], *, eps: float = 1e-12
    ) -> None:
        super().__init__(modules)
        names = [str(n) for n in aux_tasks]
        if len(names) != len(self.modules):
            raise ValueError(
                f"ARL: {len(names)} auxiliary tasks for {len(self.modules)} modality branches "
                "(one auxiliary loss per branch, in the same order)"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"ARL: an auxiliary task is listed twice: {names}")
        if not eps > 0:
            raise ValueError(f"ARL: eps must be > 0, got {eps}")
        self.aux_tasks = names
        self.eps = float(eps)

    def coefficients(self, losses: Mapping[str, Tensor]) -> Tensor:
        """``κ`` ``[K]`` from the step's (detached, global) losses by task name."""
        missing = [n for n in self.aux_tasks if n not in losses]
        if missing:
            raise ValueError(
                f"ARL: the auxiliary task(s) {missing} have no loss in this step (got "
                f"{sorted(losses)}); every modality's auxiliary loss is needed at every step"
            )
        v = torch.stack([losses[n].detach() for n in self.aux_tasks])
        return arl_coefficients(v.to(torch.promote_types(v.dtype, torch.float32)), eps=self.eps)

    def __repr__(self) -> str:
        names = ", ".join(type(m).__name__ for m in self.modules)
        extra = "" if self.eps == 1e-12 else f", eps={self.eps!r}"
        return f"ARL([{names}], aux_tasks={self.aux_tasks!r}{extra})"
