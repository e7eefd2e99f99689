"""ARL (mtlbal.transforms.ARL): the gradient entering each modality branch is scaled by the
inverse-variance coefficient of that modality (Wei et al., ICCV 2025, arXiv:2507.10203).

Reference: a plain ``sum(losses).backward()`` on a copy of the model, the branch gradients then
multiplied by ``κ_k = (1/v_k)/mean(1/v)`` computed here from the auxiliary loss values (float64).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn

import mtlbal
from conftest import assert_same
from mtlbal.transforms import ARL, BranchCalibration
from mtlbal.transforms.arl import arl_coefficients


class Net(nn.Module):
    """Two modality encoders, a fusion layer shared by the fused and the unimodal paths (the
    unimodal path feeds zeros for the other modality, as ARL's parameter-free auxiliaries)."""

    def __init__(self) -> None:
        super().__init__()
        self.ea = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.eb = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.fuse = nn.Linear(10, 1)

    def losses(self, xa: Tensor, xb: Tensor, y: Tensor) -> dict[str, Tensor]:
        fa, fb = self.ea(xa), self.eb(xb)
        za, zb = torch.zeros_like(fa), torch.zeros_like(fb)
        return {
            "fused": (self.fuse(torch.cat([fa, fb], 1)) - y).pow(2).mean(),
            "aux_a": (self.fuse(torch.cat([fa, zb], 1)) - y).pow(2).mean(),
            "aux_b": (self.fuse(torch.cat([za, fb], 1)) - y).pow(2).mean(),
        }


def _data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(12, k, generator=g, dtype=torch.float64) for k in (3, 4, 1))  # type: ignore[return-value]


def _net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def test_coefficients_equation() -> None:
    v = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    inv = torch.tensor([2.0, 0.5, 0.25], dtype=torch.float64)
    torch.testing.assert_close(arl_coefficients(v), inv / inv.mean(), rtol=1e-15, atol=0)
    k = arl_coefficients(torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert float(k[0] / k[1]) == pytest.approx(3.0, rel=1e-14)  # ratio = inverse variance ratio
    assert torch.equal(arl_coefficients(torch.ones(4)), torch.ones(4))  # equal: unchanged
    with pytest.raises(ValueError, match="K ≥ 2"):
        arl_coefficients(torch.ones(1))


def test_branch_gradients_scaled_by_inverse_variance() -> None:
    net, ref = _net(), _net()
    xa, xb, y = _data()
    bal = mtlbal.Balancer(
        [net.ea, net.eb, net.fuse], branches=ARL([net.ea, net.eb], aux_tasks=["aux_a", "aux_b"])
    )
    info = bal.backward(net.losses(xa, xb, y))
    rl = ref.losses(xa, xb, y)
    sum(rl.values()).backward()
    va, vb = float(rl["aux_a"].detach()), float(rl["aux_b"].detach())
    ka = (1 / va) / ((1 / va + 1 / vb) / 2)
    kb = (1 / vb) / ((1 / va + 1 / vb) / 2)
    assert ka != pytest.approx(1.0, abs=1e-3)  # the test problem is not balanced already
    torch.testing.assert_close(
        info.extras["branch_weights"],
        torch.tensor([ka, kb], dtype=torch.float64),
        rtol=1e-14,
        atol=0,
    )
    for p, q in zip(net.ea.parameters(), ref.ea.parameters()):
        torch.testing.assert_close(p.grad, ka * q.grad, rtol=1e-12, atol=1e-15)
    for p, q in zip(net.eb.parameters(), ref.eb.parameters()):
        torch.testing.assert_close(p.grad, kb * q.grad, rtol=1e-12, atol=1e-15)
    for p, q in zip(net.fuse.parameters(), ref.fuse.parameters()):  # above the branches: plain
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)


def test_refusals() -> None:
    net = _net()
    with pytest.raises(ValueError, match="2 auxiliary tasks for 3"):
        ARL([net.ea, net.eb, net.fuse], aux_tasks=["a", "b"])
    with pytest.raises(ValueError, match="listed twice"):
        ARL([net.ea, net.eb], aux_tasks=["a", "a"])
    xa, xb, y = _data()
    bal = mtlbal.Balancer(
        [net.ea, net.eb, net.fuse], branches=ARL([net.ea, net.eb], aux_tasks=["aux_a", "nope"])
    )
    with pytest.raises(ValueError, match=r"auxiliary task\(s\) \['nope'\]"):
        bal.backward(net.losses(xa, xb, y))
    assert all(p.grad is None for p in net.parameters())  # refused before any write
    assert bal.step_count == 0
    assert isinstance(ARL([net.ea, net.eb], aux_tasks=["a", "b"]), BranchCalibration)
    assert repr(ARL([net.ea, net.eb], aux_tasks=["a", "b"])) == (
        "ARL([Sequential, Sequential], aux_tasks=['a', 'b'])"
    )


def _train(net: Net, opt, bal, k0: int, k1: int) -> None:
    for k in range(k0, k1):
        xa, xb, y = _data(10 + k)
        opt.zero_grad()
        opt.backward(net.losses(xa, xb, y))
        opt.step()


def test_resume_equals_uninterrupted() -> None:
    def build():
        net = _net()
        bal = mtlbal.Balancer(
            [net.ea, net.eb, net.fuse],
            weighting=mtlbal.weighting.UncertaintyWeighting(3),
            branches=ARL([net.ea, net.eb], aux_tasks=["aux_a", "aux_b"]),
        )
        return net, bal, mtlbal.wrap(torch.optim.Adam(net.parameters(), lr=1e-2), bal)

    n1, b1, o1 = build()
    _train(n1, o1, b1, 0, 4)
    n2, b2, o2 = build()
    _train(n2, o2, b2, 0, 2)
    buf = io.BytesIO()
    torch.save({"o": o2.state_dict(), "m": copy.deepcopy(n2.state_dict())}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    n3, b3, o3 = build()
    n3.load_state_dict(saved["m"])
    o3.load_state_dict(saved["o"])
    _train(n3, o3, b3, 2, 4)
    assert_same(n1.state_dict(), n3.state_dict(), "model")
