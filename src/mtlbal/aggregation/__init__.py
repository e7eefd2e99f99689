"""Gradient-level strategies: ``J [m, n] → g [n]``; Gramian ones give ``weights(G) → [m]``."""

from mtlbal.aggregation._samples import stack_samples
from mtlbal.aggregation.aligned_mtl import AlignedMTL
from mtlbal.aggregation.base import Aggregator, GramianAggregator, check_gramian, check_jacobian
from mtlbal.aggregation.cagrad import CAGrad
from mtlbal.aggregation.conflict_free import ConFIG
from mtlbal.aggregation.constant import Constant
from mtlbal.aggregation.cr_mogm import CRMOGM
from mtlbal.aggregation.dbmtl import DBMTL
from mtlbal.aggregation.dualproj import DualProj
from mtlbal.aggregation.excess_mtl import ExcessMTL
from mtlbal.aggregation.fairgrad import FairGrad, FairGradSolverWarning
from mtlbal.aggregation.fmtl import FMTL
from mtlbal.aggregation.graddrop import GradDrop
from mtlbal.aggregation.gradvac import GradVac
from mtlbal.aggregation.imtl import IMTLG
from mtlbal.aggregation.krum import Krum
from mtlbal.aggregation.mean import Mean
from mtlbal.aggregation.mgda import MGDA, MGDASolverWarning
from mtlbal.aggregation.moco import MoCo
from mtlbal.aggregation.modo import MoDo
from mtlbal.aggregation.momentum_config import MConFIG
from mtlbal.aggregation.nash_mtl import NashMTL
from mtlbal.aggregation.pcd import PCD, PCDInfeasibleWarning
from mtlbal.aggregation.pcgrad import PCGrad
from mtlbal.aggregation.random import Random
from mtlbal.aggregation.sdmgrad import SDMGrad
from mtlbal.aggregation.sum import Sum
from mtlbal.aggregation.trimmed_mean import TrimmedMean
from mtlbal.aggregation.upgrad import UPGrad

__all__ = [
    "CRMOGM",
    "DBMTL",
    "FMTL",
    "IMTLG",
    "MGDA",
    "PCD",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "Constant",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "FairGradSolverWarning",
    "GradDrop",
    "GradVac",
    "GramianAggregator",
    "Krum",
    "MConFIG",
    "MGDASolverWarning",
    "Mean",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCDInfeasibleWarning",
    "PCGrad",
    "Random",
    "SDMGrad",
    "Sum",
    "TrimmedMean",
    "UPGrad",
    "check_gramian",
    "check_jacobian",
    "stack_samples",
]
