"""GradVac: a naive loop over explicit gradient vectors (the paper's update) as reference,
several steps with the EMA targets carried; TorchJD parity with the same visiting orders;
the PCGrad special case; resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtlbal.aggregation import GradVac
from mtlbal.functional import gradvac_weights, pcgrad_weights

from ._methods_helpers import check_resume


def reference_step(
    jac: np.ndarray, phi_hat: np.ndarray, orders: np.ndarray, beta: float, eps: float = 1e-8
) -> tuple[np.ndarray, np.ndarray]:
    m = jac.shape[0]
    phi_hat = phi_hat.copy()
    pc = jac.copy()
    for i in range(m):
        for j in orders[i]:
            gi, gj = pc[i], jac[j]
            ni, nj = np.linalg.norm(gi), np.linalg.norm(gj)
            phi = float(gi @ gj / (ni * nj + eps))
            t = phi_hat[i, j]
            if phi < t:
                w = ni * (t * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - t**2))
                w /= nj * math.sqrt(1 - t**2) + eps
                pc[i] = gi + w * gj
            phi_hat[i, j] = (1 - beta) * t + beta * phi
    return pc.sum(0), phi_hat


def _orders(rng: np.random.Generator, m: int) -> np.ndarray:
    return np.stack([rng.permutation([j for j in range(m) if j != i]) for i in range(m)])


@pytest.mark.parametrize(("m", "n"), [(2, 3), (3, 6), (5, 4)])
@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_matches_naive_loop_over_steps(m: int, n: int, beta: float) -> None:
    rng = np.random.default_rng(m * 10 + n)
    phi_ref = np.zeros((m, m))
    phi = torch.zeros(m, m, dtype=torch.float64)
    base = rng.normal(size=(m, n))
    for _ in range(6):
        jac = base + 0.7 * rng.normal(size=(m, n))
        orders = _orders(rng, m)
        d_ref, phi_ref = reference_step(jac, phi_ref, orders, beta, eps=0.0)
        jt = torch.as_tensor(jac)
        w, phi = gradvac_weights(jt @ jt.T, phi, torch.as_tensor(orders), beta)
        np.testing.assert_allclose((w @ jt).numpy(), d_ref, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(phi.numpy(), phi_ref, rtol=1e-9, atol=1e-12)


def test_zero_targets_is_pcgrad() -> None:
    rng = np.random.default_rng(0)
    m = 4
    jac = torch.as_tensor(rng.normal(size=(m, 5)))
    orders = torch.as_tensor(_orders(rng, m))
    w, _ = gradvac_weights(jac @ jac.T, torch.zeros(m, m), orders)
    pc_orders = torch.cat([torch.arange(m)[:, None], orders], 1)  # j = i first is a no-op
    torch.testing.assert_close(w, pcgrad_weights(jac @ jac.T, pc_orders), rtol=1e-6, atol=1e-8)


def test_torchjd_parity_same_orders() -> None:
    import torchjd.aggregation as tj

    m, n = 4, 7
    theirs_agg = tj.GradVac(beta=0.5)
    targets = torch.zeros(m, m, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        jac = torch.randn(m, n, generator=gen, dtype=torch.float64) + 0.5
        torch.manual_seed(100 + step)  # TorchJD draws orders from the global RNG
        theirs = theirs_agg(jac)
        torch.manual_seed(100 + step)
        rows = []
        for i in range(m):
            others = [j for j in range(m) if j != i]
            rows.append(torch.tensor([others[k] for k in torch.randperm(m - 1).tolist()]))
        # TorchJD keeps LibMTL's ε = 1e-8 (ours defaults to 0)
        w, targets = gradvac_weights(jac @ jac.T, targets, torch.stack(rows), eps=1e-8)
        torch.testing.assert_close(w @ jac, theirs, rtol=1e-8, atol=1e-10)


def test_reduction_and_state() -> None:
    jac = torch.tensor([[1.0, 0.2], [-0.5, 1.0], [0.3, -1.0]], dtype=torch.float64)
    a, b = GradVac(seed=3), GradVac(seed=3, reduction="mean")
    torch.testing.assert_close(a(jac), 3 * b(jac))
    assert a.targets is not None and a.targets.abs().sum() > 0
    c = GradVac(seed=9)
    c.load_state_dict(a.state_dict())
    torch.testing.assert_close(c(jac), a(jac))
    with pytest.raises(ValueError, match="targets for 3 tasks"):
        a(jac[:2])
    with pytest.raises(ValueError, match="beta"):
        GradVac(beta=2.0)


def test_resume() -> None:
    check_resume(lambda: {"aggregator": GradVac(seed=1)})


def _reference_no_eps(
    jac: np.ndarray, phi_hat: np.ndarray, orders: np.ndarray, beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """GradVac's loop in float64 without any epsilon (the form that is scale-free)."""
    m = jac.shape[0]
    phi_hat = phi_hat.copy()
    pc = jac.copy()
    for i in range(m):
        for j in orders[i]:
            gi, gj = pc[i], jac[j]
            ni, nj = np.linalg.norm(gi), np.linalg.norm(gj)
            phi = float(gi @ gj / (ni * nj))
            t = phi_hat[i, j]
            if phi < t:
                w = ni * (t * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - t**2))
                w /= nj * math.sqrt(1 - t**2)
                pc[i] = gi + w * gj
            phi_hat[i, j] = (1 - beta) * t + beta * phi
    return pc.sum(0), phi_hat


@pytest.mark.parametrize("scale", [1e-4, 1e-6])
def test_small_gradients_scale_exactly(scale: float) -> None:
    """No absolute epsilon: over several steps (targets carried) d(sJ) = s·d(J), and it matches
    the epsilon-free reference (1e-8 in the denominators broke this at ‖g‖ ~ 1e-4)."""
    rng = np.random.default_rng(3)
    m, n = 4, 6
    base = rng.normal(size=(m, n))
    phi_ref = np.zeros((m, m))
    a1, a_s = GradVac(seed=0), GradVac(seed=0)
    for _ in range(4):
        jac = torch.as_tensor(base + 0.7 * rng.normal(size=(m, n)))
        d1 = a1(jac)
        ds = a_s(scale * jac)
        torch.testing.assert_close(ds, scale * d1, rtol=1e-10, atol=0)
        assert a_s.targets is not None and a1.targets is not None
        # the targets are scale-free as well
        torch.testing.assert_close(a_s.targets, a1.targets, rtol=1e-10, atol=1e-13)
    # three steps against the reference, with the orders drawn explicitly
    phi = torch.zeros(m, m, dtype=torch.float64)
    for _ in range(3):
        jac_np = scale * (base + 0.7 * rng.normal(size=(m, n)))
        orders = _orders(rng, m)
        d_ref, phi_ref = _reference_no_eps(jac_np, phi_ref, orders, 0.5)
        jt = torch.as_tensor(jac_np)
        w, phi = gradvac_weights(jt @ jt.T, phi, torch.as_tensor(orders), 0.5, eps=0.0)
        np.testing.assert_allclose((w @ jt).numpy(), d_ref, rtol=1e-9, atol=0)
        np.testing.assert_allclose(phi.numpy(), phi_ref, rtol=1e-9, atol=1e-12)
