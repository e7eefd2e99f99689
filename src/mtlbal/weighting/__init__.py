"""Loss-level strategies: ``L [m] → w [m]`` (and per-task objectives for the Balancer)."""

from mtlbal.weighting.base import Equal, LossContext, LossWeighting, WeightedLosses
from mtlbal.weighting.dwa import DWA
from mtlbal.weighting.famo import FAMO
from mtlbal.weighting.gradnorm import GradNorm
from mtlbal.weighting.igb import IGB
from mtlbal.weighting.rlw import RLW
from mtlbal.weighting.uncertainty import UncertaintyWeighting

__all__ = [
    "DWA",
    "FAMO",
    "IGB",
    "RLW",
    "Equal",
    "GradNorm",
    "LossContext",
    "LossWeighting",
    "UncertaintyWeighting",
    "WeightedLosses",
]
