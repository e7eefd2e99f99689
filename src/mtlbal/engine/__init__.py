"""Gradient engines: how per-task gradients of the shared part are formed."""

from mtlbal.engine.base import GradWrites, PerTaskGrads
from mtlbal.engine.cut import CutPerTaskGrads, CutPoint
from mtlbal.engine.dense import DensePerTaskGrads, batched_grads, per_task_grads
from mtlbal.engine.fallback import BatchedBackward, BatchedBackwardFallbackWarning
from mtlbal.engine.layerwise import (
    LayerwiseCapture,
    LayerwisePerTaskGrads,
    layerwise_per_task_grads,
)
from mtlbal.engine.report import EngineFallbackWarning

__all__ = [
    "BatchedBackward",
    "BatchedBackwardFallbackWarning",
    "CutPerTaskGrads",
    "CutPoint",
    "DensePerTaskGrads",
    "EngineFallbackWarning",
    "GradWrites",
    "LayerwiseCapture",
    "LayerwisePerTaskGrads",
    "PerTaskGrads",
    "batched_grads",
    "layerwise_per_task_grads",
    "per_task_grads",
]
