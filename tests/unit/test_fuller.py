"""FULLER-style multi-level calibration: task level at a cut point, modality level at branches.

The references below recompute everything with plain autograd on an independent copy of the
model (per-task gradients one task at a time, the aggregators' two-task closed forms, the norm
matching written out), in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import mtlbal
from mtlbal.aggregation import MGDA, PCGrad
from mtlbal.functional import calibrate_branch_grads
from mtlbal.presets import fuller, fuller_modality_level, fuller_task_level
from mtlbal.transforms import BranchCalibration

DT = torch.float64


class Net(nn.Module):
    """Two modality branches, a fusion (concat, sum or attention), a trunk's last layer, heads."""

    def __init__(self, fusion: str = "concat", seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cam = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
        self.lid = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.fusion = fusion
        if fusion == "attention":
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.fuse = nn.Sequential(nn.Linear(12 if fusion == "concat" else 6, 7), nn.Tanh())
        self.last = nn.Linear(7, 5)
        self.heads = nn.ModuleList([nn.Linear(5, 1), nn.Linear(5, 2)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        self.to(DT)

    def backbone(self) -> list[nn.Module]:
        mods: list[nn.Module] = [self.cam, self.lid, self.fuse, self.last]
        if self.fusion == "attention":
            mods.append(self.attn)
        return mods

    def forward(self, xc: Tensor, xl: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fc, fl = self.cam(xc), self.lid(xl)
        if self.fusion == "concat":
            h = torch.cat([fc, fl], dim=-1)
        elif self.fusion == "sum":
            h = fc + 0.3 * fl
        else:
            q, kv = fc.unsqueeze(1), torch.stack([fc, fl], dim=1)
            h = self.attn(q, kv, kv, need_weights=False)[0].squeeze(1)
        z = self.last(self.fuse(h))
        return z, self.heads[0](z), self.heads[1](z)


def data(seed: int = 1, n: int = 9) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, generator=g, dtype=DT),
        torch.randn(n, 4, generator=g, dtype=DT),
        torch.randn(n, 1, generator=g, dtype=DT),
        torch.randn(n, 2, generator=g, dtype=DT),
    )


def losses(out: tuple[Tensor, Tensor, Tensor], y1: Tensor, y2: Tensor) -> list[Tensor]:
    _, o1, o2 = out
    # task 2 pulls the shared representation against task 1 (a conflict)
    l1 = (o1 - y1).pow(2).mean()
    return [l1, 0.3 * (o2 - y2).pow(2).mean() - 1.5 * l1]


def record_branch_grads(net: Net) -> list[list[Tensor]]:
    """Independent probe: the gradient arriving at each branch output (Tanh output)."""
    rec: list[list[Tensor]] = [[], []]
    for k, mod in enumerate([net.cam[1], net.lid[1]]):

        def fwd(m: nn.Module, a: object, out: Tensor, k: int = k) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: rec[k].append(g.detach().clone()))

        mod.register_forward_hook(fwd)
    return rec


def pcgrad2(z1: Tensor, z2: Tensor) -> Tensor:
    """Two-task PCGrad (order-free for two tasks), sum of the projected gradients."""
    d = (z1 * z2).sum()
    p1 = z1 - torch.clamp(d, max=0) / (z2 * z2).sum() * z2
    p2 = z2 - torch.clamp(d, max=0) / (z1 * z1).sum() * z1
    return p1 + p2


def mgda2(z1: Tensor, z2: Tensor) -> Tensor:
    """Two-task min-norm point (interior case), times m = 2."""
    diff = z1 - z2
    gamma = ((z2 - z1) * z2).sum() / (diff * diff).sum()
    assert 0.001 < float(gamma) < 0.999
    return 2.0 * (gamma * z1 + (1 - gamma) * z2)


def reference_grads(
    net: Net, rule: str, target: str | float = "mean"
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """All parameter gradients under FULLER with ``rule`` at ``last``'s output, computed with
    plain autograd on the model (no mtlbal)."""
    xc, xl, y1, y2 = data()
    fc, fl = net.cam(xc), net.lid(xl)
    fc_, fl_ = fc.detach().requires_grad_(), fl.detach().requires_grad_()
    if net.fusion == "concat":
        h = torch.cat([fc_, fl_], dim=-1)
    elif net.fusion == "sum":
        h = fc_ + 0.3 * fl_
    else:
        q, kv = fc_.unsqueeze(1), torch.stack([fc_, fl_], dim=1)
        h = net.attn(q, kv, kv, need_weights=False)[0].squeeze(1)
    z = net.last(net.fuse(h))
    zl = z.detach().requires_grad_()
    L = losses((zl, net.heads[0](zl), net.heads[1](zl)), y1, y2)
    z1 = torch.autograd.grad(L[0], zl, retain_graph=True)[0]
    z2 = torch.autograd.grad(L[1], zl, retain_graph=True)[0]
    assert float((z1 * z2).sum()) < 0, "the test problem must have conflicting tasks"
    comb = pcgrad2(z1, z2) if rule == "pcgrad" else mgda2(z1, z2)
    out: dict[str, Tensor] = {}
    head_params = list(net.heads.named_parameters())
    hg = torch.autograd.grad(L[0] + L[1], [p for _, p in head_params])
    for (n, _), g in zip(head_params, hg):
        out["heads." + n] = g
    mid = [(n, p) for n, p in net.named_parameters() if n.startswith(("fuse", "last", "attn"))]
    grads = torch.autograd.grad(z, [p for _, p in mid] + [fc_, fl_], comb)
    for (n, _), g in zip(mid, grads):
        out[n] = g
    gc, gl = grads[-2], grads[-1]
    nc, nl = gc.norm(), gl.norm()
    tau = {"mean": (nc + nl) / 2, "max": torch.maximum(nc, nl), "min": torch.minimum(nc, nl)}
    t = tau[target] if isinstance(target, str) else torch.tensor(float(target), dtype=DT)
    cal = [gc * t / nc, gl * t / nl]
    branch = [(n, p) for n, p in net.named_parameters() if n.startswith(("cam", "lid"))]
    bg = torch.autograd.grad([fc, fl], [p for _, p in branch], cal)
    for (n, _), g in zip(branch, bg):
        out[n] = g
    return out, cal


@pytest.mark.parametrize("fusion", ["concat", "sum", "attention"])
@pytest.mark.parametrize("rule", ["pcgrad", "mgda"])
def test_fuller_matches_independent_reference(fusion: str, rule: str) -> None:
    net = Net(fusion)
    ref_net = copy.deepcopy(net)
    rec = record_branch_grads(net)
    # eps=0: the reference projects without PCGrad's 1e-8 guard on ‖g_j‖²
    agg = PCGrad(seed=0, eps=0.0) if rule == "pcgrad" else MGDA()
    b = fuller(net.backbone(), net.last, [net.cam, net.lid], aggregator=agg)
    xc, xl, y1, y2 = data()
    info = b.backward(losses(net(xc, xl), y1, y2))
    # modality level: equal norms at the branch outputs (independent probe)
    n0, n1 = rec[0][0].norm(), rec[1][0].norm()
    assert float(abs(n0 - n1) / n1) < 1e-6
    # everything equals the reference
    expected, cal = reference_grads(ref_net, rule)
    torch.testing.assert_close(rec[0][0], cal[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rec[1][0], cal[1], rtol=1e-9, atol=1e-12)
    for n, p in net.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-7, atol=1e-10, msg=n)
    assert info.extras["branch_norms"].shape == (2,)
    assert info.conflict is not None and float(info.conflict) == 1.0


@pytest.mark.parametrize("target", ["mean", "max", "min", 0.25])
def test_targets(target: str | float) -> None:
    net = Net()
    ref_net = copy.deepcopy(net)
    rec = record_branch_grads(net)
    b = fuller(
        net.backbone(), net.last, [net.cam, net.lid], aggregator=PCGrad(eps=0.0), target=target
    )
    xc, xl, y1, y2 = data()
    b.backward(losses(net(xc, xl), y1, y2))
    _, cal = reference_grads(ref_net, "pcgrad", target)
    for k in range(2):
        torch.testing.assert_close(rec[k][0], cal[k], rtol=1e-9, atol=1e-12)
    if not isinstance(target, str):
        assert abs(float(rec[0][0].norm()) - target) < 1e-9


def test_per_sample_norms_match() -> None:
    net = Net()
    rec = record_branch_grads(net)
    b = fuller(net.backbone(), net.last, [net.cam, net.lid], per_sample=True)
    xc, xl, y1, y2 = data()
    b.backward(losses(net(xc, xl), y1, y2))
    n0, n1 = rec[0][0].norm(dim=1), rec[1][0].norm(dim=1)
    torch.testing.assert_close(n0, n1, rtol=1e-6, atol=0)
    assert float((n0 - n0.mean()).abs().max()) > 1e-6  # genuinely per sample


def test_modality_level_only_is_plain_sum_then_matched() -> None:
    net = Net()
    ref = copy.deepcopy(net)
    rec = record_branch_grads(net)
    b = fuller_modality_level(net.backbone(), [net.cam, net.lid])
    assert b.aggregator is None
    xc, xl, y1, y2 = data()
    info = b.backward(losses(net(xc, xl), y1, y2))
    assert info.gramian is None  # no per-task gradients were formed
    # reference: plain backward of the sum, then matching at the branch outputs
    fc, fl = ref.cam(xc), ref.lid(xl)
    fc_, fl_ = fc.detach().requires_grad_(), fl.detach().requires_grad_()
    z = ref.last(ref.fuse(torch.cat([fc_, fl_], -1)))
    total = sum(losses((z, ref.heads[0](z), ref.heads[1](z)), y1, y2))
    assert isinstance(total, Tensor)
    total.backward()
    assert fc_.grad is not None and fl_.grad is not None
    tau = (fc_.grad.norm() + fl_.grad.norm()) / 2
    torch.autograd.backward(
        [fc, fl], [fc_.grad * tau / fc_.grad.norm(), fl_.grad * tau / fl_.grad.norm()]
    )
    for (n, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=n)
    assert abs(float(rec[0][0].norm() / rec[1][0].norm()) - 1) < 1e-6


def test_task_level_only_equals_plain_cut_balancer() -> None:
    net = Net()
    ref = copy.deepcopy(net)
    b1 = fuller_task_level(net.backbone(), net.last)
    b2 = mtlbal.Balancer(ref.backbone(), aggregator=PCGrad(seed=0), at=ref.last)
    xc, xl, y1, y2 = data()
    for _ in range(3):
        for m, b in ((net, b1), (ref, b2)):
            m.zero_grad()
            b.backward(losses(m(xc, xl), y1, y2))
        for p, q in zip(net.parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad)


def test_resume_continues_exactly() -> None:
    def run(steps: int, state: dict | None = None, net: Net | None = None) -> tuple[Net, dict]:
        net = net if net is not None else Net()
        b = fuller(net.backbone(), net.last, [net.cam, net.lid])
        opt = mtlbal.wrap(torch.optim.AdamW(net.parameters(), lr=0.01), b)
        if state is not None:
            opt.load_state_dict(state)
        for s in range(steps):
            xc, xl, y1, y2 = data(seed=10 + s)
            opt.zero_grad()
            opt.backward(losses(net(xc, xl), y1, y2))
            opt.step()
        return net, opt.state_dict()

    full, _ = run(6)
    half, sd = run(3)
    fresh = Net(seed=5)
    fresh.load_state_dict(half.state_dict())
    # the resumed run must see the later batches: shift by replaying seeds 13..15
    b = fuller(fresh.backbone(), fresh.last, [fresh.cam, fresh.lid])
    opt = mtlbal.wrap(torch.optim.AdamW(fresh.parameters(), lr=0.01), b)
    opt.load_state_dict(sd)
    for s in range(3, 6):
        xc, xl, y1, y2 = data(seed=10 + s)
        opt.zero_grad()
        opt.backward(losses(fresh(xc, xl), y1, y2))
        opt.step()
    for p, q in zip(full.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_errors() -> None:
    net = Net()
    with pytest.raises(ValueError, match="at least two"):
        BranchCalibration([net.cam])
    with pytest.raises(ValueError, match="cut point downstream"):
        # refused when built, before any step could touch gradients or strategy state
        mtlbal.Balancer(net.backbone(), aggregator=MGDA(), branches=[net.cam, net.lid])
    # and the refused Balancer left no hook behind: the branches' outputs are not replaced
    xc, *_ = data()
    assert net.cam(xc).grad_fn is not None
    with pytest.raises(ValueError, match="cannot also be the cut"):
        mtlbal.Balancer(net.backbone(), at=net.cam, branches=[net.cam, net.lid])
    with pytest.raises(ValueError, match="target"):
        BranchCalibration([net.cam, net.lid], target="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a task-level cut"):
        fuller(net.backbone(), None, None)
    with pytest.raises(ValueError, match="task-level aggregator needs"):
        fuller(net.backbone(), None, [net.cam, net.lid], aggregator=MGDA())


def test_remove_and_skip_drop_captures() -> None:
    net = Net()
    b = fuller(net.backbone(), net.last, [net.cam, net.lid], nonfinite="skip")
    xc, xl, y1, y2 = data()
    out = net(xc, xl)
    info = b.backward([losses(out, y1, y2)[0] * float("nan"), losses(out, y1, y2)[1]])
    assert info.skipped
    assert all(not c.captured for c in b._branches.cuts)  # type: ignore[union-attr]
    b.backward(losses(net(xc, xl), y1, y2))
    b.remove()
    z, _, _ = net(xc, xl)
    assert z.grad_fn is not None and net.cam(xc).grad_fn is not None


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 50.0)), min_size=2, max_size=5),
    st.sampled_from(["mean", "max", "min"]),
    st.integers(0, 10_000),
)
def test_kernel_properties(scales: list[float], target: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(3, 4, generator=g, dtype=DT) * s for s in scales]
    out = calibrate_branch_grads(grads, target=target)  # type: ignore[arg-type]
    norms = [float(x.norm()) for x in grads]
    live = [n for n in norms if n > 0]
    tau = {"mean": sum(live) / max(len(live), 1), "max": max(norms), "min": min(live or [0.0])}[
        target
    ]
    for x, y, n in zip(grads, out, norms):
        if n == 0:
            assert torch.equal(y, torch.zeros_like(y))
        else:
            assert abs(float(y.norm()) - tau) <= 1e-9 * max(tau, 1.0)
            # same direction
            assert float((x * y).sum()) >= 0


def test_fuller_with_sparse_mask_masks_branches_and_trunk() -> None:
    net = Net()
    mask = mtlbal.transforms.SparseMask(k=2)
    b = fuller(net.backbone(), net.last, [net.cam, net.lid], transforms=mask)
    xc, xl, y1, y2 = data()
    b.backward(losses(net(xc, xl), y1, y2))
    checked = 0
    for mod in (net.cam[0], net.lid[0], net.fuse[0], net.last):
        mk = mask.mask_for(mod.weight)
        assert mk is not None and mod.weight.grad is not None
        assert bool((mod.weight.grad[~mk] == 0).all())
        assert bool((mod.weight.grad[mk] != 0).any())
        checked += 1
    assert checked == 4
