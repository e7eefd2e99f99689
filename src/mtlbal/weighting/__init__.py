"""Loss-level strategies: ``L [m] → w [m]`` (and per-task objectives for the Balancer)."""

from mtlbal.weighting.base import Equal, LossContext, LossWeighting, WeightedLosses
from mtlbal.weighting.cosmos import COSMOS
from mtlbal.weighting.dwa import DWA
from mtlbal.weighting.famo import FAMO
from mtlbal.weighting.go4align import GO4Align
from mtlbal.weighting.gradnorm import GradNorm
from mtlbal.weighting.igb import IGB
from mtlbal.weighting.ldc_mtl import LDCMTL
from mtlbal.weighting.pbi import PBI
from mtlbal.weighting.rlw import RLW
from mtlbal.weighting.uncertainty import UncertaintyWeighting

__all__ = [
    "COSMOS",
    "DWA",
    "FAMO",
    "IGB",
    "LDCMTL",
    "PBI",
    "RLW",
    "Equal",
    "GO4Align",
    "GradNorm",
    "LossContext",
    "LossWeighting",
    "UncertaintyWeighting",
    "WeightedLosses",
]
