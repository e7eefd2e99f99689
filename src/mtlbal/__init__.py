"""mtlbal — multi-task loss and gradient balancing for PyTorch.

>>> import mtlbal
>>> sorted(n for n in ("Balancer", "wrap", "weighting", "aggregation") if hasattr(mtlbal, n))
['Balancer', 'aggregation', 'weighting', 'wrap']
"""

from mtlbal import aggregation, diagnostics, engine, functional, presets, transforms, weighting
from mtlbal import logging as logging  # not in __all__: a star import would shadow stdlib logging
from mtlbal.balancer import Balancer, StepInfo
from mtlbal.optim import BalancedOptimizer, wrap
from mtlbal.step import Need, StepContext

__version__ = "0.1.0"

__all__ = [
    "BalancedOptimizer",
    "Balancer",
    "Need",
    "StepContext",
    "StepInfo",
    "__version__",
    "aggregation",
    "diagnostics",
    "engine",
    "functional",
    "presets",
    "transforms",
    "weighting",
    "wrap",
]
