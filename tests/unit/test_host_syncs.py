"""Host syncs per step (issue 2): counted with torch.profiler as ``aten::_local_scalar_dense``.

Every ``.item()``, ``bool(tensor)``, ``float(tensor)`` or ``.tolist()`` of a tensor runs that
op; on CUDA it blocks the host until the device catches up. The count covers the Balancer's
backward only: the forward and the optimizer step stay outside the profiled window (Adam's own
``step.item()`` on CPU would otherwise count, and is none of the Balancer's business).

With the default ``nonfinite="raise"`` the one allowed sync is the finiteness check of the
losses; with ``nonfinite="off"`` there is none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import mtlbal
from mtlbal import aggregation as A
from mtlbal import weighting as W

M = 3
SYNC_OP = "aten::_local_scalar_dense"


def _model() -> tuple[nn.Sequential, nn.ModuleList]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    heads = nn.ModuleList(nn.Linear(16, 2) for _ in range(M))
    return trunk, heads


def _losses(trunk: nn.Module, heads: nn.ModuleList, x: torch.Tensor) -> dict[str, torch.Tensor]:
    z = trunk(x)
    return {f"t{i}": h(z).pow(2).mean() for i, h in enumerate(heads)}


# name → the Balancer keyword arguments, built from the trunk (which is also the cut point)
CASES: dict[str, Callable[[nn.Module], dict[str, Any]]] = {
    "equal": lambda trunk: {},
    "uncertainty": lambda trunk: {"weighting": W.UncertaintyWeighting(M)},
    "uncertainty-simple": lambda trunk: {"weighting": W.UncertaintyWeighting(M, form="simple")},
    "gradnorm": lambda trunk: {"weighting": W.GradNorm(M)},
    "gradnorm-cut": lambda trunk: {"weighting": W.GradNorm(M), "at": trunk},
    "equal-cut": lambda trunk: {"at": trunk},
    "pcgrad-cut": lambda trunk: {"aggregator": A.PCGrad(seed=0), "at": trunk},
    "equal-cut-diagnostics": lambda trunk: {"at": trunk, "diagnostics": True},
    # loss-level methods with a domain: its check rides in the one sync
    "geometric-mean": lambda trunk: {"weighting": W.GeometricMean(M)},
    "scale-invariant": lambda trunk: {"weighting": W.ScaleInvariant(M)},
    "uw-so": lambda trunk: {"weighting": W.UWSO(M)},
    "imtl-l": lambda trunk: {"weighting": W.IMTLL(M)},
    "stch": lambda trunk: {"weighting": W.STCH(M)},
    "stch-reference": lambda trunk: {"weighting": W.STCH(M, reference=[1.0] * M)},
    # issue 10: the domain flags ride in the one check; GO4Align's exact K-means stays on device
    "go4align": lambda trunk: {"weighting": W.GO4Align(M, num_groups=2)},
    "go4align-cut": lambda trunk: {"weighting": W.GO4Align(M, num_groups=2), "at": trunk},
    "ldc-mtl": lambda trunk: {"weighting": W.LDCMTL(M)},
    "cosmos": lambda trunk: {"weighting": W.COSMOS(1.0)},
    "pbi": lambda trunk: {"weighting": W.PBI()},
}


def _count_syncs(fn: Callable[[], object]) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == SYNC_OP)


def _syncs_per_step(case: str, nonfinite: str, steps: int = 3) -> list[int]:
    trunk, heads = _model()
    balancer = mtlbal.Balancer(trunk, nonfinite=nonfinite, **CASES[case](trunk))  # type: ignore[arg-type]
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = mtlbal.wrap(torch.optim.SGD(params, lr=0.01), balancer)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    counts = []
    for _ in range(steps):  # the first step also checks connectivity; count every step
        opt.zero_grad()
        losses = _losses(trunk, heads, x)
        counts.append(_count_syncs(lambda losses=losses: opt.backward(losses)))
        opt.step()
    balancer.remove()
    return counts


def test_the_probe_sees_a_sync() -> None:
    """The counting method itself: an ``.item()`` is one event, arithmetic is none."""
    t = torch.ones(3)
    assert _count_syncs(lambda: t.sum().item()) == 1
    assert _count_syncs(lambda: bool(torch.isfinite(t).all())) == 1
    assert _count_syncs(lambda: t * 2 + 1) == 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_sync_with_finiteness_check(case: str) -> None:
    assert _syncs_per_step(case, "raise") == [1, 1, 1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_sync_with_check_off(case: str) -> None:
    assert _syncs_per_step(case, "off") == [0, 0, 0]


def test_skip_policy_costs_one_sync() -> None:
    assert _syncs_per_step("equal", "skip") == [1, 1, 1]
