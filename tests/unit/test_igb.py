"""IGB v1/v2: official weights, epoch bookkeeping, SAC schedule and resume, aggregator combos."""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mtlbal
from mtlbal.aggregation import MGDA, AlignedMTL, PCGrad
from mtlbal.functional import igb_reward, igb_v1_weights
from mtlbal.weighting import IGB, Equal, LossContext
from mtlbal.weighting._sac import Actor


def loss_seq(n: int, m: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(m, generator=gen) * 3 + 0.5
    return [
        scale * (1.0 + 2.0 / (i + 1)) * torch.exp(0.1 * torch.randn(m, generator=gen))
        for i in range(n)
    ]


def drive(
    igb: IGB,
    seq: list[torch.Tensor],
    epoch_every: int,
    start: int = 0,
    lr: list[float] | None = None,
) -> list[torch.Tensor]:
    """Feed losses as the Balancer does: objectives, then observe; epoch_end every k steps."""
    out = []
    for i in range(start, len(seq)):
        L = seq[i]
        ctx = LossContext(step=i, lr_factor=1.0 if lr is None else lr[i])
        igb.objectives(L.clone().requires_grad_(True), ctx)
        assert igb.last_weights is not None
        out.append(igb.last_weights.clone())
        igb.observe(L)
        if (i + 1) % epoch_every == 0:
            igb.epoch_end()
    return out


# ---------------------------------------------------------------- v1
def naive_v1(L: list[float], base: list[float]) -> list[float]:
    e = [math.exp(l_ / b) for l_, b in zip(L, base)]
    return [len(L) * x / sum(e) for x in e]


def test_v1_weights_and_base_losses_exactly_as_official() -> None:
    seq = loss_seq(12, 3)
    igb = IGB(3, check_positive=True)  # base_epoch = 1 (the second epoch)
    ws = drive(igb, seq, epoch_every=4)
    # epochs 0 and 1: warm-up w = 1; base = mean of epoch 1's losses (steps 4..7)
    for w in ws[:8]:
        assert torch.equal(w, torch.ones(3))
    base = [sum(float(seq[i][t]) for i in range(4, 8)) / 4 for t in range(3)]
    assert igb.base_losses is not None
    np.testing.assert_allclose(igb.base_losses.numpy(), base, rtol=1e-6)
    for i in range(8, 12):
        np.testing.assert_allclose(ws[i].numpy(), naive_v1(seq[i].tolist(), base), rtol=1e-5)
        assert abs(float(ws[i].sum()) - 3.0) < 1e-5


def test_v1_objectives_are_weighted_log_losses() -> None:
    igb = IGB(2, base_epoch=0)
    igb.observe(torch.tensor([2.0, 0.5]))
    igb.epoch_end()
    L = torch.tensor([1.0, 0.25], requires_grad=True)
    wl = igb.objectives(L, LossContext())
    w = naive_v1([1.0, 0.25], [2.0, 0.5])
    np.testing.assert_allclose(wl.objectives.detach().numpy(), [w[0] * 0.0, w[1] * math.log(0.25)])
    (grad,) = torch.autograd.grad(wl.objectives.sum(), L)
    np.testing.assert_allclose(grad.numpy(), [w[0] / 1.0, w[1] / 0.25], rtol=1e-6)
    np.testing.assert_allclose(wl.weights.numpy(), grad.numpy(), rtol=1e-6)  # ∂ℓ/∂L reported
    torch.testing.assert_close(igb_v1_weights(L, torch.tensor([2.0, 0.5])), torch.tensor(w))


def _balancer_losses(values: list[float]) -> tuple[Any, dict[str, torch.Tensor]]:
    lin = torch.nn.Linear(3, len(values))
    y = lin(torch.randn(4, 3))
    names = ("seg", "depth", "normal")[: len(values)]
    return lin, {n: (0.0 * y[:, i]).mean() + v for i, (n, v) in enumerate(zip(names, values))}


def test_positivity_policy() -> None:
    # the step's domain: [m] flags, no host read in the weighting; the Balancer refuses the
    # step in its one host sync, naming the task, and changes nothing
    out = IGB(2).objectives(torch.tensor([1.0, 0.0]), LossContext(tasks=("seg", "depth")))
    assert out.domain is not None and out.domain[0].tolist() == [True, False]
    for values, pat in (
        ([1.0, 0.0], r"'depth' \(L = 0\.0\)"),
        ([1.0, -1.0], r"'depth' \(L = -1\.0"),
    ):
        igb = IGB(2)
        lin, losses = _balancer_losses(values)
        bal = mtlbal.Balancer(lin, weighting=igb)
        with pytest.raises(ValueError, match="IGB takes log.*" + pat):
            bal.backward(losses)
        assert bal.step_count == 0 and all(p.grad is None for p in lin.parameters())
        assert igb.epoch_sum is None
    ok = IGB(2, eps=1e-8).objectives(torch.tensor([1.0, 0.0]), LossContext())
    assert torch.isfinite(ok.objectives).all()
    np.testing.assert_allclose(float(ok.objectives[1]), math.log(1e-8), rtol=1e-6)
    unchecked = IGB(2, check_positive=False).objectives(torch.tensor([1.0, 0.0]), LossContext())
    assert torch.isinf(unchecked.objectives[1])
    assert IGB(2).host_sync is False and IGB(2, version=2).host_sync is True


def test_positivity_error_names_task_through_balancer() -> None:
    lin = torch.nn.Linear(3, 2)
    b = mtlbal.Balancer(lin, weighting=IGB(2))
    y = lin(torch.randn(4, 3))
    with pytest.raises(ValueError, match="'depth'"):
        b.backward({"seg": y[:, 0].pow(2).mean() + 0.1, "depth": (y[:, 1] * 0).sum()})


def test_epoch_end_without_steps_in_base_epoch_raises() -> None:
    igb = IGB(2, base_epoch=0)
    with pytest.raises(ValueError, match="without any step"):
        igb.epoch_end()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="version"):
        IGB(2, version=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_tasks"):
        IGB(version=2)
    with pytest.raises(ValueError, match="update_after"):
        IGB(2, version=2, base_epoch=3, update_after=3)


def test_v1_state_round_trip_mid_epoch() -> None:
    seq = loss_seq(14, 3, seed=1)
    full = drive(IGB(3), seq, epoch_every=4)
    a = IGB(3)
    drive(a, seq[:6], epoch_every=4)  # mid-epoch 1 (the base epoch): the running sum matters
    b = IGB(3)
    b.load_state_dict(a.state_dict())
    rest = drive(b, seq, epoch_every=4, start=6)
    for x, y in zip(full[6:], rest):
        assert torch.equal(x, y)


def test_v1_does_not_sync_or_leave_device_state_on_host() -> None:
    igb = IGB(2, base_epoch=0, check_positive=False)
    igb.observe(torch.tensor([1.0, 2.0], dtype=torch.float64))
    igb.observe(torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert isinstance(igb.epoch_sum, torch.Tensor) and igb.epoch_count == 2
    igb.epoch_end()
    assert igb.base_losses is not None
    torch.testing.assert_close(igb.base_losses, torch.tensor([2.0, 3.0], dtype=torch.float64))


# ---------------------------------------------------------------- v2
SMALL: dict[str, Any] = {
    "version": 2,
    "base_epoch": 0,
    "update_after": 1,
    "start_epoch": 2,
    "update_every": 3,
    "batch_size": 16,
    "buffer_size": 40,
    "hidden": (8, 8),
}


def test_v2_reward_and_transitions() -> None:
    m, E = 3, 3
    seq = loss_seq(12, m, seed=2)
    lr = [1.0 + 0.25 * i for i in range(12)]
    igb = IGB(m, **{**SMALL, "update_after": 100, "start_epoch": 100}, seed=1)
    ws = drive(igb, seq, epoch_every=E, lr=lr)
    base = [sum(float(seq[i][t]) for i in range(E)) / E for t in range(m)]
    buf = igb.agent.buffer  # type: ignore[union-attr]
    assert buf.size == 12 - E  # one transition per step once the base losses exist
    for j, t in enumerate(range(E, 12)):
        prev, cur = seq[t - 1].tolist(), seq[t].tolist()
        r = lr[t] * min((p - c) / b for p, c, b in zip(prev, cur, base))
        np.testing.assert_allclose(buf.state[j].numpy(), prev, rtol=1e-6)
        np.testing.assert_allclose(buf.action[j].numpy(), ws[t - 1].numpy(), rtol=1e-6)
        np.testing.assert_allclose(float(buf.reward[j, 0]), r, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(buf.next_state[j].numpy(), cur, rtol=1e-6)
    torch.testing.assert_close(
        igb_reward(
            torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.9]), torch.tensor([1.0, 0.5]), 2.0
        ),
        torch.tensor(2.0 * min(1.0, 0.1 / 0.5)),
    )
    for w in ws:  # random phase: m·softmax(ε)
        assert (w > 0).all() and abs(float(w.sum()) - m) < 1e-5


def test_v2_update_schedule() -> None:
    m, E, U, B, N = 2, 4, 3, 16, 40
    igb = IGB(m, **{**SMALL, "update_every": U, "batch_size": B, "buffer_size": 10}, seed=0)
    agent = igb.agent
    assert agent is not None
    calls: list[tuple[int, int]] = []
    orig = agent.buffer.sample

    def sample(n: int, generator: torch.Generator) -> Any:
        calls.append((igb.sac_step, n))
        return orig(n, generator)

    agent.buffer.sample = sample  # type: ignore[method-assign]
    drive(igb, loss_seq(N, m, seed=3), epoch_every=E)
    expected: list[tuple[int, int]] = []
    for s in range(N):
        epoch = s // E
        size = min(max(s - E + 1, 0), 10)  # transitions stored once base losses exist (step E)
        if epoch >= 1 and s % U == 0:
            k = 1 + size / 10
            expected += [(s, int(B * k / 2))] * int(U * k / 2)
    assert calls == expected
    assert expected  # the schedule did fire


def test_v2_network_sizes() -> None:
    igb = IGB(3, version=2)
    agent = igb.agent
    assert agent is not None
    shapes = [tuple(p.shape) for p in agent.actor.parameters()]
    assert shapes == [(128, 3), (128,), (128, 128), (128,), (3, 128), (3,), (3, 128), (3,)]
    q1 = [tuple(p.shape) for p in agent.critic.q1.parameters()]
    assert q1 == [(128, 6), (128,), (128, 128), (128,), (1, 128), (1,)]
    assert agent.buffer.max_size == 10_000 and agent.gamma == 0.99 and agent.tau == 0.005
    assert agent.target_entropy == -3.0
    np.testing.assert_allclose(float(agent.alpha), 0.2, rtol=1e-6)
    # the agent's networks are not parameters of the Balancer (wrap must not step them)
    assert list(mtlbal.Balancer(torch.nn.Linear(2, 2), weighting=igb).parameters()) == []


def test_actor_log_prob_matches_tanh_squash_formula() -> None:
    torch.manual_seed(0)
    actor = Actor(3, (8,)).double()
    s = torch.rand(5, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    a, logp = actor(s, gen)
    # recompute u with the same noise, then the official formula written with tanh
    h = actor.body(s)
    mu, log_std = actor.mu(h), actor.log_std(h).clamp(-20, 2)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    u = mu + log_std.exp() * eps
    ref = torch.distributions.Normal(mu, log_std.exp()).log_prob(u).sum(1, keepdim=True)
    ref = ref - torch.log(1 - torch.tanh(u) ** 2).sum(1, keepdim=True)
    torch.testing.assert_close(logp, ref)
    torch.testing.assert_close(a, 3 * torch.softmax(u, -1))


def test_sac_update_polyak_and_learning() -> None:
    igb = IGB(2, **SMALL, seed=0)
    agent = igb.agent
    assert agent is not None
    drive(igb, loss_seq(4, 2), epoch_every=100)
    for L in loss_seq(8, 2, seed=9):  # fill the buffer
        agent.buffer.add(L, torch.ones(2), torch.tensor(0.1), L * 0.9)
    target_before = [p.clone() for p in agent.critic_target.parameters()]
    actor_before = [p.clone() for p in agent.actor.parameters()]
    alpha_before = float(agent.log_alpha.detach())
    agent.update(1.5)
    for p, tb, tp in zip(
        agent.critic.parameters(), target_before, agent.critic_target.parameters()
    ):
        torch.testing.assert_close(tp, 0.005 * p + 0.995 * tb)
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, agent.actor.parameters()))
    assert float(agent.log_alpha.detach()) != alpha_before


