"""Gradient engines: how per-task gradients of the shared part are formed."""

from mtlbal.engine.base import GradWrites, PerTaskGrads
from mtlbal.engine.cut import CutPerTaskGrads, CutPoint
from mtlbal.engine.dense import DensePerTaskGrads, batched_grads
from mtlbal.engine.layerwise import (
    LayerwiseCapture,
    LayerwisePerTaskGrads,
    layerwise_per_task_grads,
)

__all__ = [
    "CutPerTaskGrads",
    "CutPoint",
    "DensePerTaskGrads",
    "GradWrites",
    "LayerwiseCapture",
    "LayerwisePerTaskGrads",
    "PerTaskGrads",
    "batched_grads",
    "layerwise_per_task_grads",
]
