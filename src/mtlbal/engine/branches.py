"""FULLER's modality level: a second stage after the task-level combination.

Each modality branch's output is captured like a cut point (a detached leaf in the forward).
At the commit stage, once the task-level combined gradient has been backpropagated through the
fusion and the trunk down to those leaves, :meth:`BranchStage.backward` rescales the gradients
there with the :class:`~mtlbal.transforms.BranchCalibration` and backpropagates them into the
branches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbal.engine.cut import CutPoint
from mtlbal.transforms.branch_calibration import BranchCalibration

__all__ = ["BranchStage"]


class BranchStage:
    """Modality branches (FULLER's modality level): each branch output is replaced by a detached
    leaf in the forward, as at a cut point. Once the combined gradient has been backpropagated
    through the fusion and the trunk down to those leaves, :meth:`backward` rescales the
    gradients there with the :class:`BranchCalibration` and backpropagates them into the
    branches."""

    def __init__(self, calibration: BranchCalibration) -> None:
        self.calibration = calibration
        self.cuts: list[CutPoint] = []
        try:
            for m in calibration.modules:
                self.cuts.append(CutPoint(m, detach=True, role="modality branch"))
        except BaseException:
            self.remove()
            raise

    def take(self) -> list[list[tuple[Tensor, Tensor]]]:
        return [c.take() for c in self.cuts]

    def remove(self) -> None:
        for c in self.cuts:
            c.remove()

    def backward(
        self, captured: list[list[tuple[Tensor, Tensor]]], extras: dict[str, Tensor]
    ) -> None:
        live = [caps for caps in captured if caps]
        if not live:
            return
        grads = [
            [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for _, leaf in caps]
            for caps in live
        ]
        if all(leaf.grad is None for caps in live for _, leaf in caps):
            raise ValueError(
                "no gradient reached the outputs of the modality branches: the branches must "
                "feed the losses (and lie upstream of the cut point, if any)"
            )
        calib = self.calibration
        if calib.per_sample:
            counts = {len(g) for g in grads}
            if len(counts) != 1:
                raise ValueError(
                    "per-sample branch calibration needs every branch to run the same number "
                    f"of times per step, got {[len(g) for g in grads]}"
                )
            new = [list(col) for col in zip(*[calib(list(row)) for row in zip(*grads)])]
            extras["branch_norms"] = torch.stack(
                [
                    torch.cat([x.reshape(x.shape[0], -1).norm(dim=1) for x in g]).detach()
                    for g in grads
                ]
            )
        else:
            flat = [torch.cat([x.reshape(-1) for x in g]) for g in grads]
            extras["branch_norms"] = torch.stack([f.norm() for f in flat]).detach()
            scaled = calib(flat)
            new = []
            for g, f in zip(grads, scaled):
                parts, offset = [], 0
                for x in g:
                    parts.append(f[offset : offset + x.numel()].view_as(x))
                    offset += x.numel()
                new.append(parts)
        outs = [z for caps in live for z, _ in caps]
        cots = [c for g in new for c in g]
        for caps in live:
            for _, leaf in caps:
                leaf.grad = None
        torch.autograd.backward(outs, cots)