def run_v2(seed: int, n: int, E: int, stop: int | None = None) -> tuple[IGB, list[torch.Tensor]]:
    igb = IGB(3, **SMALL, seed=seed)
    seq = loss_seq(n, 3, seed=4)
    return igb, drive(igb, seq[: stop if stop is not None else n], epoch_every=E)


def test_v2_resume_continues_the_same_policy_exactly() -> None:
    n, E, k = 45, 5, 22  # resume mid-epoch, after training started and the buffer wrapped
    seq = loss_seq(n, 3, seed=4)
    _, full = run_v2(seed=11, n=n, E=E)
    first, _ = run_v2(seed=11, n=n, E=E, stop=k)
    sd = first.state_dict()
    blob = io.BytesIO()
    torch.save(sd, blob)
    drive(first, seq, epoch_every=E, start=k)  # keep using the saved object: no aliasing
    blob.seek(0)
    fresh = IGB(3, **SMALL, seed=999)  # a different seed: everything must come from the state
    fresh.load_state_dict(torch.load(blob, weights_only=False))
    rest = drive(fresh, seq, epoch_every=E, start=k)
    assert len(rest) == n - k
    for i, (x, y) in enumerate(zip(full[k:], rest)):
        assert torch.equal(x, y), f"step {k + i} differs after resume"
    # the policy (not the random warm-up) produced the later weights
    assert fresh.epoch >= SMALL["start_epoch"]


