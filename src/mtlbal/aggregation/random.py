"""Random — random weights at the shared part (Lin et al., "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022, arXiv:2111.10603, Algorithm 2).

Every step draws ``ε ~ N(0, I_m)`` and combines the task gradients with ``λ = softmax(ε)``:
``d = Jᵀ λ``. TorchJD's ``Random`` is ``reduction="mean"`` here (weights summing to 1); the
default ``reduction="sum"`` uses ``m·softmax(ε)`` (expected weight 1 per task, as ``Σ_t g_t``).

This is the paper's "random gradient weighting" (RGW); the loss-level variant is
:class:`mtlbal.weighting.RLW`. On the shared part both give ``Σ_t λ_t g_t``; they differ at the
heads: RLW scales head ``t``'s gradient by ``λ_t``, an aggregator leaves the heads' gradients raw.

Randomness: a CPU ``torch.Generator`` seeded by ``seed`` (TorchJD draws from the global RNG);
its state is part of ``state_dict``, so a resumed run draws the same weights. The draw is always
in float64 (the Gramian's dtype inside the Balancer), whatever the gradients' dtype.

Properties: positively homogeneous of degree 1 (the weights do not depend on the gradients);
not permutation equivariant (the draws follow the task order); no host sync (the draw is on the
CPU and copied to the device).

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> w = Random(seed=0).weights(J @ J.T)
    >>> round(float(w.sum()), 6)
    2.0
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbal.aggregation.base import GramianAggregator, Reduction

__all__ = ["Random", "random_weights"]


def random_weights(noise: Tensor, reduction: Reduction = "sum") -> Tensor:
    """``softmax(ε)`` (``reduction="mean"``) or ``m·softmax(ε)`` (``"sum"``); ``noise``: ``ε``."""
    w = torch.softmax(noise, dim=0)
    return w * noise.shape[0] if reduction == "sum" else w


class Random(GramianAggregator):
    """Random weights ``softmax(ε)``, ``ε ~ N(0, I)``, redrawn every step.

    Args:
        seed: seed of the generator (``None``: nondeterministic).
        reduction: ``"sum"`` (default, ``m·softmax(ε)``) or ``"mean"`` (``softmax(ε)``, TorchJD).
    """

    homogeneity = 1

    def __init__(self, *, seed: int | None = 0, reduction: Reduction = "sum") -> None:
        super().__init__(reduction)
        self.seed = seed
        self._gen = self.add_generator(seed)

    def hparams(self) -> dict[str, object]:
        return {"seed": self.seed, "reduction": self.reduction}

    def _weights(self, gramian: Tensor) -> Tensor:
        noise = torch.randn(gramian.shape[0], generator=self._gen, dtype=torch.float64)
        return random_weights(noise, self.reduction).to(gramian.device)

    @property
    def is_stateful(self) -> bool:
        return False  # the generator only: nothing tied to the task set
