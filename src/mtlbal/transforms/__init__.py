"""Gradient transforms: per-parameter operations on (per-task) gradients, and the modality-level
calibration of FULLER-style multi-level balancing."""

from mtlbal.transforms.arl import ARL
from mtlbal.transforms.base import GradientTransform
from mtlbal.transforms.branch_calibration import BranchCalibration
from mtlbal.transforms.rep_mtl import RepMTL
from mtlbal.transforms.sparse_mask import SparseMask

__all__ = ["ARL", "BranchCalibration", "GradientTransform", "RepMTL", "SparseMask"]