def test_v2_seedable() -> None:
    _, a = run_v2(seed=1, n=30, E=5)
    _, b = run_v2(seed=1, n=30, E=5)
    _, c = run_v2(seed=2, n=30, E=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_v2_reset_restarts_from_the_seed() -> None:
    igb, a = run_v2(seed=3, n=20, E=5)
    igb.reset()
    b = drive(igb, loss_seq(20, 3, seed=4), epoch_every=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- Balancer plumbing
class Recorder(Equal):
    def __init__(self) -> None:
        super().__init__()
        self.factors: list[float] = []

    def objectives(self, losses: torch.Tensor, ctx: LossContext) -> Any:
        self.factors.append(ctx.lr_factor)
        return super().objectives(losses, ctx)


def test_wrap_fills_lr_factor() -> None:
    lin = torch.nn.Linear(3, 2)
    rec = Recorder()
    opt = mtlbal.wrap(
        torch.optim.SGD(lin.parameters(), lr=0.1), mtlbal.Balancer(lin, weighting=rec)
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        y = lin(torch.randn(4, 3))
        opt.zero_grad()
        opt.backward([y[:, 0].pow(2).mean(), y[:, 1].pow(2).mean()])
        opt.step()
        sched.step()
    np.testing.assert_allclose(rec.factors, [1.0, 2.0, 4.0])
    igb = IGB(2, base_epoch=0)
    opt2 = mtlbal.wrap(
        torch.optim.SGD(lin.parameters(), lr=0.1), mtlbal.Balancer(lin, weighting=igb)
    )
    y = lin(torch.randn(4, 3))
    opt2.backward([y[:, 0].pow(2).mean() + 1, y[:, 1].pow(2).mean() + 1])
    opt2.epoch_end()  # the wrapper forwards epoch boundaries to the Balancer's strategies
    assert igb.epoch == 1 and igb.base_losses is not None
    bare = mtlbal.Balancer(lin, weighting=Recorder())
    y = lin(torch.randn(4, 3))
    bare.backward([y[:, 0].pow(2).mean(), y[:, 1].pow(2).mean()])
    assert bare.weighting.factors == [1.0]  # type: ignore[attr-defined]


class TwoTask(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList([torch.nn.Linear(6, 1) for _ in range(2)])
        with torch.no_grad():  # equal heads, opposite targets: the two tasks conflict
            self.heads[1].weight.copy_(self.heads[0].weight)
            self.heads[1].bias.copy_(self.heads[0].bias)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        a, b = (h(z).squeeze(-1) for h in self.heads)
        return [(a - y).pow(2).mean() + 0.1, (b + y).pow(2).mean() + 0.3]


def mgda_ref(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    gamma = float((g2 - g1) @ g2 / (g1 - g2).pow(2).sum())
    assert 0.001 < gamma < 0.999  # interior: no clipping in the reference solver
    return 2 * (gamma * g1 + (1 - gamma) * g2)


def pcgrad_ref(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    dot = float(g1 @ g2)
    assert dot < 0  # the tasks conflict, so the projection acts
    p1 = g1 - dot / (float(g2 @ g2) + 1e-8) * g2
    p2 = g2 - dot / (float(g1 @ g1) + 1e-8) * g1
    return p1 + p2


def aligned_ref(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    J = torch.stack([g1, g2]).numpy()
    U, S, Vt = np.linalg.svd(J, full_matrices=False)
    return torch.from_numpy(S.min() * Vt.T @ U.T @ np.ones(2))


@pytest.mark.parametrize(
    "make,ref",
    [(lambda: MGDA(), mgda_ref), (lambda: PCGrad(seed=0), pcgrad_ref), (AlignedMTL, aligned_ref)],
    ids=["MGDA", "PCGrad", "AlignedMTL"],
)
def test_igb_with_aggregator_sees_weighted_log_loss_gradients(make: Any, ref: Any) -> None:
    net = TwoTask().double()
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 4, dtype=torch.float64, generator=gen) for _ in range(3)]
    ys = [1 + 0.1 * torch.randn(16, dtype=torch.float64, generator=gen) for _ in range(3)]
    b = mtlbal.Balancer(net.trunk, weighting=IGB(2, base_epoch=0), aggregator=make())
    seen = []
    for x, y in zip(xs[:2], ys[:2]):  # epoch 0: warm-up, then base losses
        info = b.backward(net.losses(x, y))
        seen.append(info.losses)
    b.epoch_end()
    base = torch.stack(seen).mean(0).tolist()
    net.zero_grad()
    # hand reference: w from the losses, g_t = w_t ∇L_t / L_t at the shared parameters
    shared = list(net.trunk.parameters())
    Ls = net.losses(xs[2], ys[2])
    w = naive_v1([float(v.detach()) for v in Ls], base)
    gs = []
    for t, L in enumerate(Ls):
        grads = torch.autograd.grad(L, shared, retain_graph=True)
        gs.append(w[t] / float(L.detach()) * torch.cat([g.reshape(-1) for g in grads]))
    head_ref = [
        w[t]
        / float(Ls[t].detach())
        * torch.cat(
            [
                g.reshape(-1)
                for g in torch.autograd.grad(
                    Ls[t], list(net.heads[t].parameters()), retain_graph=True
                )
            ]
        )
        for t in range(2)
    ]
    info = b.backward(net.losses(xs[2], ys[2]))
    G_ref = torch.stack(gs) @ torch.stack(gs).T
    assert info.gramian is not None
    torch.testing.assert_close(info.gramian, G_ref)
    d = torch.cat([p.grad.reshape(-1) for p in shared])  # type: ignore[union-attr]
    torch.testing.assert_close(d, ref(gs[0], gs[1]))
    for t in range(2):  # heads: the gradient of their own w_t log L_t
        hg = torch.cat([p.grad.reshape(-1) for p in net.heads[t].parameters()])  # type: ignore[union-attr]
        torch.testing.assert_close(hg, head_ref[t])
    torch.testing.assert_close(
        info.loss_weights, torch.tensor(w, dtype=torch.float64) / info.losses
    )


# ---------------------------------------------------------------- registry entries
def _registry() -> Any:
    path = Path(__file__).resolve().parents[1] / "registry.py"
    spec = importlib.util.spec_from_file_location("_mtlbal_test_registry", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("at", ["params", "cut"])
def test_registry_entries_run_and_resume(at: str) -> None:
    reg = _registry()
    entries = [e for e in reg.REGISTRY if e.name.startswith(("AlignedMTL", "IGB"))]
    assert {e.name for e in entries} >= {"AlignedMTL", "IGBv1", "IGBv2"}
    for e in entries:
        if at not in e.at:
            continue
        net = TwoTask()
        gen = torch.Generator().manual_seed(1)
        kw = e.make(2)
        b = mtlbal.Balancer(net.trunk, at=net.trunk if at == "cut" else "params", **kw)
        every = e.epoch_every or 3
        for i in range(8):
            net.zero_grad()
            info = b.backward(
                net.losses(torch.randn(8, 4, generator=gen), torch.randn(8, generator=gen))
            )
            assert torch.isfinite(info.weights).all(), e.name
            for p in net.trunk.parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), e.name
            if (i + 1) % every == 0:
                b.epoch_end()
        state = copy.deepcopy(b.state_dict())
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, generator=gen)
        net.zero_grad()
        i1 = b.backward(net.losses(x, y))
        g1 = [p.grad.clone() for p in net.trunk.parameters()]  # type: ignore[union-attr]
        b.remove()  # one cut hook at a time on the module
        b2 = mtlbal.Balancer(net.trunk, at=net.trunk if at == "cut" else "params", **e.make(2))
        b2.load_state_dict(state)
        net.zero_grad()
        i2 = b2.backward(net.losses(x, y))
        assert torch.equal(i1.weights, i2.weights), e.name
        for p, g in zip(net.trunk.parameters(), g1):
            assert torch.equal(p.grad, g), e.name  # type: ignore[arg-type]
        b2.remove()


def test_non_positive_base_loss_raises_naming_the_task() -> None:
    """With eps > 0 a loss may be ≤ 0; its epoch mean can then not be the base loss L̄ that
    the weights divide by: a ValueError naming the task (it gave inf/NaN or flipped weights)."""
    igb = IGB(2, base_epoch=0, eps=1.0)
    igb.objectives(torch.tensor([0.5, -0.2]), LossContext())
    igb.observe(torch.tensor([0.5, -0.2]))
    with pytest.raises(ValueError, match=r"task 1.*base loss"):
        igb.epoch_end()
