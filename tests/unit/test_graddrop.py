"""GradDrop: a per-coordinate reference of Algorithm 1 (lines 10–15) on Python floats, its
own generator, TorchJD 0.18 parity (torchjd/aggregation/_graddrop.py of the 0.18.0 wheel)."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tj

import mtlbal
from mtlbal.aggregation import GradDrop
from mtlbal.functional import graddrop

from ._agg1_jacobians import F64, cases, jacobian
from ._methods_helpers import check_resume


def reference(jac: torch.Tensor, u: torch.Tensor, leak: list[float]) -> torch.Tensor:
    m, n = jac.shape
    out = []
    for k in range(n):
        col = [float(x) for x in jac[:, k]]
        mass = sum(abs(x) for x in col)
        p = 0.5 * (1 + sum(col) / mass) if mass > 0 else 0.5
        uk = float(u[k])
        total = 0.0
        for t in range(m):
            keep = (p > uk and col[t] > 0) or (p < uk and col[t] < 0)
            total += (leak[t] + (1 - leak[t]) * float(keep)) * col[t]
        out.append(total)
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize(("kind", "m", "seed"), cases())
def test_reference_and_torchjd_parity(kind: str, m: int, seed: int) -> None:
    jac = jacobian(kind, m, seed, n=40)
    leak = [0.0 if t % 2 else 0.25 * (t % 4) for t in range(m)]
    gen = torch.Generator().manual_seed(seed)
    agg = GradDrop(seed=seed)
    for _ in range(2):  # two draws from the stream
        u = torch.rand(40, generator=gen, dtype=F64)
        torch.testing.assert_close(agg(jac), reference(jac, u, [0.0] * m), rtol=1e-12, atol=1e-12)
    # TorchJD draws the same U from the global generator, in the Jacobian's dtype
    torch.manual_seed(seed)
    theirs = tj.GradDrop()(jac)
    torch.testing.assert_close(GradDrop(seed=seed)(jac), theirs, rtol=1e-12, atol=1e-12)
    torch.manual_seed(seed)
    theirs = tj.GradDrop(leak=torch.tensor(leak, dtype=F64))(jac)
    ours = GradDrop(leak, seed=seed)
    torch.testing.assert_close(ours(jac), theirs, rtol=1e-12, atol=1e-12)
    u = torch.rand(40, generator=torch.Generator().manual_seed(seed), dtype=F64)
    torch.testing.assert_close(graddrop(jac, u, torch.tensor(leak)), reference(jac, u, leak))
    torch.testing.assert_close(GradDrop(seed=seed, reduction="mean")(jac), theirs_mean(jac, seed))


def theirs_mean(jac: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return tj.GradDrop()(jac) / jac.shape[0]


def test_agreeing_signs_are_kept_and_zero_columns_give_zero() -> None:
    jac = torch.tensor([[1.0, -2.0, 0.0], [3.0, -1.0, 0.0]], dtype=F64)
    torch.testing.assert_close(GradDrop(seed=0)(jac), torch.tensor([4.0, -3.0, 0.0], dtype=F64))
    g = torch.randn(9, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(GradDrop(seed=1)(g.expand(4, 9).clone()), 4 * g)


def test_one_sign_survives_per_coordinate() -> None:
    jac = jacobian("full", 6, 3, n=200)
    d = GradDrop(seed=2)(jac)
    for k in range(200):
        col = jac[:, k]
        pos, neg = float(col.clamp_min(0).sum()), float(col.clamp_max(0).sum())
        assert float(d[k]) in (pytest.approx(pos, abs=1e-12), pytest.approx(neg, abs=1e-12))


def test_leak_one_keeps_everything() -> None:
    jac = jacobian("full", 4, 1)
    torch.testing.assert_close(GradDrop(leak=1.0)(jac), jac.sum(0))


def test_float32_and_refusals() -> None:
    jac = jacobian("full", 3, 0).float()
    assert GradDrop()(jac).dtype == torch.float32
    with pytest.raises(ValueError, match="2 leaks for 3 tasks"):
        GradDrop(leak=[0.0, 1.0])(jac)
    with pytest.raises(ValueError, match="every leak must be in \\[0, 1\\]"):
        GradDrop(leak=1.5)
    with pytest.raises(ValueError, match="empty"):
        GradDrop(leak=[])
    with pytest.raises(TypeError, match="leak must be a float or a sequence"):
        GradDrop(leak="a")  # type: ignore[arg-type]


def test_state_dict_restores_the_stream() -> None:
    jac = jacobian("full", 3, 2)
    a = GradDrop(seed=1)
    a(jac)
    sd = a.state_dict()
    expected = a(jac)
    b = GradDrop(seed=2)
    b.load_state_dict(sd)
    torch.testing.assert_close(b(jac), expected, rtol=0, atol=0)


def test_resume_equals_uninterrupted() -> None:
    check_resume(lambda: {"aggregator": GradDrop(seed=3)})


def test_through_the_balancer_at_a_cut_point() -> None:
    # the paper's setting: the masks act on the representation gradients, one U per entry
    torch.manual_seed(0)
    trunk = torch.nn.Linear(3, 4).double()
    heads = [torch.nn.Linear(4, 1).double() for _ in range(3)]
    x = torch.randn(5, 3, dtype=F64)
    bal = mtlbal.Balancer(trunk, at=trunk, aggregator=GradDrop(seed=7))
    z = trunk(x)
    bal.backward([(i + 1.0) * h(z).pow(2).mean() for i, h in enumerate(heads)])
    ref_trunk = torch.nn.Linear(3, 4).double()  # a copy without the Balancer's hook
    ref_trunk.load_state_dict(trunk.state_dict())
    zz = ref_trunk(x)
    rows = [
        torch.autograd.grad((i + 1.0) * h(zz).pow(2).mean(), zz, retain_graph=True)[0].flatten()
        for i, h in enumerate(heads)
    ]
    u = torch.rand(zz.numel(), generator=torch.Generator().manual_seed(7), dtype=F64)
    direction = reference(torch.stack(rows), u, [0.0] * 3).reshape(zz.shape)
    expected = torch.autograd.grad(zz, ref_trunk.weight, direction)[0]
    torch.testing.assert_close(trunk.weight.grad, expected, rtol=1e-12, atol=1e-14)
