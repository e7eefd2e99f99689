"""MT-GRPO: the IWU step against the paper's Subroutine 1 (float64, plain Python), the AdamW
implementation against torch.optim.AdamW, the official code's core re-implemented
(rsshyam/MT-GRPO @ 016d0d726b1665cd78ee9f50cd0a797ecbe705b1,
verl/verl/utils/auto_curriculum/priority_decay.py, update_object='task_diff_bias': the
softmax VJP of ``delta + λ·reward`` and an Adam step), the supervised path, and the
ratio-preserving sampler (mix, inflation, trim, resume)."""

from __future__ import annotations

import math

import pytest
import torch

import mtlbal
from mtlbal.weighting import MTGRPO, RatioPreservingSampler


def _subroutine1(xi: list[float], j: list[float], i: list[float], lam: float, beta: float):
    e = [math.exp(v) for v in xi]
    z = [v / sum(e) for v in e]
    s = [a + lam * b for a, b in zip(i, j)]
    zs = sum(a * b for a, b in zip(z, s))
    g = [zk * (sk - zs) for zk, sk in zip(z, s)]
    return [x - beta * gk for x, gk in zip(xi, g)]


def test_sgd_step_is_subroutine_1() -> None:
    mt = MTGRPO(4, lam=0.3, lr=0.7, optimizer="sgd", improvement_clip=None)
    xi = [0.0] * 4
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        j = torch.rand(4, generator=g, dtype=torch.float64)
        i = 0.1 * torch.randn(4, generator=g, dtype=torch.float64)
        mt.update_from_rewards(j, i)
        xi = _subroutine1(xi, j.tolist(), i.tolist(), 0.3, 0.7)
    torch.testing.assert_close(mt.logits, torch.tensor(xi, dtype=torch.float64), rtol=0, atol=1e-14)


def test_adamw_matches_torch_adamw_and_clips() -> None:
    mt = MTGRPO(3, lam=0.2, lr=0.025, weight_decay=1e-2, improvement_clip=0.1)
    xi = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    ref = torch.optim.AdamW([xi], lr=0.025, weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-8)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        j = torch.rand(3, generator=g, dtype=torch.float64)
        i = 0.3 * torch.randn(3, generator=g, dtype=torch.float64)  # beyond the clip
        mt.update_from_rewards(j, i)
        z = torch.softmax(xi, 0)
        s = i.clamp(-0.1, 0.1) + 0.2 * j
        ref.zero_grad()
        xi.grad = (z * (s - (z * s).sum())).detach()
        ref.step()
    torch.testing.assert_close(mt.logits, xi.detach(), rtol=1e-12, atol=1e-14)


def test_official_code_core() -> None:
    # the code: probs = softmax(w); d = autograd.grad(probs, w, grad_outputs=delta + λ·reward);
    # Adam([w], lr, weight_decay=γ) (coupled L2, identical to AdamW when γ = 0)
    lam = 0.2
    w = torch.zeros(3, requires_grad=True, dtype=torch.float64)
    opt = torch.optim.Adam([w], lr=0.025, weight_decay=0.0)
    mt = MTGRPO(3, lam=lam, weight_decay=0.0, improvement_clip=None)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        delta = 0.05 * torch.randn(3, generator=g, dtype=torch.float64)
        reward = torch.rand(3, generator=g, dtype=torch.float64)
        combined = delta + lam * reward
        opt.zero_grad()
        with torch.enable_grad():
            probs = torch.softmax(w, dim=-1)
            (d,) = torch.autograd.grad(probs, w, grad_outputs=combined)
        w.grad = d
        opt.step()
        mt.update_from_rewards(reward, delta)
    torch.testing.assert_close(mt.logits, w.detach(), rtol=1e-12, atol=1e-14)


def test_worst_and_stagnating_task_gains_weight() -> None:
    mt = MTGRPO(3, lam=0.5, lr=0.5, optimizer="sgd")
    for _ in range(20):
        # task 0: low reward, no improvement; task 1: low reward, improving; task 2: high reward
        mt.update_from_rewards(torch.tensor([0.1, 0.1, 0.9]), torch.tensor([0.0, 0.1, 0.0]))
    z = mt.task_weights()
    assert float(z[0]) > float(z[1]) > float(z[2])


