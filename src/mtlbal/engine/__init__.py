"""Gradient engines: how per-task gradients of the shared part are formed."""

from mtlbal.engine.base import PerTaskGrads
from mtlbal.engine.dense import CutPerTaskGrads, DensePerTaskGrads, batched_grads

__all__ = ["CutPerTaskGrads", "DensePerTaskGrads", "PerTaskGrads", "batched_grads"]
