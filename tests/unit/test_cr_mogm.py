"""CR-MOGM: the EMA of the wrapped aggregator's weights (the paper's λ_k = α λ_{k−1} +
(1 − α) λ̂_k), its state, TorchJD 0.18 parity (torchjd/aggregation/_cr_mogm.py of the 0.18.0
wheel: ``CRMOGMWeighting(weighting, alpha, initial_weights)``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchjd.aggregation as tj

from mtlbal.aggregation import CRMOGM, MGDA, Constant, GradDrop, GradVac, PCGrad, UPGrad
from mtlbal.functional import crmogm_update

from ._agg1_jacobians import F64, cases, jacobian
from ._methods_helpers import check_resume


@pytest.mark.parametrize(("kind", "m", "seed"), cases(seeds=1))
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_reference_and_torchjd_parity(kind: str, m: int, seed: int, alpha: float) -> None:
    jacs = [jacobian(kind, m, seed + 10 * s) for s in range(3)]
    if kind != "zero":
        jacs[1] = jacobian("full", m, seed + 77)  # the weights change between steps
    ours = CRMOGM(UPGrad(norm_eps=1e-4, reduction="mean"), alpha=alpha)
    inner = UPGrad(norm_eps=1e-4, reduction="mean")  # a stateless method: a fresh λ̂ per step
    theirs = tj.CRMOGMWeighting(tj.UPGradWeighting(), alpha=alpha)
    lam = None
    for jac in jacs:
        g = jac @ jac.T
        hat = inner.weights(g)
        lam = hat if lam is None else alpha * lam + (1 - alpha) * hat
        got = ours.weights(g)
        torch.testing.assert_close(got, lam, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, theirs(g), rtol=1e-7, atol=1e-9)


def test_initial_weights_and_torchjd_parity() -> None:
    init = [0.1, 0.2, 0.7]
    ours = CRMOGM(Constant([1.0, 0.0, 0.0]), alpha=0.5, initial_weights=init)
    theirs = tj.CRMOGMWeighting(
        tj.ConstantWeighting(torch.tensor([1.0, 0.0, 0.0], dtype=F64)),
        alpha=0.5,
        initial_weights=torch.tensor(init, dtype=F64),
    )
    jac = jacobian("full", 3, 0)
    lam = torch.tensor(init, dtype=F64)
    for _ in range(3):
        lam = 0.5 * lam + 0.5 * torch.tensor([1.0, 0.0, 0.0], dtype=F64)
        got = ours.weights(jac @ jac.T)
        torch.testing.assert_close(got, lam)
        torch.testing.assert_close(got, theirs(jac @ jac.T))
    torch.testing.assert_close(
        crmogm_update(torch.ones(2), torch.zeros(2), 0.25), 0.25 * torch.ones(2)
    )


def test_state_is_saved_with_the_wrapped_state() -> None:
    agg = CRMOGM(GradVac(seed=1), alpha=0.5)
    jac = jacobian("full", 3, 1)
    agg(jac)
    sd = agg.state_dict()
    assert {"ema_weights", "aggregator.targets"} <= set(sd)
    expected = copy.deepcopy(agg)(jac)
    fresh = CRMOGM(GradVac(seed=1), alpha=0.5)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(jac), expected, rtol=0, atol=0)
    fresh.reset()  # both the average and the wrapped state
    assert fresh.ema_weights is None and fresh.aggregator.targets is None  # type: ignore[union-attr]


def test_alpha_may_be_scheduled_and_is_not_compared_on_load() -> None:
    a = CRMOGM(UPGrad(), alpha=0.9)
    a(jacobian("full", 3, 0))
    a.alpha = 0.5  # e.g. 1 − lr/lr0
    b = CRMOGM(UPGrad())
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.ema_weights, a.ema_weights)
    with pytest.raises(ValueError, match="alpha must be in \\[0, 1\\]"):
        a.alpha = 1.5


@pytest.mark.parametrize(
    "make",
    [
        lambda: {"aggregator": CRMOGM(GradVac(seed=2), alpha=0.7)},
        lambda: {"aggregator": CRMOGM(PCGrad(seed=2))},
        lambda: {"aggregator": CRMOGM(MGDA(normalization="loss"), alpha=0.3)},
    ],
    ids=["GradVac", "PCGrad", "MGDA-loss"],
)
def test_resume_equals_uninterrupted(make: object) -> None:
    check_resume(make)  # type: ignore[arg-type]


def test_needs_and_host_sync_are_the_wrapped_ones() -> None:
    inner = MGDA(normalization="loss")
    agg = CRMOGM(inner)
    assert agg.needs == inner.needs and agg.host_sync == inner.host_sync
    assert agg.homogeneity == inner.homogeneity
    assert CRMOGM(MGDA(normalization="l2"), initial_weights=[1.0, 1.0]).homogeneity is None


def test_refusals_name_the_problem() -> None:
    with pytest.raises(TypeError, match=r"wraps a GramianAggregator.*GradDrop"):
        CRMOGM(GradDrop())  # type: ignore[arg-type]
    agg = CRMOGM(UPGrad())
    agg(jacobian("full", 3, 0))
    with pytest.raises(ValueError, match="averaged weights for 3 tasks, got 4; call reset"):
        agg(jacobian("full", 4, 0))
    with pytest.raises(ValueError, match="2 initial_weights for 3 tasks"):
        CRMOGM(UPGrad(), initial_weights=[1.0, 1.0])(jacobian("full", 3, 0))
    with pytest.raises(ValueError, match="initial_weights must be finite"):
        CRMOGM(UPGrad(), initial_weights=[float("inf")])
    with pytest.raises(ValueError, match="alpha must be in"):
        CRMOGM(UPGrad(), alpha=-0.1)


def test_missing_tasks_move_only_the_present_averages() -> None:
    from mtlbal.step import StepContext

    agg = CRMOGM(Constant([1.0, 2.0, 3.0]), alpha=0.5)
    names = ("a", "b", "c")
    g2 = torch.eye(2, dtype=F64)
    # first step without task b: b has no average yet (NaN), a and c start at their weights
    w = agg.solve(g2, StepContext(present=(0, 2), all_tasks=names, tasks=("a", "c")))
    torch.testing.assert_close(w, torch.tensor([1.0, 3.0], dtype=F64))
    assert agg.ema_weights is not None and agg.ema_weights[1].isnan()
    # b's first step starts its average at its weight; a and c continue theirs
    agg.aggregator = Constant([3.0, 0.0, 1.0])
    w = agg.solve(torch.eye(3, dtype=F64), StepContext(all_tasks=names, tasks=names))
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0, 2.0], dtype=F64))
    # a step without a: only b and c move
    held = agg.ema_weights.clone()
    w = agg.solve(g2, StepContext(present=(1, 2), all_tasks=names, tasks=("b", "c")))
    torch.testing.assert_close(w, torch.tensor([0.0, 1.5], dtype=F64))
    assert agg.ema_weights[0] == held[0]
