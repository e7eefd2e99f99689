"""The Soft Actor-Critic agent of IGB v2 (Dai, Fei & Lu, UAI 2023), as in the official code.

Everything here runs on the CPU in float32 (the networks are a few 128-wide MLPs) and draws all
its randomness from one seedable ``torch.Generator``, so that :meth:`SACAgent.state` /
:meth:`SACAgent.load_state` capture it completely: a resumed run samples the same minibatches,
the same policy noise and the same actions.

* Actor: ``Linear(m,h)–ReLU–Linear(h,h)–ReLU`` then two linear heads ``μ`` and ``log σ``
  (``log σ`` clamped to ``[−20, 2]``); ``u = μ + σ·ε`` (reparameterised), action
  ``a = m·softmax(u)``. Its log-probability is the official code's: the Gaussian log-density of
  ``u`` minus the tanh-squash correction ``Σ 2(log 2 − u − softplus(−2u))`` (a quirk kept as is:
  the action uses a softmax, not a tanh).
* Twin critics ``Q1, Q2``: MLP ``[2m, h, h, 1]`` with ReLU; target copies updated by Polyak
  averaging ``θ' ← τθ + (1−τ)θ'``.
* Temperature ``α = exp(log α)``, ``log α`` in float64 initialised to ``log 0.2``, tuned by Adam to
  the target entropy ``−m``.
* One update: sample a minibatch uniformly (with replacement) from the replay buffer; critic
  target ``r + γ (min(Q1', Q2')(s', a') − α log π(a'|s'))`` with ``a' ~ π(·|s')``; critic loss
  ``MSE(Q1, y) + MSE(Q2, y)``; actor loss ``mean(α log π(a|s) − min(Q1, Q2)(s, a))``;
  temperature loss ``−mean(log α · (log π + target_entropy))``; then the Polyak step.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReplayBuffer", "SACAgent"]

_LOG_STD_MIN = -20.0
_LOG_STD_MAX = 2.0
_LOG2 = math.log(2.0)


def _mlp(sizes: list[int], last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Gaussian policy over ``u``; the action is ``m·softmax(u)``."""

    def __init__(self, m: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.m = m
        self.body = _mlp([m, *hidden], last_relu=True)
        self.mu = nn.Linear(hidden[-1], m)
        self.log_std = nn.Linear(hidden[-1], m)

    def forward(
        self, state: Tensor, generator: torch.Generator, deterministic: bool = False
    ) -> tuple[Tensor, Tensor]:
        h = self.body(state)
        mu = self.mu(h)
        log_std = self.log_std(h).clamp(_LOG_STD_MIN, _LOG_STD_MAX)
        std = log_std.exp()
        if deterministic:
            u = mu
        else:
            eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
            u = mu + std * eps
        action = self.m * torch.softmax(u, dim=-1)
        # Gaussian log-density of u, then the official tanh-squash correction
        gauss = -((u - mu) ** 2) / (2 * std**2) - log_std - 0.5 * math.log(2 * math.pi)
        corr = 2 * (_LOG2 - u - F.softplus(-2 * u))
        logp = gauss.sum(-1, keepdim=True) - corr.sum(-1, keepdim=True)
        return action, logp


class TwinCritic(nn.Module):
    def __init__(self, m: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.q1 = _mlp([2 * m, *hidden, 1], last_relu=False)
        self.q2 = _mlp([2 * m, *hidden, 1], last_relu=False)

    def forward(self, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        sa = torch.cat([state, action], dim=1)
        return self.q1(sa), self.q2(sa)


class ReplayBuffer:
    """Ring buffer of transitions ``(s, a, r, s')``, uniform sampling with replacement."""

    def __init__(self, m: int, max_size: int) -> None:
        self.max_size = int(max_size)
        self.ptr = 0
        self.size = 0
        self.state = torch.zeros(self.max_size, m)
        self.action = torch.zeros(self.max_size, m)
        self.reward = torch.zeros(self.max_size, 1)
        self.next_state = torch.zeros(self.max_size, m)

    def add(self, s: Tensor, a: Tensor, r: Tensor, s2: Tensor) -> None:
        self.state[self.ptr] = s
        self.action[self.ptr] = a
        self.reward[self.ptr] = r
        self.next_state[self.ptr] = s2
        self.ptr = (self.ptr + 1) % self.max_size
        self.size = min(self.size + 1, self.max_size)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        idx = torch.randint(0, self.size, (n,), generator=generator)
        return self.state[idx], self.action[idx], self.reward[idx], self.next_state[idx]

    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {
            "max_size": self.max_size,
            "ptr": self.ptr,
            "size": n,
            "state": self.state[:n].clone(),
            "action": self.action[:n].clone(),
            "reward": self.reward[:n].clone(),
            "next_state": self.next_state[:n].clone(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if int(sd["max_size"]) != self.max_size:
            raise ValueError(
                f"replay buffer size mismatch: saved {sd['max_size']}, configured {self.max_size}"
            )
        n = int(sd["size"])
        self.ptr, self.size = int(sd["ptr"]), n
        for name in ("state", "action", "reward", "next_state"):
            buf = getattr(self, name)
            buf.zero_()
            buf[:n] = sd[name]


class SACAgent:
    """The IGB v2 agent: actor, twin critics and targets, their Adam optimizers, the temperature,
    the replay buffer and the generator. Deliberately *not* an ``nn.Module``: its parameters are
    trained by its own optimizers and must not be seen by the Balancer (or the model's
    optimizer). All tensors live on the CPU."""

    def __init__(
        self,
        m: int,
        *,
        hidden: tuple[int, ...] = (128, 128),
        lr: float = 3e-4,
        gamma: float = 0.99,
        tau: float = 0.005,
        init_alpha: float = 0.2,
        batch_size: int = 256,
        buffer_size: int = 10_000,
        seed: int | None = 0,
    ) -> None:
        self.m = m
        self.gamma = float(gamma)
        self.tau = float(tau)
        self.batch_size = int(batch_size)
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        # network initialisation draws from the global RNG: fork it so that seeding here neither
        # depends on nor disturbs the user's global stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
            self.actor = Actor(m, hidden)
            self.critic = TwinCritic(m, hidden)
        self.critic_target = copy.deepcopy(self.critic)
        for p in self.critic_target.parameters():
            p.requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.log_alpha = torch.tensor(math.log(init_alpha), dtype=torch.float64, requires_grad=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=lr)
        self.target_entropy = -float(m)
        self.buffer = ReplayBuffer(m, buffer_size)

    @property
    def alpha(self) -> Tensor:
        return self.log_alpha.detach().exp().to(torch.float32)

    @torch.no_grad()
    def act(self, state: Tensor, deterministic: bool = False) -> Tensor:
        """Action ``m·softmax(u)`` (``[m]``) for a loss vector ``state`` (``[m]``)."""
        a, _ = self.actor(state.reshape(1, -1), self.generator, deterministic)
        return a.reshape(-1)

    def random_action(self) -> Tensor:
        """``m·softmax(ε)``, ``ε ~ N(0, I)`` (the warm-up actions, RLW-style)."""
        return self.m * torch.softmax(torch.randn(self.m, generator=self.generator), dim=-1)

    def update(self, k: float) -> None:
        """One SAC update on a minibatch of ``int(batch_size·k/2)`` transitions."""
        n = int(self.batch_size * (k / 2))
        s, a, r, s2 = self.buffer.sample(n, self.generator)
        alpha = self.alpha
        with torch.no_grad():
            a2, logp2 = self.actor(s2, self.generator)
            t1, t2 = self.critic_target(s2, a2)
            target = r + self.gamma * (torch.min(t1, t2) - alpha * logp2)
        q1, q2 = self.critic(s, a)
        q_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self.critic_opt.zero_grad()
        q_loss.backward(inputs=list(self.critic.parameters()))
        self.critic_opt.step()

        a_new, logp = self.actor(s, self.generator)
        n1, n2 = self.critic(s, a_new)
        a_loss = (alpha * logp - torch.min(n1, n2)).mean()
        self.actor_opt.zero_grad()
        a_loss.backward(inputs=list(self.actor.parameters()))
        self.actor_opt.step()

        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad()
        alpha_loss.backward(inputs=[self.log_alpha])
        self.alpha_opt.step()

        with torch.no_grad():
            for p, tp in zip(self.critic.parameters(), self.critic_target.parameters()):
                tp.mul_(1.0 - self.tau).add_(self.tau * p)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, Any]:
        """A deep copy of everything that determines future actions."""
        return copy.deepcopy(
            {
                "actor": self.actor.state_dict(),
                "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(),
                "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(),
                "alpha_opt": self.alpha_opt.state_dict(),
                "log_alpha": self.log_alpha.detach().clone(),
                "buffer": self.buffer.state_dict(),
                "generator": self.generator.get_state(),
            }
        )

    def load_state(self, sd: dict[str, Any]) -> None:
        sd = copy.deepcopy(sd)
        self.actor.load_state_dict(sd["actor"])
        self.critic.load_state_dict(sd["critic"])
        self.critic_target.load_state_dict(sd["critic_target"])
        self.actor_opt.load_state_dict(sd["actor_opt"])
        self.critic_opt.load_state_dict(sd["critic_opt"])
        with torch.no_grad():
            self.log_alpha.copy_(sd["log_alpha"])
        self.alpha_opt.load_state_dict(sd["alpha_opt"])
        self.buffer.load_state_dict(sd["buffer"])
        self.generator.set_state(sd["generator"])