def test_supervised_path_rewards_are_negative_losses() -> None:
    torch.manual_seed(0)
    trunk = torch.nn.Linear(3, 4)
    heads = torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in range(2))
    x = torch.randn(8, 3)
    params = [*trunk.parameters(), *heads.parameters()]
    mt = MTGRPO(2, lam=0.5, optimizer="sgd", lr=1.0, improvement_clip=None)
    opt = mtlbal.wrap(torch.optim.SGD(params, lr=0.1), mtlbal.Balancer(trunk, weighting=mt))

    def losses() -> dict[str, torch.Tensor]:
        z = trunk(x)
        return {"a": heads[0](z).pow(2).mean() + 0.5, "b": 4 * heads[1](z).pow(2).mean() + 2}

    before = torch.stack([v.detach() for v in losses().values()]).double()
    info = opt.backward(losses())
    torch.testing.assert_close(info.weights, torch.ones(2))  # z uniform, reduction="sum"
    opt.step()
    with pytest.raises(ValueError, match="needs the losses"):
        MTGRPO(2).update(torch.ones(2))
    with torch.no_grad():
        after = torch.stack([v.detach() for v in losses().values()]).double()
        opt.balancer.update(losses())
    expected = _subroutine1([0.0, 0.0], (-before).tolist(), (before - after).tolist(), 0.5, 1.0)
    torch.testing.assert_close(mt.logits, torch.tensor(expected, dtype=torch.float64))


def test_sampler_mix_follows_the_weights() -> None:
    z = torch.tensor([0.6, 0.3, 0.1])
    s = RatioPreservingSampler([50, 40, 30], batch_size=20, weights=z, num_batches=1500, seed=0)
    counts = torch.zeros(3)
    for batch in s:
        assert len(batch) == 20
        for i in batch:
            counts[s.task_of(i)] += 1
        assert torch.equal(
            s.last_targets, torch.bincount(torch.tensor([s.task_of(i) for i in batch]), minlength=3)
        )
    # multinomial counts: each proportion within 4 standard errors of its weight (seeded)
    n = float(counts.sum())
    bound = 4 * torch.sqrt(z * (1 - z) / n)
    assert bool(((counts / n - z).abs() <= bound).all()), (counts / n, bound)
    # within a task, an epoch of its samples is a permutation: no index repeats before all are used
    s2 = RatioPreservingSampler([7, 7], batch_size=7, weights=torch.tensor([1.0, 0.0]), seed=1)
    assert sorted(next(iter(s2))) == list(range(7))


def test_sampler_reads_the_live_weights_of_mtgrpo() -> None:
    mt = MTGRPO(2, optimizer="sgd", lr=50.0, lam=1.0)
    s = RatioPreservingSampler([100, 100], batch_size=50, weights=mt, seed=0)
    mt.update_from_rewards(torch.tensor([1.0, 0.0]), torch.zeros(2))  # task 1 is the worst
    assert float(mt.task_weights()[1]) > 0.99
    batch = s.next_batch()
    assert sum(s.task_of(i) for i in batch) >= 45


def test_sampler_inflation_and_trim() -> None:
    s = RatioPreservingSampler([40, 40], batch_size=10, oversample=2.0, max_inflation=5.0, seed=0)
    s.record_filtered([10, 10], [10, 2])  # task 1 loses 80%
    torch.testing.assert_close(s.rho, torch.tensor([0.0, 0.08], dtype=torch.float64))
    for _ in range(40):
        s.record_filtered([10, 10], [10, 2])
    assert abs(float(s.rho[1]) - 0.8) < 0.02
    m = s.inflation()
    assert float(m[0]) == 1.0 and 4.5 < float(m[1]) <= 5.0
    batch = s.next_batch()
    assert len(batch) == 20
    n1 = sum(s.task_of(i) for i in batch)
    assert n1 > 12  # task 1 oversampled ~5:1 in the draws
    kept = s.trim(batch)
    assert len(kept) == 10
    targets = s.last_targets.tolist()
    for k in range(2):
        assert sum(1 for i in kept if s.task_of(i) == k) >= min(
            targets[k], sum(1 for i in batch if s.task_of(i) == k)
        )
    with pytest.raises(ValueError, match="kept"):
        s.record_filtered([1, 1], [2, 0])


def test_sampler_resume_reproduces_the_sequence() -> None:
    z = torch.tensor([0.5, 0.25, 0.25])
    full = RatioPreservingSampler([9, 11, 13], batch_size=4, weights=z, num_batches=6, seed=3)
    seq = [b for _ in range(3) for b in full]
    a = RatioPreservingSampler([9, 11, 13], batch_size=4, weights=z, num_batches=6, seed=3)
    first = list(a)
    it = iter(a)
    first += [next(it) for _ in range(2)]  # stop in the middle of the second epoch
    state = a.state_dict()
    b = RatioPreservingSampler([9, 11, 13], batch_size=4, weights=z, num_batches=6, seed=99)
    b.load_state_dict(state)
    rest = list(b) + list(b)
    assert first + rest == seq
    with pytest.raises(ValueError, match="sizes"):
        RatioPreservingSampler([9, 11], batch_size=4).load_state_dict(state)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="rewards and improvements"):
        MTGRPO(3).update_from_rewards(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        RatioPreservingSampler([3, 3], 2, weights=torch.tensor([1.0, -1.0])).next_batch()
    with pytest.raises(ValueError, match="at least one sample"):
        RatioPreservingSampler([3, 0], 2)
