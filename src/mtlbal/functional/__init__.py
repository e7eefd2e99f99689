"""Pure kernels: tensor in, tensor out, no state, no hooks. Each lives beside its class."""

from mtlbal.aggregation.aligned_mtl import aligned_mtl_balance, aligned_mtl_weights
from mtlbal.aggregation.cagrad import cagrad_weights
from mtlbal.aggregation.conflict_free import config_direction
from mtlbal.aggregation.constant import constant_weights
from mtlbal.aggregation.cr_mogm import crmogm_update
from mtlbal.aggregation.dbmtl import dbmtl_step
from mtlbal.aggregation.dualproj import dualproj_weights
from mtlbal.aggregation.excess_mtl import excess_mtl_step
from mtlbal.aggregation.fairgrad import fairgrad_weights
from mtlbal.aggregation.fmtl import fmtl_direction, sam_perturbation
from mtlbal.aggregation.graddrop import graddrop
from mtlbal.aggregation.gradvac import gradvac_weights
from mtlbal.aggregation.imtl import imtlg_weights
from mtlbal.aggregation.krum import krum_weights
from mtlbal.aggregation.mean import mean_weights
from mtlbal.aggregation.mgda import mgda_weights, min_norm_2
from mtlbal.aggregation.moco import moco_step, project_simplex
from mtlbal.aggregation.modo import modo_step
from mtlbal.aggregation.momentum_config import mconfig_step
from mtlbal.aggregation.nash_mtl import nash_mtl_weights
from mtlbal.aggregation.pcd import pcd_qp, pcd_weights
from mtlbal.aggregation.pcgrad import pcgrad_weights
from mtlbal.aggregation.random import random_weights
from mtlbal.aggregation.sdmgrad import sdmgrad_step
from mtlbal.aggregation.sum import sum_weights
from mtlbal.aggregation.trimmed_mean import trimmed_mean
from mtlbal.aggregation.upgrad import upgrad_weights
from mtlbal.transforms.arl import arl_coefficients
from mtlbal.transforms.branch_calibration import branch_norms, calibrate_branch_grads
from mtlbal.transforms.sparse_mask import global_mask, psn_mask
from mtlbal.weighting.cosmos import cosmos_weights
from mtlbal.weighting.dwa import dwa_weights
from mtlbal.weighting.famo import famo_logit_grad, famo_objectives
from mtlbal.weighting.geometric_mean import geometric_mean_weights
from mtlbal.weighting.go4align import go4align_indicators, go4align_weights, kmeans_1d
from mtlbal.weighting.gradnorm import gradnorm_loss
from mtlbal.weighting.igb import igb_reward, igb_v1_weights
from mtlbal.weighting.imtl_l import imtl_l_objectives
from mtlbal.weighting.ldc_mtl import ldc_mtl_grad, ldc_mtl_loss
from mtlbal.weighting.pbi import pbi_weights
from mtlbal.weighting.rlw import rlw_weights
from mtlbal.weighting.scale_invariant import scale_invariant_objectives
from mtlbal.weighting.stch import stch_scalarization, stch_weights
from mtlbal.weighting.uncertainty import uncertainty_objectives
from mtlbal.weighting.uw_so import uw_so_weights

__all__ = [
    "aligned_mtl_balance",
    "aligned_mtl_weights",
    "arl_coefficients",
    "branch_norms",
    "cagrad_weights",
    "calibrate_branch_grads",
    "config_direction",
    "constant_weights",
    "cosmos_weights",
    "crmogm_update",
    "dbmtl_step",
    "dualproj_weights",
    "dwa_weights",
    "excess_mtl_step",
    "fairgrad_weights",
    "famo_logit_grad",
    "famo_objectives",
    "fmtl_direction",
    "geometric_mean_weights",
    "global_mask",
    "go4align_indicators",
    "go4align_weights",
    "graddrop",
    "gradnorm_loss",
    "gradvac_weights",
    "igb_reward",
    "igb_v1_weights",
    "imtl_l_objectives",
    "imtlg_weights",
    "kmeans_1d",
    "krum_weights",
    "ldc_mtl_grad",
    "ldc_mtl_loss",
    "mconfig_step",
    "mean_weights",
    "mgda_weights",
    "min_norm_2",
    "moco_step",
    "modo_step",
    "nash_mtl_weights",
    "pbi_weights",
    "pcd_qp",
    "pcd_weights",
    "pcgrad_weights",
    "project_simplex",
    "psn_mask",
    "random_weights",
    "rlw_weights",
    "sam_perturbation",
    "scale_invariant_objectives",
    "sdmgrad_step",
    "stch_scalarization",
    "stch_weights",
    "sum_weights",
    "trimmed_mean",
    "uncertainty_objectives",
    "upgrad_weights",
    "uw_so_weights",
]
