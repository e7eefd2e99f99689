"""IGB — Improvable Gap Balancing (Dai, Fei & Lu, UAI 2023, arXiv:2307.15429).

IGB balances *log*-losses: the per-task objectives are

    ℓ_t = w_t · log(L_t + ε)          (ε = ``eps``, 0 by default: the official code's ``log L_t``)

with plain-tensor weights ``w`` (no gradient flows to them), so ``∇ℓ_t = w_t ∇L_t / (L_t + ε)``.
The step info reports ``∂ℓ_t/∂L_t = w_t / (L_t + ε)`` as ``loss_weights``; the IGB weights ``w``
themselves are :attr:`IGB.last_weights`. Any gradient aggregator (MGDA, PCGrad, Aligned-MTL, …)
then treats the ``ℓ_t`` as the task losses, as in the official code's
``--loss_method igbv1|igbv2 --gradient_method …``.

**Base losses** ``L̄_t``: the mean training loss of epoch ``base_epoch`` (0-indexed, default 1:
the second epoch), set when that epoch ends. Epochs are marked by calling
:meth:`mtlbal.Balancer.epoch_end` (or ``IGB.epoch_end()``) after the last step of each epoch;
the epoch sums are accumulated on the losses' device, without host syncs.

**v1** (heuristic): ``w = 1`` until the base losses exist, then

    w = m · softmax(L / L̄)          (current minibatch losses, no temperature)

**v2** (deep RL): a Soft Actor-Critic agent (:mod:`mtlbal.weighting._sac`) picks ``w``. State
``s`` = the current raw loss vector; action ``a = m·softmax(u)``, ``u ~ N(μ(s), σ(s))``. Once the
base losses exist, each step stores the transition from the previous step,
``(s_prev, a_prev, r, s)`` with the reward

    r = (lr_0 / lr_now) · min_t (L_t^prev − L_t) / L̄_t

(the worst relative decrease; ``lr_0/lr_now`` is ``LossContext.lr_factor``, which
:func:`mtlbal.wrap` fills from the wrapped optimizer). From epoch ``update_after`` on, every
``update_every``-th step runs ``int(update_every·k/2)`` SAC updates on minibatches of
``int(batch_size·k/2)`` transitions, ``k = 1 + |buffer|/buffer_size``. Before epoch
``start_epoch`` the weights are random, ``m·softmax(N(0, I))``; afterwards they are sampled from
the stochastic policy. A 2-slot ring keeps the previous loss vector and action. Defaults are the
official ones: ``start_epoch=5, update_after=3, update_every=50, batch_size=256,
buffer_size=10_000``, hidden ``(128, 128)``, Adam ``3e-4``, ``γ=0.99``, ``τ=0.005``,
``α₀=0.2`` (auto-tuned, target entropy ``−m``). The official trainer sets ``lr_0/lr_now`` once
per epoch; here it is read every step (the same when the LR scheduler steps per epoch).

Positivity: ``log`` needs ``L_t + ε > 0``. With ``check_positive=True`` (default) a loss that is
not is a ``ValueError`` naming the task; this check is one host sync per step (the Balancer's
own finiteness check is another unless ``nonfinite="off"``). With ``check_positive=False`` there
is no check and a non-positive loss gives a non-finite objective (which the Balancer's
``nonfinite`` policy does not see: it checks the raw losses). ``eps=1e-8`` reproduces the
``log(L + 1e-8)`` of LibMTL/FAMO recipes. The base losses ``L̄`` (epoch means) must be ``> 0``
as well, since the v1 weights and the v2 reward divide by them: :meth:`IGB.epoch_end` raises
``ValueError`` naming the task otherwise (possible only with ``eps > 0``; one host read per run).

Host syncs (:attr:`IGB.host_sync`): v1 none (the positivity check is returned as the step's
``domain`` and folded into the Balancer's one host sync); v2 runs its
agent on the CPU, so the loss vector (``m`` floats) is copied to the host every step and the
action copied back, and the base losses once when they are set.

Missing tasks: a step without some tasks' losses is refused (``ValueError``, before anything
changes): the epoch statistics count steps, not per-task samples, and v2's agent takes the
whole loss vector as its state and action.

State (all in ``state_dict``; a resumed run continues exactly): base losses, the running epoch
sum/count, the epoch and step counters; for v2 also the networks, target networks, the three
Adam optimizers, ``log α``, the replay buffer, the ring and the generator.

Example:
    >>> import torch
    >>> igb = IGB(num_tasks=2, base_epoch=0, check_positive=False)
    >>> igb(torch.tensor([1.0, 2.0]))  # warm-up: w = 1
    tensor([1., 1.])
    >>> igb.observe(torch.tensor([1.0, 1.0])); igb.epoch_end()  # base losses = [1, 1]
    >>> igb(torch.tensor([1.0, 2.0]))  # 2·softmax([1, 2])
    tensor([0.5379, 1.4621])

In a training loop (any aggregator can follow)::

    balancer = mtlbal.Balancer(model.trunk, weighting=IGB(3), aggregator=AlignedMTL())
    opt = mtlbal.wrap(torch.optim.Adam(model.parameters(), lr=1e-4), balancer)
    for epoch in range(n_epochs):
        for batch in loader:
            opt.zero_grad(); opt.backward(losses(batch)); opt.step()
        opt.epoch_end()          # or balancer.epoch_end(): closes the epoch for IGB
        scheduler.step()         # lr_0/lr_now feeds v2's reward

Task heads receive the gradient of ``Σ_t ℓ_t`` (the weighted log-losses), as in the official
code. Randomness (v2) comes from the strategy's own generator, not the global RNG as in the
official code: draws differ from it but are reproducible from ``seed``. Under DDP the Balancer
hands IGB the global losses (the rank mean), so the epoch means, the base losses and the weights
are the same on every rank and equal one process's (tests/distributed/test_ddp_registry.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mtlbal.step import Need
from mtlbal.weighting._sac import SACAgent
from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["IGB", "igb_reward", "igb_v1_weights"]


def igb_v1_weights(losses: Tensor, base_losses: Tensor) -> Tensor:
    """IGB v1 weights ``m · softmax(L / L̄)`` (``[m]``) for losses and base losses ``[m]``."""
    m = losses.shape[0]
    return m * torch.softmax(losses.detach() / base_losses.to(losses.dtype), dim=-1)


def igb_reward(prev: Tensor, cur: Tensor, base_losses: Tensor, lr_factor: float = 1.0) -> Tensor:
    """IGB v2 reward ``lr_factor · min_t (prev_t − cur_t) / L̄_t`` (a scalar tensor)."""
    return lr_factor * ((prev - cur) / base_losses).min()


class IGB(LossWeighting):
    """Improvable gap balancing over log-losses, heuristic (v1) or learned by SAC (v2).

    Args:
        num_tasks: number of tasks ``m`` (required for ``version=2``, which sizes its
            networks with it).
        version: ``1`` (heuristic) or ``2`` (Soft Actor-Critic).
        base_epoch: the (0-indexed) epoch whose mean training loss becomes ``L̄`` (default 1).
        eps: added inside the log (default 0: exactly ``log L_t``).
        check_positive: raise ``ValueError`` naming the task when ``L_t + eps ≤ 0`` (one host
            sync per step).
        start_epoch, update_after, update_every, batch_size, buffer_size: v2's schedule (see
            the module docstring). ``update_after`` must exceed ``base_epoch`` so that the
            buffer holds transitions when training starts.
        hidden, lr, gamma, tau, init_alpha: v2's SAC hyper-parameters (see the module
            docstring).
        seed: seed of v2's generator (actions, policy noise, minibatches, network init);
            ``None`` for a nondeterministic seed.
    """

    base_losses: Tensor | None
    epoch_sum: Tensor | None
    supports_missing_tasks = False
    missing_tasks_note = (
        "IGB's epoch statistics count steps, not per-task samples, and v2's agent takes the "
        "whole loss vector as its state and action (a subset has no defined state); give "
        "every task a loss in every step"
    )

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        version: Literal[1, 2] = 1,
        base_epoch: int = 1,
        eps: float = 0.0,
        check_positive: bool = True,
        start_epoch: int = 5,
        update_after: int = 3,
        update_every: int = 50,
        batch_size: int = 256,
        buffer_size: int = 10_000,
        hidden: Sequence[int] = (128, 128),
        lr: float = 3e-4,
        gamma: float = 0.99,
        tau: float = 0.005,
        init_alpha: float = 0.2,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {version!r}")
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        if version == 2 and num_tasks is None:
            raise ValueError("IGB(version=2) needs num_tasks (it sizes the SAC networks)")
        if base_epoch < 0:
            raise ValueError(f"base_epoch must be ≥ 0, got {base_epoch}")
        if eps < 0:
            raise ValueError(f"eps must be ≥ 0, got {eps}")
        if version == 2:
            if update_after <= base_epoch:
                raise ValueError(
                    f"update_after ({update_after}) must be > base_epoch ({base_epoch}): SAC "
                    "training needs transitions, which exist only once the base losses are set"
                )
            if update_every < 1 or batch_size < 1 or buffer_size < 1 or start_epoch < 0:
                raise ValueError(
                    "update_every, batch_size and buffer_size must be ≥ 1, start_epoch ≥ 0"
                )
            if not hidden or any(h < 1 for h in hidden):
                raise ValueError(f"hidden must be a non-empty list of sizes ≥ 1, got {hidden}")
        self.num_tasks = num_tasks
        self.version: Literal[1, 2] = version
        self.base_epoch = int(base_epoch)
        self.eps = float(eps)
        self.check_positive = bool(check_positive)
        self.start_epoch = int(start_epoch)
        self.update_after = int(update_after)
        self.update_every = int(update_every)
        self._sac_kwargs: dict[str, Any] = {
            "hidden": tuple(int(h) for h in hidden),
            "lr": float(lr),
            "gamma": float(gamma),
            "tau": float(tau),
            "init_alpha": float(init_alpha),
            "batch_size": int(batch_size),
            "buffer_size": int(buffer_size),
        }
        self.seed = seed
        self.add_state("base_losses", None)
        self.add_state("epoch_sum", None)
        self.epoch = 0
        self.epoch_count = 0
        self.last_weights: Tensor | None = None
        self._init_v2()

    # ------------------------------------------------------------------ setup / state
    def _init_v2(self) -> None:
        self.agent: SACAgent | None = None
        # v2 trains its agent inside the step: a refused step loads a copy of the state back
        self.step_snapshot = "copy" if self.version == 2 else "reference"
        self.needs = frozenset(
            {Need.EPOCHS, Need.LR_FACTOR} if self.version == 2 else {Need.EPOCHS}
        )
        self.sac_step = 0
        self._slot = 0
        self._base_cpu: Tensor | None = None
        if self.version == 2:
            assert self.num_tasks is not None
            m = self.num_tasks
            self.agent = SACAgent(m, seed=self.seed, **self._sac_kwargs)
            self._ring_loss = torch.zeros(2, m)
            self._ring_action = torch.zeros(2, m)

    @property
    def host_sync(self) -> bool:
        """Whether a step copies to the host beyond the Balancer's one check (v2: its agent
        runs on the CPU; v1 never: the positivity check rides in the Balancer's sync)."""
        return self.version == 2

    def hparams(self) -> dict[str, object]:
        sac = self._sac_kwargs
        return {
            "num_tasks": self.num_tasks,
            "version": self.version,
            "base_epoch": self.base_epoch,
            "eps": self.eps,
            "check_positive": self.check_positive,
            "start_epoch": self.start_epoch,
            "update_after": self.update_after,
            "update_every": self.update_every,
            "batch_size": sac["batch_size"],
            "buffer_size": sac["buffer_size"],
            "hidden": sac["hidden"],
            "lr": sac["lr"],
            "gamma": sac["gamma"],
            "tau": sac["tau"],
            "init_alpha": sac["init_alpha"],
            "seed": self.seed,
        }

    def extra_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "epoch": self.epoch,
            "epoch_count": self.epoch_count,
            "last_weights": None if self.last_weights is None else self.last_weights.clone(),
        }
        if self.agent is not None:
            out.update(
                agent=self.agent.state(),
                sac_step=self.sac_step,
                slot=self._slot,
                ring_loss=self._ring_loss.clone(),
                ring_action=self._ring_action.clone(),
            )
        return out

    def load_extra_state(self, state: Any) -> None:
        self.epoch = int(state["epoch"])
        self.epoch_count = int(state["epoch_count"])
        lw = state.get("last_weights")
        self.last_weights = None if lw is None else lw.clone()
        if self.agent is not None:
            if "agent" not in state:
                raise ValueError("the saved IGB state has no SAC agent (saved from IGB v1?)")
            self.agent.load_state(state["agent"])
            self.sac_step = int(state["sac_step"])
            self._slot = int(state["slot"])
            self._ring_loss = state["ring_loss"].clone()
            self._ring_action = state["ring_action"].clone()
            self._base_cpu = None  # rebuilt from base_losses on the next step

    def reset_extra(self) -> None:
        self.epoch = 0
        self.epoch_count = 0
        self.last_weights = None
        self._init_v2()

    # ------------------------------------------------------------------ epochs
    def observe(self, losses: Tensor, present: tuple[int, ...] | None = None) -> None:
        """Accumulate the raw losses of a taken step into the running epoch sum (on device)."""
        raw = losses.detach()
        self.epoch_sum = raw.clone() if self.epoch_sum is None else self.epoch_sum + raw
        self.epoch_count += 1

    def epoch_end(self) -> None:
        """Close the current epoch; at the end of epoch ``base_epoch`` set ``L̄`` to its mean loss.

        Called by :meth:`mtlbal.Balancer.epoch_end`; call it once after each training epoch.
        """
        if self.epoch == self.base_epoch:
            if self.epoch_sum is None or self.epoch_count == 0:
                raise ValueError(
                    f"IGB: epoch {self.epoch} (base_epoch) ended without any step; the base "
                    "losses are the mean training loss of that epoch"
                )
            base = self.epoch_sum / self.epoch_count
            positive = (base > 0).tolist()  # once per run: the weights divide by L̄
            if not all(positive):
                i = positive.index(False)
                raise ValueError(
                    f"IGB: the base loss L̄ (mean loss of epoch {self.epoch}) must be > 0, the "
                    f"weights divide by it; task {i} has base loss {float(base[i])!r}"
                )
            self.base_losses = base
            self._base_cpu = None
        self.epoch_sum = None
        self.epoch_count = 0
        self.epoch += 1

    # ------------------------------------------------------------------ weights
    def _check(self, raw: Tensor, tasks: tuple[str, ...] | None) -> None:
        if not self.check_positive:
            return
        ok = raw + self.eps > 0
        if bool(ok.all()):
            return
        names = tasks if tasks is not None else tuple(str(i) for i in range(raw.shape[0]))
        bad = [f"{n!r}={float(v)}" for n, v, k in zip(names, raw.tolist(), ok.tolist()) if not k]
        raise ValueError(
            f"IGB takes log(L + eps) (eps={self.eps}) and needs positive losses; got "
            f"{', '.join(bad)}. Pass eps=... or use a positive loss for these tasks."
        )

    def _v2_weights(self, raw: Tensor, lr_factor: float) -> Tensor:
        agent = self.agent
        assert agent is not None
        s = raw.detach().to(device="cpu", dtype=torch.float32)  # host copy (documented)
        slot, prev = self._slot, 1 - self._slot
        self._ring_loss[slot] = s
        if self.base_losses is not None:
            if self._base_cpu is None:
                self._base_cpu = self.base_losses.detach().to(device="cpu", dtype=torch.float32)
            r = igb_reward(self._ring_loss[prev], s, self._base_cpu, lr_factor)
            agent.buffer.add(self._ring_loss[prev], self._ring_action[prev], r, s)
        if self.epoch >= self.update_after and self.sac_step % self.update_every == 0:
            k = 1.0 + agent.buffer.size / agent.buffer.max_size
            for _ in range(int(self.update_every * (k / 2))):
                agent.update(k)
        w = agent.random_action() if self.epoch < self.start_epoch else agent.act(s)
        self._ring_action[slot] = w
        self.sac_step += 1
        self._slot = prev
        return w.to(device=raw.device, dtype=raw.dtype)

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        m = losses.shape[0]
        if self.num_tasks is not None and m != self.num_tasks:
            raise ValueError(f"IGB was built for {self.num_tasks} tasks, got {m} losses")
        raw = losses.detach()
        ok = (raw + self.eps > 0) if self.check_positive else None
        if self.version == 1:
            if self.base_losses is None:
                w = torch.ones_like(raw)
            else:
                w = igb_v1_weights(raw, self.base_losses.to(raw.device))
        else:
            w = self._v2_weights(raw, ctx.lr_factor)
        self.last_weights = w.detach()
        shifted = losses + self.eps if self.eps else losses
        what = (
            f"IGB takes log(L + eps) (eps={self.eps}) and needs positive losses; pass eps=... "
            "or use a positive loss for these tasks"
        )
        return WeightedLosses(
            w * torch.log(shifted),
            (w / shifted.detach()).detach(),
            domain=None if ok is None else (ok, what),
        )

    def current_weights(self, losses: Tensor) -> Tensor:
        """v1: the weights for ``losses`` from the current base losses (ones before they exist).
        v2: the weights of the last step (ones before the first); the policy is not sampled."""
        if self.version == 2:
            if self.last_weights is None:
                return torch.ones_like(losses).detach()
            return self.last_weights.to(device=losses.device, dtype=losses.dtype)
        if self.base_losses is None:
            return torch.ones_like(losses).detach()
        return igb_v1_weights(losses.detach(), self.base_losses.to(losses.device))
