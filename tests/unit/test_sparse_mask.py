"""SparseMask: selection rules against naive loops, frozen entries bitwise frozen under real
optimizers, masking before aggregation (statistics on live coordinates), state and resume."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import mtlbal
from mtlbal.aggregation import MGDA, PCGrad
from mtlbal.diagnostics import ConflictIncidence
from mtlbal.functional import global_mask, psn_mask
from mtlbal.transforms import SparseMask

DT = torch.float64


# ---------------------------------------------------------------------- naive references
def ref_psn_rows(w: Tensor, k: int) -> Tensor:
    """Row r keeps the k indices with the largest |w[r]| (naive loop over neurons)."""
    flat = w.detach().reshape(w.shape[0], -1).abs()
    out = torch.zeros_like(flat, dtype=torch.bool)
    for r in range(flat.shape[0]):
        order = sorted(range(flat.shape[1]), key=lambda j: -float(flat[r, j]))
        for j in order[: min(k, flat.shape[1])]:
            out[r, j] = True
    return out.reshape(w.shape)


def ref_psn_convT(w: Tensor, groups: int, k: int) -> Tensor:
    """ConvTranspose weight [C_in, C_out/g, kh, kw]: output channel o of group gi gathers
    w[gi*C_in/g:(gi+1)*C_in/g, o_local, :, :]."""
    c_in, c_out_g = w.shape[0], w.shape[1]
    cin_g = c_in // groups
    out = torch.zeros_like(w, dtype=torch.bool)
    for gi in range(groups):
        for j in range(c_out_g):
            block = w.detach()[gi * cin_g : (gi + 1) * cin_g, j].abs()
            idx = sorted(range(block.numel()), key=lambda t: -float(block.reshape(-1)[t]))[:k]
            sub = torch.zeros(block.numel(), dtype=torch.bool)
            sub[idx] = True
            out[gi * cin_g : (gi + 1) * cin_g, j] = sub.reshape(block.shape)
    return out


def test_psn_linear_conv_convT_attention() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(10, 4)
    conv = nn.Conv2d(3, 5, 3)
    convT = nn.ConvTranspose2d(4, 6, 2, groups=2)
    attn = nn.MultiheadAttention(8, 2)
    m = SparseMask([lin, conv, convT, attn], k=5)
    assert torch.equal(m.mask_for(lin.weight), ref_psn_rows(lin.weight, 5))
    assert torch.equal(m.mask_for(conv.weight), ref_psn_rows(conv.weight, 5))
    assert torch.equal(m.mask_for(convT.weight), ref_psn_convT(convT.weight, 2, 5))
    assert torch.equal(m.mask_for(attn.in_proj_weight), ref_psn_rows(attn.in_proj_weight, 5))
    assert torch.equal(m.mask_for(attn.out_proj.weight), ref_psn_rows(attn.out_proj.weight, 5))
    # biases trainable by default: no mask at all
    for p in (lin.bias, conv.bias, convT.bias, attn.in_proj_bias, attn.out_proj.bias):
        assert m.mask_for(p) is None and not m.applies_to(p)


def test_psn_k_at_least_fan_in_keeps_all_and_ratio() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(4, 3)
    assert SparseMask(lin, k=4).mask_for(lin.weight) is None  # fan_in ≤ k: whole neuron
    big = nn.Linear(20, 3)
    m = SparseMask(big, ratio=0.26)  # round(5.2) = 5 per neuron
    assert torch.equal(m.mask_for(big.weight), ref_psn_rows(big.weight, 5))


def test_global_ratio_matches_sorting() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    m = SparseMask(net, selection="global", ratio=0.3)
    ws = [net[0].weight, net[2].weight]
    allv = sorted((float(v) for w in ws for v in w.detach().abs().reshape(-1)), reverse=True)
    keep = round(0.3 * len(allv))
    thr = allv[keep - 1]
    for w in ws:
        expected = w.detach().abs() >= thr
        assert torch.equal(m.mask_for(w), expected)
    assert abs(m.trainable_fraction() - (keep + 5 + 4) / (30 + 20 + 9)) < 1e-12


def test_grad_score_closure_equals_given_grads() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(7, 6)

    def closure() -> Tensor:
        return net(x).pow(2).mean()

    g = torch.autograd.grad(closure(), [net[0].weight, net[2].weight])
    a = SparseMask(net, k=2, score="grad", closure=closure)
    b = SparseMask(net, k=2, score="grad", grads={net[0].weight: g[0], net[2].weight: g[1]})
    for w, gw in zip([net[0].weight, net[2].weight], g):
        assert torch.equal(a.mask_for(w), b.mask_for(w))
        assert torch.equal(a.mask_for(w), ref_psn_rows(gw, 2))
        assert not torch.equal(a.mask_for(w), ref_psn_rows(w, 2))  # not the weight rule


def test_bias_norm_freeze_rules() -> None:
    net = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Conv1d(1, 2, 2), nn.BatchNorm1d(2))
    m = SparseMask(net, k=2, biases="freeze", norms="freeze")
    for p in (net[0].bias, net[2].bias, net[1].weight, net[1].bias, net[3].weight):
        mask = m.mask_for(p)
        assert mask is not None and not bool(mask.any())
    m2 = SparseMask(net, k=2, skip=[net[0].weight])
    assert m2.mask_for(net[0].weight) is None and m2.mask_for(net[1].weight) is None


# ---------------------------------------------------------------------- model for training
class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(
            nn.Linear(6, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh()
        )
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1), nn.Linear(8, 2)])

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [h(z) for h in self.heads]


def batch(step: int) -> tuple[Tensor, list[Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 6, generator=g)
    ys = [
        torch.randn(16, 1, generator=g),
        torch.randn(16, 1, generator=g),
        torch.randn(16, 2, generator=g),
    ]
    return x, ys


def task_losses(out: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    return [(o - y).pow(2).mean() for o, y in zip(out, ys)]


OPTS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),
}


@pytest.mark.parametrize("opt_name", list(OPTS))
@pytest.mark.parametrize("mode", ["plain", "mgda", "cut"])
def test_frozen_entries_bitwise_unchanged(opt_name: str, mode: str) -> None:
    net = Net()
    mask = SparseMask(k=3, biases="freeze")
    kw: dict = {"transforms": mask}
    if mode == "mgda":
        kw["aggregator"] = MGDA()
    if mode == "cut":
        kw.update(aggregator=PCGrad(seed=0), at=net.trunk)
    b = mtlbal.Balancer(net.trunk, **kw)
    opt = mtlbal.wrap(OPTS[opt_name](list(net.parameters())), b)
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    for step in range(15):
        x, ys = batch(step)
        opt.zero_grad()
        opt.backward(task_losses(net(x), ys))
        for p in net.trunk.parameters():
            mk = mask.mask_for(p)
            if mk is not None:
                assert p.grad is not None and bool((p.grad[~mk] == 0).all())
        opt.step()
    moved = 0
    for n, p in net.trunk.named_parameters():
        mk = mask.mask_for(p)
        if mk is None:
            continue
        assert torch.equal(p.detach()[~mk], init["trunk." + n][~mk]), n
        moved += int((p.detach()[mk] != init["trunk." + n][mk]).sum())
    assert moved > 0
    assert not torch.equal(net.trunk[1].weight, init["trunk.1.weight"])  # norm layer trains
    assert not torch.equal(net.heads[0].weight, init["heads.0.weight"])


def test_bare_balancer_needs_after_step() -> None:
    net = Net()
    mask = SparseMask(k=3)
    b = mtlbal.Balancer(net.trunk, transforms=mask)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    w0 = net.trunk[0].weight.detach().clone()
    x, ys = batch(0)
    b.backward(task_losses(net(x), ys))
    opt.step()
    frozen = ~mask.mask_for(net.trunk[0].weight)
    assert not torch.equal(net.trunk[0].weight.detach()[frozen], w0[frozen])  # decayed
    b.after_step()
    assert torch.equal(net.trunk[0].weight.detach()[frozen], w0[frozen])


def _masked_reference(net: Net, mask: SparseMask, x: Tensor, ys: list[Tensor]) -> Tensor:
    """Per-task gradients of the trunk, one task at a time, masked: the Jacobian [m, n]."""
    rows = []
    ps = list(net.trunk.parameters())
    for L in task_losses(net(x), ys):
        gs = torch.autograd.grad(L, ps, retain_graph=True)
        parts = []
        for p, g in zip(ps, gs):
            mk = mask.mask_for(p)
            parts.append((g if mk is None else g * mk).reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def test_mask_applies_before_aggregation_and_statistics() -> None:
    net = Net().to(DT)
    ref = copy.deepcopy(net)
    mask = SparseMask(k=2)
    b = mtlbal.Balancer(net.trunk, aggregator=MGDA(), transforms=mask)
    x, ys = batch(0)
    x, ys = x.to(DT), [y.to(DT) for y in ys]
    info = b.backward(task_losses(net(x), ys))
    ref_mask = SparseMask(ref.trunk, k=2)
    J = _masked_reference(ref, ref_mask, x, ys)
    G = J @ J.T
    assert info.gramian is not None
    torch.testing.assert_close(info.gramian, G, rtol=1e-10, atol=1e-14)
    norms = J.norm(dim=1)
    cos = (J @ J.T) / (norms[:, None] * norms[None, :])
    pairs = [(0, 1), (0, 2), (1, 2)]
    conflict = sum(float(cos[i, j]) < 0 for i, j in pairs) / 3
    assert info.conflict is not None and float(info.conflict) == conflict
    # the update is Jᵀ w on the masked Jacobian
    assert info.grad_weights is not None
    g = info.grad_weights @ J
    got = torch.cat([p.grad.reshape(-1) for p in net.trunk.parameters()])
    torch.testing.assert_close(got, g, rtol=1e-10, atol=1e-14)
    # and masking changes the statistics: the unmasked Gramian differs
    full = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(L, list(ref.trunk.parameters()), retain_graph=True)
                ]
            )
            for L in task_losses(ref(x), ys)
        ]
    )
    assert not torch.allclose(full @ full.T, G)


def test_plain_path_masks_without_per_task_grads() -> None:
    net = Net().to(DT)
    ref = copy.deepcopy(net)
    mask = SparseMask(k=3)
    b = mtlbal.Balancer(net.trunk, transforms=mask)
    x, ys = batch(1)
    x, ys = x.to(DT), [y.to(DT) for y in ys]
    info = b.backward(task_losses(net(x), ys))
    assert info.gramian is None and info.conflict is None  # one ordinary backward
    total = sum(task_losses(ref(x), ys))
    assert isinstance(total, Tensor)
    total.backward()
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        mk = mask.mask_for(p)
        expected = q.grad if mk is None else q.grad * mk
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=0, msg=n)


def test_conflict_with_diagnostics_at_params_and_cut() -> None:
    net = Net().to(DT)
    mask = SparseMask(k=2)
    b = mtlbal.Balancer(net.trunk, transforms=mask, diagnostics=True)
    tr = ConflictIncidence()
    b.register_hook(tr)
    ref = copy.deepcopy(net)
    x, ys = batch(2)
    x, ys = x.to(DT), [y.to(DT) for y in ys]
    info = b.backward(task_losses(net(x), ys))
    J = _masked_reference(ref, SparseMask(ref.trunk, k=2), x, ys)
    c = torch.nn.functional.cosine_similarity(J[:, None], J[None, :], dim=-1)
    expected = sum(float(c[i, j]) < 0 for i, j in [(0, 1), (0, 2), (1, 2)]) / 3
    assert info.conflict is not None and float(info.conflict) == expected
    assert tr.summary()["mean"] == expected
    # at a cut: statistics at the representation; the mask still reaches the trunk's .grad
    net2 = Net().to(DT)
    mask2 = SparseMask(k=2)
    b2 = mtlbal.Balancer(net2.trunk, transforms=mask2, at=net2.trunk, diagnostics=True)
    info2 = b2.backward(task_losses(net2(x), ys))
    assert info2.conflict is not None and info2.gramian is not None
    z = net2.trunk(x).detach().requires_grad_()
    Z = torch.stack(
        [
            torch.autograd.grad(L, z, retain_graph=True)[0].reshape(-1)
            for L in task_losses([h(z) for h in net2.heads], ys)
        ]
    )
    torch.testing.assert_close(info2.gramian, Z @ Z.T, rtol=1e-10, atol=1e-14)
    mk = mask2.mask_for(net2.trunk[0].weight)
    assert bool((net2.trunk[0].weight.grad[~mk] == 0).all())


def test_conflict_incidence_running_means() -> None:
    tr = ConflictIncidence()

    class Info:
        def __init__(self, v: float) -> None:
            self.conflict = torch.tensor(v, dtype=DT)
            self.skipped = False

    for v in [1.0, 0.0, 1.0, 1.0 / 3, 1.0 / 3, 0.0]:
        tr.update(Info(v))
    s = tr.summary()
    assert abs(s["mean"] - (2 + 2 / 3) / 6) < 1e-12
    assert abs(s["last_half"] - (2 / 3) / 3) < 1e-12
    tr2 = ConflictIncidence()
    for e, vals in enumerate([[1.0, 1.0], [0.0], [0.5, 0.5, 0.5], [0.0]]):
        for v in vals:
            tr2.update(Info(v))
        if e < 3:
            tr2.epoch_end()
    # 4 epochs: the last two are [0.5, 0.5, 0.5] and [0.0]
    assert abs(tr2.summary()["last_half"] - 1.5 / 4) < 1e-12


def test_state_round_trip_and_resume() -> None:
    def make(seed: int) -> tuple[Net, SparseMask, mtlbal.BalancedOptimizer]:
        net = Net(seed)
        mask = SparseMask(k=3, biases="freeze")
        b = mtlbal.Balancer(net.trunk, aggregator=PCGrad(seed=4), transforms=mask)
        return (
            net,
            mask,
            mtlbal.wrap(torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1), b),
        )

    def steps(net: Net, opt: mtlbal.BalancedOptimizer, r: range) -> None:
        for s in r:
            x, ys = batch(s)
            opt.zero_grad()
            opt.backward(task_losses(net(x), ys))
            opt.step()

    full, _, fopt = make(0)
    steps(full, fopt, range(10))
    half, hmask, hopt = make(0)
    steps(half, hopt, range(5))
    model_sd, opt_sd = copy.deepcopy(half.state_dict()), copy.deepcopy(hopt.state_dict())
    # fresh objects from another init: a different selection, overwritten by the checkpoint
    res, rmask, ropt = make(7)
    assert not torch.equal(
        rmask.mask_for(res.trunk[0].weight), hmask.mask_for(half.trunk[0].weight)
    )
    ropt.load_state_dict(opt_sd)  # the balancer state before the model weights: allowed
    res.load_state_dict(model_sd)
    for p, q in zip(hmask.params, rmask.params):
        a, c = hmask.mask_for(p), rmask.mask_for(q)
        assert (a is None and c is None) or torch.equal(a, c)
    steps(res, ropt, range(5, 10))
    for p, q in zip(full.parameters(), res.parameters()):
        assert torch.equal(p, q)
    # the frozen entries of the resumed run are those of the first run's initialisation
    init = Net(0)
    mk = rmask.mask_for(res.trunk[3].weight)
    assert torch.equal(res.trunk[3].weight.detach()[~mk], init.trunk[3].weight.detach()[~mk])


def test_errors() -> None:
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="exactly one of k"):
        SparseMask(lin, k=2, ratio=0.5)
    with pytest.raises(ValueError, match="exactly one of k"):
        SparseMask(lin)
    with pytest.raises(ValueError, match="needs ratio"):
        SparseMask(lin, selection="global", k=3)
    with pytest.raises(ValueError, match="grads= or closure="):
        SparseMask(lin, k=2, score="grad")
    with pytest.raises(ValueError, match="ratio must be"):
        SparseMask(lin, ratio=1.5)
    other = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="does not balance"):
        mtlbal.Balancer(other, transforms=SparseMask(lin, k=2))
    saved = SparseMask(nn.Linear(6, 3), k=2).state_dict()
    with pytest.raises((ValueError, RuntimeError)):
        SparseMask(nn.Linear(5, 3), k=2).load_state_dict(saved)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(1, 14), st.integers(0, 10_000))
def test_psn_kernel_properties(n: int, fan_in: int, k: int, seed: int) -> None:
    scores = torch.rand(n, fan_in, generator=torch.Generator().manual_seed(seed))
    mask = psn_mask(scores, k)
    assert mask.shape == scores.shape
    assert torch.equal(mask.sum(1), torch.full((n,), min(k, fan_in)))
    # every kept score of a row is ≥ every dropped score of that row
    for r in range(n):
        kept, dropped = scores[r][mask[r]], scores[r][~mask[r]]
        if dropped.numel():
            assert float(kept.min()) >= float(dropped.max())


@settings(max_examples=30, deadline=None)
@given(st.floats(0.01, 1.0), st.integers(0, 10_000))
def test_global_kernel_properties(ratio: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(3, 4, generator=g), torch.rand(5, generator=g)]
    masks = global_mask(scores, ratio)
    kept = torch.cat([s[m] for s, m in zip(scores, masks)])
    dropped = torch.cat([s[~m] for s, m in zip(scores, masks)])
    assert kept.numel() == max(1, round(ratio * 17))
    if dropped.numel():
        assert float(kept.min()) >= float(dropped.max())
