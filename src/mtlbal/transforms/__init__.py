"""Gradient transforms: per-parameter operations on (per-task) gradients."""

from mtlbal.transforms.base import GradientTransform

__all__ = ["GradientTransform"]
