"""ConFIG and M-ConFIG: the paper's Eq. 2 in float64, parity with TorchJD 0.18 (ConFIG) and with
the official ``conflictfree`` package (tum-pbs/ConFIG @ 94862437f451f175673bce9c85f3e14bd9182c21:
``grad_operator.ConFIG_update`` (lstsq), ``ConFIG_update_double`` (m = 2) and
``momentum_operator.PseudoMomentumOperator``), state and resume."""

from __future__ import annotations

import pytest
import torch

from mtlbal.aggregation import ConFIG, MConFIG
from mtlbal.functional import config_direction

from ._jacobians import F64, KINDS, MS, jacobian
from ._methods_helpers import check_resume


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = v.norm()
    return torch.zeros_like(v) if float(n) == 0 else v / n


def _official_general(grads: torch.Tensor) -> torch.Tensor:
    # ConFIG_update with EqualWeight and ProjectionLength, use_least_square=True
    weights = torch.ones(grads.shape[0], dtype=grads.dtype)
    units = torch.nan_to_num(grads / grads.norm(dim=1).unsqueeze(1), 0)
    best = torch.linalg.lstsq(units, weights).solution
    u = _unit(best)
    return torch.stack([torch.dot(g, u) for g in grads]).sum() * u


def _official_double(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    # ConFIG_update_double: orthogonal components, transfer_coef_double with equal weights
    n1, n2 = g1.norm(), g2.norm()
    u1, u2 = g1 / n1, g2 / n2
    cos = torch.dot(g1, g2) / n1 / n2
    or2 = g1 - n1 * cos * u2
    or1 = g2 - n2 * cos * u1
    uo1, uo2 = _unit(or1), _unit(or2)
    c1 = torch.dot(uo2, u1) / (1.0 * torch.dot(uo1, u2))
    best = c1 * uo1 + uo2
    u = _unit(best)
    return (torch.dot(g1, u) + torch.dot(g2, u)) * u


@pytest.mark.parametrize("m", MS)
def test_equal_cosines_and_projection_length(m: int) -> None:
    # Eq. 2 for independent gradients: U x = 1, so every cos(g_i, d) is the same and positive,
    # and ‖d‖ = Σ_i ⟨g_i, d/‖d‖⟩
    jac = jacobian("full", m, n=3 * m, seed=1)
    d = ConFIG()(jac)
    cos = (jac @ d) / (jac.norm(dim=1) * d.norm())
    torch.testing.assert_close(cos, cos[0].expand(m).clone(), rtol=1e-10, atol=0)
    assert float(cos[0]) > 0
    torch.testing.assert_close(d.norm(), (jac @ (d / d.norm())).sum(), rtol=1e-12, atol=0)
    # a preference w gives cosines in the ratio of w
    w = torch.linspace(1.0, 2.0, m, dtype=F64)
    d = ConFIG(pref=w)(jac)
    cos = (jac @ d) / (jac.norm(dim=1) * d.norm())
    torch.testing.assert_close(cos / cos[0], w / w[0], rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", MS)
def test_parity_with_torchjd_and_the_official_operator(kind: str, m: int) -> None:
    import torchjd.aggregation as tj

    jac = jacobian(kind, m, n=24, seed=2)
    d = ConFIG()(jac)
    scale = max(1.0, float(jac.abs().max()))
    units = torch.nan_to_num(jac / jac.norm(dim=1, keepdim=True), 0)
    if float((units.T @ torch.ones(m, dtype=F64)).norm()) < 1e-12:
        # gradients that cancel (m = 2, opposite): the exact direction is 0; the references
        # normalise rounding noise there (an arbitrary direction)
        assert torch.equal(d, torch.zeros_like(d))
        return
    torch.testing.assert_close(d, tj.ConFIG()(jac), rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(d, _official_general(jac), rtol=0, atol=1e-9 * scale)
    if m == 2 and kind == "full":
        torch.testing.assert_close(d, _official_double(jac[0], jac[1]), rtol=1e-10, atol=0)


def test_degenerate_cases() -> None:
    g = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    ident = g.expand(3, 3).clone()
    torch.testing.assert_close(ConFIG()(ident), 3 * g)  # identical tasks: the sum
    torch.testing.assert_close(ConFIG(reduction="mean")(ident), g)
    opposite = torch.stack([g, -g])
    assert float(ConFIG()(opposite).abs().max()) < 1e-12
    assert torch.equal(ConFIG()(torch.zeros(3, 4, dtype=F64)), torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="pref"):
        config_direction(ident, torch.ones(2))


# ---------------------------------------------------------------------------- M-ConFIG
class _PseudoMomentum:
    """PseudoMomentumOperator.calculate_gradient, re-implemented (ConFIGOperator inside: the
    double form for two tasks, lstsq otherwise)."""

    def __init__(self, m: int, n: int, b1: float = 0.9, b2: float = 0.999) -> None:
        self.b1, self.b2, self.m = b1, b2, m
        self.mom = [torch.zeros(n, dtype=F64) for _ in range(m)]
        self.s = torch.zeros(n, dtype=F64)
        self.fake_m = torch.zeros(n, dtype=F64)
        self.t, self.t_grads, self.all_init = 0, [0] * m, False

    def __call__(self, indexes: list[int], grads: list[torch.Tensor]) -> torch.Tensor:
        for i, g in zip(indexes, grads):
            self.t_grads[i] += 1
            self.mom[i] = self.b1 * self.mom[i] + (1 - self.b1) * g
        if not self.all_init:
            if 0 in self.t_grads:
                return torch.zeros_like(self.s)
            self.all_init = True
        self.t += 1
        m_hats = torch.stack(
            [self.mom[i] / (1 - self.b1 ** self.t_grads[i]) for i in range(self.m)]
        )
        two = self.m == 2  # ConFIGOperator's allow_simplified_model
        final = _official_double(m_hats[0], m_hats[1]) if two else _official_general(m_hats)
        fake_m = final * (1 - self.b1**self.t)
        fake_grad = (fake_m - self.b1 * self.fake_m) / (1 - self.b1)
        self.fake_m = fake_m
        self.s = self.b2 * self.s + (1 - self.b2) * fake_grad**2
        s_hat = self.s / (1 - self.b2**self.t)
        return final / (torch.sqrt(s_hat) + 1e-8)


@pytest.mark.parametrize("schedule", ["all", "cyclic"])
@pytest.mark.parametrize("m", [2, 3, 5])
def test_mconfig_parity_with_the_official_operator(m: int, schedule: str) -> None:
    n, steps = 12, 7
    jacs = [jacobian("full", m, n=n, seed=50 + k) for k in range(steps)]
    ours = MConFIG(schedule=schedule)  # type: ignore[arg-type]
    ref = _PseudoMomentum(m, n)
    for k, jac in enumerate(jacs):
        idx = list(range(m)) if schedule == "all" else [k % m]
        expect = ref(idx, [jac[i] for i in idx])
        torch.testing.assert_close(ours(jac), expect, rtol=1e-9, atol=1e-12)
    if schedule == "cyclic":  # the first m − 1 steps had no moment for some task: zeros
        assert int(ours.t) == steps - m + 1


def test_mconfig_first_step_and_homogeneity() -> None:
    jac = jacobian("full", 3, seed=3)
    c = ConFIG()(jac)
    # first step: m̂ = J, f = c(1 − β₁), p = c, ŝ = c²  ⇒  d = c / (|c| + ε)
    torch.testing.assert_close(MConFIG()(jac), c / (c.abs() + 1e-8), rtol=1e-12, atol=0)
    a, b = MConFIG(eps=0.0), MConFIG(eps=0.0)
    assert a.homogeneity == 0 and MConFIG().homogeneity is None
    for k in range(3):
        j = jacobian("full", 3, seed=60 + k)
        torch.testing.assert_close(b(1e3 * j), a(j), rtol=1e-9, atol=1e-12)
    assert a.mom is not None and a.mom.shape == (3, 24) and a.s is not None
    with pytest.raises(ValueError, match="must not change"):
        a(jacobian("full", 3, n=5, seed=0))


@pytest.mark.parametrize("schedule", ["all", "cyclic"])
def test_mconfig_resume_default_configuration(schedule: str) -> None:
    check_resume(lambda: {"aggregator": MConFIG(schedule=schedule)})  # type: ignore[arg-type]


def test_config_resume() -> None:
    check_resume(lambda: {"aggregator": ConFIG()})
