"""Pure kernels: tensor in, tensor out, no state, no hooks. Each lives beside its class."""

from mtlbal.aggregation.mgda import mgda_weights, min_norm_2
from mtlbal.aggregation.pcgrad import pcgrad_weights
from mtlbal.transforms.branch_calibration import branch_norms, calibrate_branch_grads
from mtlbal.transforms.sparse_mask import global_mask, psn_mask
from mtlbal.weighting.gradnorm import gradnorm_loss
from mtlbal.weighting.uncertainty import uncertainty_objectives

__all__ = [
    "branch_norms",
    "calibrate_branch_grads",
    "global_mask",
    "gradnorm_loss",
    "mgda_weights",
    "min_norm_2",
    "pcgrad_weights",
    "psn_mask",
    "uncertainty_objectives",
]
