"""Rep-MTL (mtlbal.transforms.RepMTL): the task-saliency regulariser at the cut point.

The float64 reference is written from the paper's equations (Wang, Li, Xu, ICCV 2025,
arXiv:2507.21049, Sec. 3) with explicit loops over samples, tasks and positions, on saliencies
taken by plain autograd (``create_graph=True``) through a model that keeps its graph: nothing of
the kernels or of the Balancer's cut-point path is used. The authors released no code
(Jacky1128/Rep-MTL @6cf0cd7ef03c holds a README only), so there is no official computation to
re-implement.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import mtlbal
from mtlbal.aggregation import UPGrad
from mtlbal.transforms import RepMTL
from mtlbal.transforms.rep_mtl import rep_mtl_csa, rep_mtl_tsr

T = 3


def ref_tsr(S: list[Tensor]) -> Tensor:
    """S: T tensors [B, C, N]."""
    B, C, N = S[0].shape
    total = S[0].new_zeros(())
    for b in range(B):
        for s in range(N):
            hat = [S[t][b, :, s].sum() / C for t in range(len(S))]
            den = sum(h.abs() for h in hat)
            ent = S[0].new_zeros(())
            for h in hat:
                p = h.abs() / den
                ent = ent - p * torch.log(p)
            total = total + ent
    return total / (B * N)


def ref_csa(S: list[Tensor], tau: float) -> Tensor:
    B, _, N = S[0].shape

    def cos(u: Tensor, v: Tensor) -> Tensor:
        u, v = u.reshape(-1), v.reshape(-1)
        return (u @ v) / (u.norm() * v.norm())

    anchors = []
    for b in range(B):
        A = torch.stack([S[t][b].sum(dim=1) / N for t in range(len(S))], dim=1)  # C × T
        anchors.append(A @ A.T)
    total = S[0].new_zeros(())
    for b in range(B):
        den = sum(torch.exp(cos(anchors[b], anchors[k]) / tau) for k in range(B) if k != b)
        for t in range(len(S)):
            M = S[t][b] @ S[t][b].T
            total = total - torch.log(torch.exp(cos(anchors[b], M) / tau) / den)
    return total / (B * len(S))


class Net(nn.Module):
    def __init__(self, spatial: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.spatial = spatial
        if spatial:
            self.trunk = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh())
            self.heads = nn.ModuleList(
                nn.Sequential(nn.Conv2d(4, 3, 1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 9, 1))
                for _ in range(T)
            )
        else:
            self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
            self.heads = nn.ModuleList(
                nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(T)
            )

    def data(self) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(1)
        shape = (6, 2, 3, 3) if self.spatial else (6, 5)
        return torch.randn(*shape, generator=g).double(), torch.randn(6, T, generator=g).double()

    def losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        z = self.trunk(x)
        return {
            f"t{i}": (i + 1.0) * (h(z)[:, 0] - y[:, i]).pow(2).mean()
            for i, h in enumerate(self.heads)
        }


@pytest.mark.parametrize("spatial", [False, True])
def test_matches_the_paper_float64(spatial: bool) -> None:
    net, ref = Net(spatial).double(), Net(spatial).double()
    x, y = net.data()
    lt, lc, tau = 0.7, 1.3, 0.5
    bal = mtlbal.Balancer(
        net.trunk, at=net.trunk, transforms=RepMTL(lambda_tsr=lt, lambda_csa=lc, tau=tau)
    )
    info = bal.backward(net.losses(x, y))
    # reference: saliencies by plain autograd through the whole graph, then the total's backward
    z = ref.trunk(x)
    losses = [(i + 1.0) * (h(z)[:, 0] - y[:, i]).pow(2).mean() for i, h in enumerate(ref.heads)]
    S = [torch.autograd.grad(L, z, create_graph=True)[0] for L in losses]
    S = [s.reshape(s.shape[0], s.shape[1], -1) for s in S]
    R = lt * ref_tsr(S) + lc * ref_csa(S, tau)
    (sum(losses) + R).backward()
    torch.testing.assert_close(info.extras["rep_mtl"], R.detach(), rtol=1e-12, atol=0)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)


def test_regulariser_reaches_the_trunk_and_heads() -> None:
    # with λ = 0 the step is the plain sum; with λ > 0 both the trunk and the heads move
    net0, net1 = Net(False).double(), Net(False).double()
    x, y = net0.data()
    mtlbal.Balancer(
        net0.trunk, at=net0.trunk, transforms=RepMTL(lambda_tsr=0, lambda_csa=0)
    ).backward(net0.losses(x, y))
    plain = Net(False).double()
    sum(plain.losses(x, y).values()).backward()
    for p, q in zip(net0.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-13, atol=1e-15)
    mtlbal.Balancer(net1.trunk, at=net1.trunk, transforms=RepMTL()).backward(net1.losses(x, y))
    for mod in (net1.trunk, net1.heads):
        diff = sum(
            (p.grad - q.grad).abs().sum()
            for p, q in zip(
                mod.parameters(), (plain.trunk if mod is net1.trunk else plain.heads).parameters()
            )
        )
        assert diff > 1e-8


def test_composes_with_an_aggregator() -> None:
    # UPGrad's combination of the saliencies plus ∂R/∂z at the trunk
    net, ref = Net(False).double(), Net(False).double()
    x, y = net.data()
    info = mtlbal.Balancer(
        net.trunk, at=net.trunk, aggregator=UPGrad(), transforms=RepMTL()
    ).backward(net.losses(x, y))
    z = ref.trunk(x)
    zl = z.detach().requires_grad_(True)
    losses = [(i + 1.0) * (h(zl)[:, 0] - y[:, i]).pow(2).mean() for i, h in enumerate(ref.heads)]
    S = [torch.autograd.grad(L, zl, create_graph=True)[0] for L in losses]
    R = 0.9 * ref_tsr([s[..., None] for s in S]) + 0.9 * ref_csa([s[..., None] for s in S], 0.5)
    dR = torch.autograd.grad(R, zl, retain_graph=True)[0]
    J = torch.stack([s.detach().reshape(-1) for s in S])
    d = UPGrad()(J).reshape(z.shape)
    z.backward(d + dR)
    (sum(losses) + R).backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    assert info.grad_weights is not None


def test_kernels_and_refusals() -> None:
    S = torch.zeros(2, 3, 4, dtype=torch.float64)
    S[0, :, 0] = 1.0
    S[1, :, 1] = 1.0  # other channels, same channel-mean magnitude: P = (1/2, 1/2)
    assert float(rep_mtl_tsr(S)) == pytest.approx(math.log(2), rel=1e-10)
    S[1] = 0.0  # one task salient everywhere it is non-zero: no entropy
    assert float(rep_mtl_tsr(S)) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="at least 2 samples"):
        rep_mtl_csa(torch.randn(2, 1, 3))
    with pytest.raises(ValueError, match="needs a cut point"):
        mtlbal.Balancer(nn.Linear(2, 2), transforms=RepMTL())
    with pytest.raises(ValueError, match="gradient accumulation"):
        lin = nn.Linear(2, 2)
        mtlbal.Balancer(lin, at=lin, transforms=RepMTL(), accumulate=2)
    with pytest.raises(ValueError, match="tau"):
        RepMTL(tau=0.0)
    with pytest.raises(ValueError, match="lambda_csa"):
        RepMTL(lambda_csa=-1.0)
    assert repr(RepMTL(tau=0.2)) == "RepMTL(tau=0.2)"
