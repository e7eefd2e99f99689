"""Gradient-level strategies: ``J [m, n] → g [n]``; Gramian ones give ``weights(G) → [m]``."""

from mtlbal.aggregation._samples import stack_samples
from mtlbal.aggregation.aligned_mtl import AlignedMTL
from mtlbal.aggregation.base import Aggregator, GramianAggregator, check_gramian, check_jacobian
from mtlbal.aggregation.cagrad import CAGrad
from mtlbal.aggregation.dualproj import DualProj
from mtlbal.aggregation.gradvac import GradVac
from mtlbal.aggregation.imtl import IMTLG
from mtlbal.aggregation.mgda import MGDA, MGDASolverWarning
from mtlbal.aggregation.modo import MoDo
from mtlbal.aggregation.nash_mtl import NashMTL
from mtlbal.aggregation.pcd import PCD, PCDInfeasibleWarning
from mtlbal.aggregation.pcgrad import PCGrad
from mtlbal.aggregation.sdmgrad import SDMGrad
from mtlbal.aggregation.upgrad import UPGrad

__all__ = [
    "IMTLG",
    "MGDA",
    "PCD",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "DualProj",
    "GradVac",
    "GramianAggregator",
    "MGDASolverWarning",
    "MoDo",
    "NashMTL",
    "PCDInfeasibleWarning",
    "PCGrad",
    "SDMGrad",
    "UPGrad",
    "check_gramian",
    "check_jacobian",
    "stack_samples",
]
