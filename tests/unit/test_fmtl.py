"""F-MTL (mtlbal.aggregation.FMTL): per-task SAM, loss and flatness directions aggregated apart.

The float64 reference is written from the equations (module docstring of fmtl.py; the official
code VietHoang1512/FS-MTL @1f20b2cd59ac, nyuv2/train.py, read for the decomposition: separate
norms for the shared part and task t's head, ASAM's θ²⊙g / ‖|θ|⊙g‖, one perturbed forward and
L_t's backward per task, h_t = ĝ_t − g_t, Agg(g) + Agg(h)), with
torch.func.functional_call on explicitly perturbed parameter dicts: nothing of the Balancer's
path is used to build it.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import mtlbal
from conftest import assert_same, make_problem
from mtlbal.aggregation import FMTL, PCGrad, Sum, UPGrad
from mtlbal.aggregation.fmtl import fmtl_direction, sam_perturbation
from registry import CLOSURE_ENTRIES

M = 3


def _reference(p, rho: float, adaptive: bool, inner=None):
    """(shared update, head grads) from the equations, float64, one task at a time."""
    trunk, heads = p.trunk, p.heads
    tp = dict(trunk.named_parameters())
    names = list(tp)

    def task_loss(t: int, tparams: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        z = functional_call(trunk, tparams, (p.x,))
        pred = functional_call(heads[t], hparams, (z,))
        return (t + 1.0) * (pred - p.ys[t]).pow(2).mean() + 0.1 * (t + 1)

    def grads(t, tparams, hparams):
        tl = {k: v.detach().requires_grad_(True) for k, v in tparams.items()}
        hl = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
        loss = task_loss(t, tl, hl)
        gs = torch.autograd.grad(loss, [*tl.values(), *hl.values()])
        return list(gs[: len(tl)]), list(gs[len(tl) :])

    def eps(gs, ps):
        if adaptive:
            norm = torch.sqrt(sum(((q.abs() * g) ** 2).sum() for q, g in zip(ps, gs)))
            return [rho * q**2 * g / (norm + 1e-12) for q, g in zip(ps, gs)]
        norm = torch.sqrt(sum((g**2).sum() for g in gs))
        return [rho * g / (norm + 1e-12) for g in gs]

    J, H, head_grads = [], [], []
    for t in range(M):
        hp = {k: v.detach() for k, v in heads[t].named_parameters()}
        tpd = {k: v.detach() for k, v in tp.items()}
        gs, gh = grads(t, tpd, hp)
        es = eps(gs, list(tpd.values()))
        eh = eps(gh, list(hp.values()))
        tpp = {k: tpd[k] + e for k, e in zip(names, es)}
        hpp = {k: hp[k] + e for k, e in zip(hp, eh)}
        gs2, gh2 = grads(t, tpp, hpp)
        J.append(torch.cat([g.reshape(-1) for g in gs]))
        H.append(torch.cat([(b - a).reshape(-1) for a, b in zip(gs, gs2)]))
        head_grads.append(gh2)
    J, H = torch.stack(J), torch.stack(H)
    shared = J.sum(0) + H.sum(0) if inner is None else inner(J) + inner(H)
    return shared, head_grads


def _closure(p):
    return lambda: p.losses()


def _flat_grad(params) -> Tensor:
    return torch.cat([q.grad.reshape(-1) for q in params])


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_the_equations_float64(adaptive: bool) -> None:
    p = make_problem(M, dtype=torch.float64, seed=1)
    rho = 0.3 if adaptive else 0.05
    want_shared, want_heads = _reference(p, rho, adaptive)
    bal = mtlbal.Balancer(p.trunk, aggregator=FMTL(rho=rho, adaptive=adaptive))
    info = bal.backward(p.losses(), closure=_closure(p))
    torch.testing.assert_close(_flat_grad(p.trunk.parameters()), want_shared, rtol=1e-10, atol=0)
    for t in range(M):
        for q, w in zip(p.heads[t].parameters(), want_heads[t]):
            torch.testing.assert_close(q.grad, w, rtol=1e-10, atol=1e-15)
    assert info.extras["flat_norms"].shape == (M,)
    assert (info.extras["flat_norms"] > 0).all()


def test_inner_aggregator_applied_separately_to_both_sets() -> None:
    p = make_problem(M, dtype=torch.float64, seed=2)
    want, _ = _reference(p, 0.05, False, inner=UPGrad())
    bal = mtlbal.Balancer(p.trunk, aggregator=FMTL(UPGrad(), rho=0.05))
    bal.backward(p.losses(), closure=_closure(p))
    got = _flat_grad(p.trunk.parameters())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-14)
    # and not UPGrad of the sharpness-aware gradients (the ablation "a-UPGrad")
    joint, _ = _reference(p, 0.05, False, inner=lambda X: X.sum(0))
    assert not torch.allclose(got, joint, rtol=1e-6)


def test_kernels() -> None:
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    e = sam_perturbation(g, [torch.ones(2), torch.ones(1, 1)], 2.0)
    torch.testing.assert_close(e[0], torch.tensor([1.2, 0.0]))
    torch.testing.assert_close(e[1], torch.tensor([[1.6]]))
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    Hm = torch.tensor([[0.5, 0.5], [0.0, -1.0]])
    torch.testing.assert_close(fmtl_direction(J, Hm, Sum()), torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(FMTL()(J, flat=Hm), torch.tensor([1.5, 1.5]))
    with pytest.raises(ValueError, match="pass the flatness directions"):
        FMTL()(J)
    # standalone, Agg(cJ) + Agg(cH) = c^d (Agg(J) + Agg(H)) with the wrapped one's degree d = 1
    g = torch.Generator().manual_seed(0)
    J3, H3 = (torch.randn(3, 7, generator=g, dtype=torch.float64) for _ in range(2))
    agg = FMTL(UPGrad())
    for c in (1e-3, 1e3):
        torch.testing.assert_close(
            agg(c * J3, flat=c * H3), c * agg(J3, flat=H3), rtol=1e-9, atol=0
        )


def test_refused_without_closure_and_nothing_changes() -> None:
    p = make_problem(M, seed=3)
    bal = mtlbal.Balancer(p.trunk, aggregator=FMTL(PCGrad(seed=0)))
    before = [q.detach().clone() for q in p.params()]
    with pytest.raises(ValueError, match="FMTL needs a closure"):
        bal.backward(p.losses())
    assert all(q.grad is None for q in p.params())
    assert all(torch.equal(a, q) for a, q in zip(before, p.params()))
    assert bal.step_count == 0
    # a closure nobody needs is refused too (it would be silently ignored)
    plain = mtlbal.Balancer(make_problem(M).trunk, aggregator=UPGrad())
    with pytest.raises(ValueError, match="no strategy of this Balancer needs one"):
        plain.backward(p.losses(), closure=_closure(p))


def test_configurations_refused() -> None:
    p = make_problem(M)
    with pytest.raises(ValueError, match="at='params'"):
        mtlbal.Balancer(p.trunk, at=p.trunk, aggregator=FMTL())
    with pytest.raises(ValueError, match="no gradient accumulation"):
        mtlbal.Balancer(p.trunk, aggregator=FMTL(), accumulate=2)
    with pytest.raises(ValueError, match="rho"):
        FMTL(rho=0.0)
    with pytest.raises(ValueError, match="cannot itself need a closure"):
        FMTL(FMTL())


def test_parameters_and_buffers_restored_bitwise() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(2)])
    x = torch.randn(10, 4)
    trunk(x)  # non-trivial running statistics

    def closure():
        z = trunk(x)
        return [heads[0](z).pow(2).mean(), heads[1](z).sin().mean()]

    params = [*trunk.parameters(), *heads.parameters()]
    bal = mtlbal.Balancer(trunk, aggregator=FMTL(rho=0.5, adaptive=True))
    losses = closure()  # the step's forward updates the running statistics, as any forward
    state = {k: v.clone() for k, v in trunk.state_dict().items()}
    before = [q.detach().clone() for q in params]
    bal.backward(losses, closure=closure)
    assert all(torch.equal(a, q) for a, q in zip(before, params))
    for k, v in trunk.state_dict().items():  # the perturbed forwards left no trace
        assert torch.equal(v, state[k]), k


def test_closure_failure_restores_and_writes_nothing() -> None:
    p = make_problem(M, seed=4)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:  # the second task's perturbed pass
            raise RuntimeError("boom")
        return p.losses()

    bal = mtlbal.Balancer(p.trunk, aggregator=FMTL(PCGrad(seed=1), rho=0.1))
    before = [q.detach().clone() for q in p.params()]
    state = copy.deepcopy(bal.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        bal.backward(p.losses(), closure=closure)
    assert all(torch.equal(a, q) for a, q in zip(before, p.params()))
    assert all(q.grad is None for q in p.params())
    assert_same(bal.state_dict(), state, "state")
    assert bal.step_count == 0
    # wrong task names from the closure: a clear error, parameters restored
    bad = mtlbal.Balancer(p.trunk, aggregator=FMTL())
    with pytest.raises(ValueError, match="no task 'task0'"):
        bad.backward(p.losses(), closure=lambda: {"x": p.losses()["task0"]})
    assert all(torch.equal(a, q) for a, q in zip(before, p.params()))


def test_nonfinite_perturbed_loss_refused() -> None:
    p = make_problem(M, seed=5)
    n = []

    def closure():
        n.append(1)
        out = p.losses()
        if len(n) == 1:
            out["task0"] = out["task0"] * float("nan")
        return out

    bal = mtlbal.Balancer(p.trunk, aggregator=FMTL())
    with pytest.raises(ValueError, match="perturbed parameters"):
        bal.backward(p.losses(), closure=closure)
    assert all(q.grad is None for q in p.params())
    skip = mtlbal.Balancer(p.trunk, aggregator=FMTL(), nonfinite="skip")
    n.clear()
    info = skip.backward(p.losses(), closure=closure)
    assert info.skipped and all(q.grad is None for q in p.params())


def _run(p, opt, k0, k1):
    for _ in range(k0, k1):
        opt.zero_grad()
        opt.backward(p.losses(), closure=_closure(p))
        opt.step()


@pytest.mark.parametrize("entry", CLOSURE_ENTRIES, ids=[e.name for e in CLOSURE_ENTRIES])
def test_resume_equals_uninterrupted_with_adam(entry) -> None:
    def build(seed=6):
        p = make_problem(M, seed=seed)
        bal = mtlbal.Balancer(p.trunk, **entry.make(M))
        return p, mtlbal.wrap(torch.optim.Adam(p.params(), lr=1e-2), bal)

    p1, o1 = build()
    _run(p1, o1, 0, 5)
    p2, o2 = build()
    _run(p2, o2, 0, 2)
    buf = io.BytesIO()
    torch.save({"opt": o2.state_dict(), "model": [q.detach().clone() for q in p2.params()]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    p3, o3 = build(seed=99)  # fresh objects, other initial values
    with torch.no_grad():
        for q, v in zip(p3.params(), saved["model"]):
            q.copy_(v)
    p3.x, p3.ys = p2.x, p2.ys
    o3.load_state_dict(saved["opt"])
    _run(p3, o3, 2, 5)
    for a, b in zip(p1.params(), p3.params()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("entry", CLOSURE_ENTRIES, ids=[e.name for e in CLOSURE_ENTRIES])
def test_refusal_changes_nothing(entry) -> None:
    # a non-finite loss at θ is refused before any perturbed pass: parameters, .grad, state
    p = make_problem(M, seed=7)
    bal = mtlbal.Balancer(p.trunk, **entry.make(M))
    opt = mtlbal.wrap(torch.optim.SGD(p.params(), lr=0.1), bal)
    _run(p, opt, 0, 2)
    grads = [q.grad.clone() for q in p.params()]
    params = [q.detach().clone() for q in p.params()]
    state = copy.deepcopy(bal.state_dict())
    bad = p.losses()
    bad["task1"] = bad["task1"] * float("inf")
    with pytest.raises(ValueError, match="non-finite loss"):
        opt.backward(bad, closure=_closure(p))
    assert all(torch.equal(a, q.grad) for a, q in zip(grads, p.params()))
    assert all(torch.equal(a, q) for a, q in zip(params, p.params()))
    assert_same(bal.state_dict(), state, "state")
