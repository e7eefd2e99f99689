"""M-ConFIG — ConFIG with momentum (Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of
Physics Informed Neural Networks", ICLR 2025, arXiv:2408.11104, Sec. 3.3; the official
``conflictfree.momentum_operator.PseudoMomentumOperator``).

ConFIG applied to per-task first moments, followed by an Adam-like second-moment normalisation
of the combined direction (the paper's "pseudo" second moment, estimated from the ConFIG output
since no single gradient of the total exists). With ``t_i`` the number of updates of task ``i``'s
moment and ``t`` the number of combined steps taken:

    m_i ← β₁ m_i + (1 − β₁) g_i                   for the tasks updated this step; t_i += 1
    (until every task has been updated once: d = 0)
    t += 1;  m̂_i = m_i / (1 − β₁^{t_i})
    c = ConFIG(m̂)                                 (see :class:`ConFIG`)
    f = c (1 − β₁^t);  p = (f − β₁ f_prev)/(1 − β₁);  f_prev ← f      (the pseudo gradient)
    s ← β₂ s + (1 − β₂) p²;  ŝ = s / (1 − β₂^t)
    d = c / (sqrt(ŝ) + ε)

The paper's point is cost: it back-propagates *one* task per step, cycling through the tasks,
and reuses the others' moments. Under a :class:`~mtlbal.Balancer` all ``m`` task gradients are
formed anyway, so the default ``schedule="all"`` updates every moment each step;
``schedule="cyclic"`` uses only task ``step mod m`` (the official example's
``index = global_step % m``), reproducing the official operator fed that one gradient — it
saves nothing here, and is not permutation-equivariant.

State (in ``state_dict``): the moments ``m`` (``[m, n]``, as large as the Jacobian), the counts
``t_i`` and ``t``, ``f_prev`` and ``s`` (``[n]`` each). ``n`` must not change. Use it at the
shared parameters (``at="params"``): at a cut point the moments would be indexed by sample
positions that hold different samples at every step, and under DDP a cut point's Jacobian is
not gathered.

Defaults: the official ``β₁ = 0.9``, ``β₂ = 0.999``, ``ε = 1e-8``. The output is already
normalised per coordinate like an Adam step (entries of size ~1): the official documentation
recommends plain SGD with it, not Adam.

Scale: ``reduction="sum"`` (default) returns ``d``; ``"mean"`` divides it by ``m``.
Homogeneity: degree 0 with ``eps = 0`` (a coordinate with ``ŝ = 0`` has ``c = 0`` there, and is
guarded to 0); with the default ``ε = 1e-8`` no degree holds.

Host sync: the SVD of the pseudo-inverse (see :class:`ConFIG`).

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> MConFIG(eps=0.0)(J)  # first step: ŝ = c², so d = sign(c)
    tensor([1.0000, 1.0000])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mtlbal.aggregation.base import Aggregator, Reduction
from mtlbal.aggregation.conflict_free import config_direction
from mtlbal.step import StepContext

__all__ = ["MConFIG", "mconfig_step"]

Schedule = Literal["all", "cyclic"]


def mconfig_step(
    jacobian: Tensor,
    mask: Tensor,
    state: dict[str, Tensor],
    pref: Tensor | None = None,
    *,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    rtol: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One M-ConFIG step: ``(d [n], new state)``.

    Args:
        jacobian: ``J`` ``[m, n]``.
        mask: ``[m]`` bool, the tasks whose moments this step updates.
        state: ``mom [m, n]``, ``t_task [m]`` (int64), ``t`` (int64 scalar), ``f_prev [n]``,
            ``s [n]``.
    """
    g = jacobian.detach()
    mom, t_task = state["mom"].to(g), state["t_task"].to(g.device)
    sel = mask.to(g.device)
    mom = torch.where(sel[:, None], beta1 * mom + (1 - beta1) * g, mom)
    t_task = t_task + sel.to(t_task.dtype)
    ready = (t_task > 0).all()
    t = state["t"].to(g.device) + ready.to(torch.int64)
    f_prev, s = state["f_prev"].to(g), state["s"].to(g)
    # bias corrections as tensors (no host read); 1 − β^0 = 0 only where ready is False
    corr = 1 - beta1 ** t_task.to(torch.float64)
    m_hat = mom / torch.where(corr > 0, corr, 1.0).to(g.dtype)[:, None]
    c = config_direction(m_hat, pref, rtol=rtol).to(g.dtype)
    tf = t.to(torch.float64)
    f = c * (1 - beta1**tf).to(g.dtype)
    p = (f - beta1 * f_prev) / (1 - beta1)
    s_new = beta2 * s + (1 - beta2) * p * p
    s_hat = s_new / torch.where(tf > 0, 1 - beta2**tf, 1.0).to(g.dtype)
    den = s_hat.sqrt() + eps
    d = torch.where(den > 0, c / torch.where(den > 0, den, 1.0), 0.0)
    d = torch.where(ready, d, torch.zeros_like(d))
    new = {
        "mom": mom,
        "t_task": t_task,
        "t": t,
        "f_prev": torch.where(ready, f, f_prev),
        "s": torch.where(ready, s_new, s),
    }
    return d, new


