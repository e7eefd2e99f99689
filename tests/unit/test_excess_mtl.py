"""ExcessMTL: the paper's Eqs. 6–9 in float64, parity with the official code
(yifei-he/ExcessMTL @ b179956021c9ac26f93f986a35d034ffea38f790,
LibMTL/LibMTL/weighting/ExcessMTL.py; LibMTL's copy is the same) and with TorchJD 0.18."""

from __future__ import annotations

import copy

import pytest
import torch

from mtlbal.aggregation import ExcessMTL

from ._jacobians import F64, KINDS, MS, jacobian
from ._methods_helpers import check_resume


def _paper(jacs, eta: float, eps: float = 1e-7):
    """Eq. 7: AdaGrad diagonal H_i = sqrt(Σ g_i²); Eq. 6: e_i = g_iᵀ H_i⁻¹ g_i; Sec. 3.2: e/e⁽¹⁾;
    Eq. 9: w_i ∝ w_i exp(η e_i), here on the Σw = m scale."""
    m, n = jacs[0].shape
    s = torch.zeros(m, n, dtype=F64)
    w = torch.ones(m, dtype=F64)
    base = None
    out = []
    for jac in jacs:
        s = s + jac**2
        e = torch.stack([(jac[i] ** 2 / torch.sqrt(s[i] + eps)).sum() for i in range(m)])
        if base is None:
            base = e
        else:
            w = w * torch.exp(eta * e / base)
            w = m * w / w.sum()
        out.append(w @ jac)
    return out


def _official(jacs, eta: float):
    # the official backward: a loop over tasks, grad_sum[i] += g_i², h_i = sqrt(.. + 1e-7),
    # w[i] = g_i (1/h_i) g_iᵀ; first call stores initial_w, later loss_weight *= exp(w/initial_w
    # * η), renormalised to sum T; the update is Σ loss_weight_i g_i
    m = jacs[0].shape[0]
    loss_weight = torch.ones(m, dtype=F64)
    grad_sum = None
    first, initial_w = True, None
    out = []
    for grads in jacs:
        if grad_sum is None:
            grad_sum = torch.zeros_like(grads)
        w = torch.zeros(m, dtype=F64)
        for i in range(m):
            grad_sum[i] += grads[i] ** 2
            h_i = torch.sqrt(grad_sum[i] + 1e-7)
            w[i] = grads[i] * (1 / h_i) @ grads[i].t()
        if first:
            initial_w, first = w, False
        else:
            w = w / initial_w
            loss_weight = loss_weight * torch.exp(w * eta)
            loss_weight = loss_weight / loss_weight.sum() * m
        out.append(loss_weight @ grads)
    return out


# the references divide by the first step's excess risk: it must be positive
NONZERO = [k for k in KINDS if k != "zero"]


@pytest.mark.parametrize("kind", NONZERO)
@pytest.mark.parametrize("m", MS)
def test_paper_official_and_torchjd(kind: str, m: int) -> None:
    import torchjd.aggregation as tj

    jacs = [jacobian(kind, m, seed=10 + k) for k in range(4)]
    eta = 0.5
    ours = ExcessMTL(robust_step_size=eta)
    theirs = tj.ExcessMTL(robust_step_size=eta, n_warmup_steps=1)  # the official first step
    for jac, p, o in zip(jacs, _paper(jacs, eta), _official(jacs, eta)):
        d = ours(jac)
        torch.testing.assert_close(d, p, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(d, o, rtol=1e-10, atol=1e-12)
        # TorchJD: weights on the simplex (×m) and 1e-7 added to the baseline
        torch.testing.assert_close(d, m * theirs(jac), rtol=1e-6, atol=1e-9)


def test_zero_jacobian_and_a_late_baseline() -> None:
    agg = ExcessMTL(robust_step_size=1.0)
    z = torch.zeros(3, 5, dtype=F64)
    assert torch.equal(agg(z), torch.zeros(5, dtype=F64))
    # task 1 has no gradient at first: it takes its baseline when it has one, then moves
    jac = jacobian("full", 3, n=5, seed=1)
    first = jac.clone()
    first[1] = 0
    agg = ExcessMTL(robust_step_size=1.0)
    agg(first)
    assert agg.baseline is not None and float(agg.baseline[1]) == 0.0
    agg(jac)
    assert float(agg.baseline[1]) > 0
    assert torch.isfinite(agg.weights_now()).all()
    torch.testing.assert_close(agg.weights_now().sum(), torch.tensor(3.0, dtype=F64))


def test_large_steps_saturate_instead_of_overflowing() -> None:
    agg = ExcessMTL(robust_step_size=1e4)
    jac = jacobian("full", 3, seed=2)
    for k in range(3):
        d = agg(jac * (1 + k))
    assert torch.isfinite(d).all() and torch.isfinite(agg.weights_now()).all()


def test_homogeneity_state_and_scale() -> None:
    jacs = [jacobian("full", 3, seed=20 + k) for k in range(3)]
    a, b = ExcessMTL(eps=0.0), ExcessMTL(eps=0.0)
    assert a.homogeneity == 1 and ExcessMTL().homogeneity is None
    for jac in jacs:
        torch.testing.assert_close(b(1e-4 * jac), 1e-4 * a(jac), rtol=1e-10, atol=0)
    mean = ExcessMTL(reduction="mean")
    total = ExcessMTL()
    for jac in jacs:
        torch.testing.assert_close(mean(jac), total(jac) / 3)
    sd = copy.deepcopy(total.state_dict())
    assert sd["sq_sum"].shape == (3, 24) and sd["baseline"].shape == (3,)
    with pytest.raises(ValueError, match="must not change"):
        total(jacobian("full", 3, n=7, seed=0))
    with pytest.raises(ValueError, match="robust_step_size"):
        ExcessMTL(robust_step_size=0.0)


def test_resume_default_configuration() -> None:
    check_resume(lambda: {"aggregator": ExcessMTL()})
