"""Pure kernels: tensor in, tensor out, no state, no hooks. Each lives beside its class."""

from mtlbal.aggregation.aligned_mtl import aligned_mtl_balance, aligned_mtl_weights
from mtlbal.aggregation.mgda import mgda_weights, min_norm_2
from mtlbal.aggregation.pcgrad import pcgrad_weights
from mtlbal.weighting.gradnorm import gradnorm_loss
from mtlbal.weighting.igb import igb_reward, igb_v1_weights
from mtlbal.weighting.uncertainty import uncertainty_objectives

__all__ = [
    "aligned_mtl_balance",
    "aligned_mtl_weights",
    "gradnorm_loss",
    "igb_reward",
    "igb_v1_weights",
    "mgda_weights",
    "min_norm_2",
    "pcgrad_weights",
    "uncertainty_objectives",
]
