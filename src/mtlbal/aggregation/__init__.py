"""Gradient-level strategies: ``J [m, n] → g [n]``; Gramian ones give ``weights(G) → [m]``."""

from mtlbal.aggregation.aligned_mtl import AlignedMTL
from mtlbal.aggregation.base import Aggregator, GramianAggregator
from mtlbal.aggregation.mgda import MGDA
from mtlbal.aggregation.pcgrad import PCGrad

__all__ = ["MGDA", "Aggregator", "AlignedMTL", "GramianAggregator", "PCGrad"]
