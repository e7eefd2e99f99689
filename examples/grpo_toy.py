"""A GRPO-style loop on a toy policy with three tasks whose rewards live on different scales:
MedGRPO's median normalisation of the rewards, MT-GRPO's task weights and its ratio-preserving
sampler. No download: the "prompts" are random vectors, the policy a small network that picks
one of ``A`` actions, and a task's reward is ``scale_k`` for the right action.

    python examples/grpo_toy.py --steps 150

Each step: the sampler draws a batch of prompts whose task mix follows MT-GRPO's weights; the
policy samples ``G`` actions per prompt; each reward is mapped by MedGRPO (``σ(κ (r − med_k))``:
every task's running median reward goes to 1/2, whatever its scale); the advantages are the
normalised rewards minus their group mean (no division by the group's spread, as in Dr. GRPO,
so the reward scale matters); the per-task policy losses are weighted by ``K·z``; after the
step MT-GRPO's IWU update takes the tasks' mean normalised rewards and their change.

The same loop with the raw rewards (plain SGD: the reward scale is the gradient's scale) lets
the task whose rewards are 20× smaller stagnate. The script checks that with the normalisation
every task learns, and that task far better than with the raw rewards.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from mtlbal.weighting import MTGRPO, MedGRPO, RatioPreservingSampler

K, A, D, G = 3, 6, 8, 8  # tasks, actions, prompt features, rollouts per prompt
SCALES = torch.tensor([1.0, 0.05, 0.4])  # task 1's reward is tiny (a "hard metric")
PER_TASK = 64  # prompts per task
LR = 1.0


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K * PER_TASK, D, generator=g)
    task = torch.arange(K).repeat_interleave(PER_TASK)
    proj = torch.randn(K, D, A, generator=g)
    target = torch.einsum("nd,nda->na", x, proj[task]).argmax(dim=1)  # the right action
    return x, task, target


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D + K, 32), nn.Tanh(), nn.Linear(32, A))

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, nn.functional.one_hot(task, K).float()], dim=1))


def accuracy(
    policy: Policy, x: torch.Tensor, task: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    with torch.no_grad():
        hit = (policy(x, task).argmax(dim=1) == target).float()
    return torch.stack([hit[task == k].mean() for k in range(K)])


def train(steps: int, raw: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x, task, target = make_data(seed)
    policy = Policy()
    opt = torch.optim.SGD(policy.parameters(), lr=LR)  # plain SGD: the reward scale counts
    med = MedGRPO(K, window=20, steepness=10.0)
    mt = MTGRPO(K, lam=0.5)
    sampler = RatioPreservingSampler([PER_TASK] * K, batch_size=24, weights=mt, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    start = accuracy(policy, x, task, target)
    prev: torch.Tensor | None = None
    for _ in range(steps):
        idx = torch.tensor(sampler.next_batch())
        xb, tb, yb = x[idx], task[idx], target[idx]
        logp = torch.log_softmax(policy(xb, tb), dim=1)  # [B, A]
        actions = torch.multinomial(logp.exp().detach(), G, replacement=True, generator=g)
        reward = SCALES[tb].unsqueeze(1) * (actions == yb.unsqueeze(1)).float()  # [B, G]
        tasks_of = tb.unsqueeze(1).expand(-1, G)
        if raw:
            norm = reward
        else:
            norm = med.normalize_rewards(reward.reshape(-1), tasks_of.reshape(-1)).reshape(
                reward.shape
            )
        adv = norm - norm.mean(dim=1, keepdim=True)  # group-relative, per prompt
        per_sample = -(adv * logp.gather(1, actions)).mean(dim=1)  # [B]
        w = mt.task_weights() * K
        present = [k for k in range(K) if bool((tb == k).any())]
        loss = sum(w[k].float() * per_sample[tb == k].mean() for k in present)
        opt.zero_grad()
        loss.backward()
        opt.step()
        # MT-GRPO: the tasks' mean (normalised) reward this step and its change since the last
        mean_r = torch.stack(
            [norm[tb == k].mean() if bool((tb == k).any()) else torch.tensor(0.5) for k in range(K)]
        ).double()
        improvement = torch.zeros(K, dtype=torch.float64) if prev is None else mean_r - prev
        mt.update_from_rewards(mean_r, improvement)
        prev = mean_r
    return start, accuracy(policy, x, task, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    start, normed = train(args.steps, raw=False)
    _, raw = train(args.steps, raw=True)
    print(f"accuracy at start      {start.numpy().round(2)}")
    print(f"normalised rewards     {normed.numpy().round(2)}  (worst {float(normed.min()):.2f})")
    print(f"raw rewards            {raw.numpy().round(2)}  (worst {float(raw.min()):.2f})")
    # every task learns with the normalisation; the task with 20× smaller rewards learns far
    # better than with the raw rewards, which plain SGD scales down
    assert bool((normed > start + 0.1).all()), (start, normed)
    assert float(normed[1]) > float(raw[1]) + 0.2, (normed, raw)
    print("grpo_toy: OK")


if __name__ == "__main__":
    main()
