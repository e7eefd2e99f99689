"""Loss-level strategies: ``L [m] → w [m]`` (and per-task objectives for the Balancer)."""

from mtlbal.weighting.base import Equal, LossContext, LossWeighting, WeightedLosses
from mtlbal.weighting.coba import CoBa
from mtlbal.weighting.cosmos import COSMOS
from mtlbal.weighting.dwa import DWA
from mtlbal.weighting.famo import FAMO
from mtlbal.weighting.geometric_mean import GeometricMean
from mtlbal.weighting.go4align import GO4Align
from mtlbal.weighting.gradnorm import GradNorm
from mtlbal.weighting.igb import IGB
from mtlbal.weighting.imtl_l import IMTLL
from mtlbal.weighting.ldc_mtl import LDCMTL
from mtlbal.weighting.med_grpo import MedGRPO
from mtlbal.weighting.mt_grpo import MTGRPO, RatioPreservingSampler
from mtlbal.weighting.pbi import PBI
from mtlbal.weighting.rlw import RLW
from mtlbal.weighting.scale_invariant import ScaleInvariant
from mtlbal.weighting.stch import STCH
from mtlbal.weighting.uncertainty import UncertaintyWeighting
from mtlbal.weighting.uw_so import UWSO
from mtlbal.weighting.visatb import VisATB

__all__ = [
    "COSMOS",
    "DWA",
    "FAMO",
    "IGB",
    "IMTLL",
    "LDCMTL",
    "MTGRPO",
    "PBI",
    "RLW",
    "STCH",
    "UWSO",
    "CoBa",
    "Equal",
    "GO4Align",
    "GeometricMean",
    "GradNorm",
    "LossContext",
    "LossWeighting",
    "MedGRPO",
    "RatioPreservingSampler",
    "ScaleInvariant",
    "UncertaintyWeighting",
    "VisATB",
    "WeightedLosses",
]