class MConFIG(Aggregator):
    """ConFIG on per-task momenta with a pseudo second moment (the official M-ConFIG).

    Args:
        beta1: first-moment coefficient (0.9).
        beta2: second-moment coefficient (0.999).
        eps: added to ``sqrt(ŝ)`` (1e-8).
        schedule: ``"all"`` (default: every task's moment each step) or ``"cyclic"`` (only
            task ``step mod m``, as the paper's one-gradient-per-step recipe).
        pref: preference vector of the ConFIG direction (default ones).
        rtol: pseudo-inverse cutoff (see :class:`ConFIG`).
        reduction: ``"sum"`` (default) or ``"mean"`` (``d/m``).
    """

    host_sync = True
    mom: Tensor | None
    t_task: Tensor | None
    t: Tensor
    f_prev: Tensor | None
    s: Tensor | None
    calls: Tensor

    supports_missing_tasks = False
    missing_tasks_note = (
        "its per-task momenta and update schedule cover every task (not implemented for a step "
        "without some tasks)"
    )

    def __init__(
        self,
        *,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        schedule: Schedule = "all",
        pref: Tensor | Sequence[float] | None = None,
        rtol: float | None = None,
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
        if eps < 0:
            raise ValueError(f"eps must be ≥ 0, got {eps}")
        if schedule not in ("all", "cyclic"):
            raise ValueError(f"schedule must be 'all' or 'cyclic', got {schedule!r}")
        if rtol is not None and rtol < 0:
            raise ValueError(f"rtol must be ≥ 0, got {rtol}")
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.schedule: Schedule = schedule
        if pref is None:
            self.pref: Tensor | None = None
        elif isinstance(pref, Tensor):
            self.pref = pref.detach().clone().to(torch.float64)
        else:
            self.pref = torch.as_tensor(pref, dtype=torch.float64)
        self.rtol = None if rtol is None else float(rtol)
        # the output is Adam-normalised: degree 0, unless eps sets an absolute scale
        self.homogeneity = 0 if self.eps == 0 else None
        for name in ("mom", "t_task", "f_prev", "s"):
            self.add_state(name, None)
        self.add_state("t", torch.zeros((), dtype=torch.int64))
        self.add_state("calls", torch.zeros((), dtype=torch.int64))

    def hparams(self) -> dict[str, object]:
        return {
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "schedule": self.schedule,
            "pref": None if self.pref is None else self.pref.tolist(),
            "rtol": self.rtol,
            "reduction": self.reduction,
        }

    def aggregate_jacobian(self, jacobian: Tensor, ctx: StepContext | None = None) -> Tensor:
        m, n = jacobian.shape
        dev = jacobian.device
        if self.mom is None:
            state = {
                "mom": torch.zeros_like(jacobian),
                "t_task": torch.zeros(m, dtype=torch.int64, device=dev),
                "t": self.t.to(dev),
                "f_prev": jacobian.new_zeros(n),
                "s": jacobian.new_zeros(n),
            }
        else:
            if tuple(self.mom.shape) != (m, n):
                raise ValueError(
                    f"MConFIG holds moments for {self.mom.shape[0]} tasks × {self.mom.shape[1]} "
                    f"entries, got a Jacobian of {m} × {n} (the shared part, or the cut point's "
                    "batch size, must not change between steps)"
                )
            assert self.t_task is not None and self.f_prev is not None and self.s is not None
            state = {
                "mom": self.mom,
                "t_task": self.t_task,
                "t": self.t,
                "f_prev": self.f_prev,
                "s": self.s,
            }
        calls = self.calls.to(dev)
        if self.schedule == "all":
            mask = torch.ones(m, dtype=torch.bool, device=dev)
        else:
            mask = torch.arange(m, device=dev) == (calls % m)
        d, new = mconfig_step(
            jacobian,
            mask,
            state,
            self.pref,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            rtol=self.rtol,
        )
        self.mom, self.t_task, self.t = new["mom"], new["t_task"], new["t"]
        self.f_prev, self.s = new["f_prev"], new["s"]
        self.calls = self.calls + 1
        return (d * self._scale(m)).to(jacobian.dtype)
