"""Gradient engines: how per-task gradients of the shared part are formed."""

from mtlbal.engine.base import PerTaskGrads
from mtlbal.engine.dense import CutPerTaskGrads, DensePerTaskGrads, batched_grads
from mtlbal.engine.layerwise import (
    LayerwiseCapture,
    LayerwisePerTaskGrads,
    layerwise_per_task_grads,
)

__all__ = [
    "CutPerTaskGrads",
    "DensePerTaskGrads",
    "LayerwiseCapture",
    "LayerwisePerTaskGrads",
    "PerTaskGrads",
    "batched_grads",
    "layerwise_per_task_grads",
]
