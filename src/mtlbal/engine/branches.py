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

from mtlbal import _distributed as dist_util
from mtlbal.engine.cut import CutPoint
from mtlbal.transforms.arl import ARL
from mtlbal.transforms.branch_calibration import BranchCalibration, branch_norms

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
        self,
        captured: list[list[tuple[Tensor, Tensor]]],
        extras: dict[str, Tensor],
        coefficients: Tensor | None = None,
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
        if isinstance(calib, ARL):  # ARL: inverse-variance coefficients, not norm matching
            if len(live) != len(captured):
                raise ValueError("ARL: every modality branch must feed the losses at every step")
            assert coefficients is not None  # computed in the solve stage
            kappa = coefficients
            flat = [torch.cat([x.reshape(-1) for x in g]) for g in grads]
            extras["branch_norms"] = _global_norms(branch_norms(flat), True).detach()
            extras["branch_weights"] = kappa.detach()
            new = [[(x * k.to(x.dtype)) for x in g] for g, k in zip(grads, kappa)]
        elif calib.per_sample:
            counts = {len(g) for g in grads}
            if len(counts) != 1:
                raise ValueError(
                    "per-sample branch calibration needs every branch to run the same number "
                    f"of times per step, got {[len(g) for g in grads]}"
                )
            rows = [list(row) for row in zip(*grads)]
            row_norms = [_global_norms(branch_norms(row, per_sample=True), False) for row in rows]
            new = [list(col) for col in zip(*[calib(row, n) for row, n in zip(rows, row_norms)])]
            extras["branch_norms"] = torch.cat(row_norms, dim=1).detach()
        else:
            flat = [torch.cat([x.reshape(-1) for x in g]) for g in grads]
            norms = _global_norms(branch_norms(flat), True)
            extras["branch_norms"] = norms.detach()
            scaled = calib(flat, norms)
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


def _global_norms(norms: Tensor, batch: bool) -> Tensor:
    """Under DDP, the norms of the global gradient at the branch outputs (the gradient of the
    rank-mean loss: each rank's block divided by the world size; per-sample blocks are disjoint,
    so a batch-level norm² is the sum over ranks). One process: ``norms`` unchanged."""
    world = dist_util.world_size()
    if world == 1:
        return norms
    if batch:
        sq = norms.pow(2)  # a new tensor: all_reduce works in place
        torch.distributed.all_reduce(sq)
        return sq.sqrt() / world
    return norms / world
