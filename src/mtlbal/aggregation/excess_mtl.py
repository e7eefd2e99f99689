"""ExcessMTL (He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with
Excess Risks", ICML 2024, arXiv:2402.02009).

Weigh the tasks by their *excess risk* (distance to convergence) rather than their loss, so that
a task with large irreducible (Bayes) error — e.g. label noise — does not take over. The excess
risk of task ``i`` is estimated by a second-order Taylor expansion with an AdaGrad-style
diagonal Hessian (the paper's Eqs. 6–7), and the weights follow an exponentiated-gradient step
(Eq. 9). At every step, with ``S`` (``[m, n]``, state) the running sum of squared gradients:

    S_i  ← S_i + g_i ⊙ g_i
    e_i  = Σ_k g_ik² / sqrt(S_ik + ε)                   (ε = 1e-7)
    step 1:   b = e  (the baseline; weights unchanged)
    later:    w_i ← w_i · exp(η · e_i / b_i),  then w ← m · w / Σ w
    d = Jᵀ w

with ``w = 1`` at the start (the official code's scale: ``Σ w = m``; ``reduction="mean"`` divides
by ``m``, TorchJD's simplex scale). The multiplicative update is done in log space
(``log w ← log w + η e/b``, then a log-sum-exp normalisation): the same numbers without the
overflow of ``exp`` for large ``η e/b``.

State (in ``state_dict``): ``S`` (memory as large as the Jacobian), the baseline ``b`` and
``log w``. ``n`` must not change between steps. Use it at the shared parameters
(``at="params"``): at a cut point the entries of ``S`` would be (sample, feature) positions
that hold different samples at every step (the official code's ``rep_grad`` mode sums over the
batch first; not provided), and under DDP a cut point's Jacobian is not gathered.

Defaults: ``η`` (``robust_step_size``) = 1e-2 as LibMTL's and the official repository's
command-line default (its README example uses 1; TorchJD's default is 1.0); ``ε = 1e-7`` as the
official code.

Differences from the references. The official code (LibMTL's copy is the same) divides by the
baseline without a guard; here a task whose first excess risk is exactly 0 (a zero gradient at
step 1) takes its baseline at the first step where it is positive and is not updated until then.
TorchJD starts from ``w = 1/m`` and already applies the *unnormalised* ``e`` at step 1 (the
official code only records the baseline there), and adds 1e-7 to the baseline; its
``n_warmup_steps=1`` reproduces the official first step, and then ``m ×`` its update equals
this one up to that 1e-7.

Homogeneity: with ``eps = 0`` (exact zeros guarded: ``0/0 = 0``) ``e`` has degree 1, ``e/b``
degree 0, so ``d`` has degree 1; with the default ``ε = 1e-7`` no degree holds (the ``ε``
dominates ``S`` once gradient entries are below ~3e-4).

Host sync: none.

Example:
    >>> import torch
    >>> agg = ExcessMTL(robust_step_size=1.0)
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> agg(J)  # step 1 records the baseline: w = 1
    tensor([1., 2.])
    >>> agg.weights_now().tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbal.aggregation.base import Aggregator, Reduction
from mtlbal.step import StepContext

__all__ = ["ExcessMTL", "excess_mtl_step"]


def excess_mtl_step(
    jacobian: Tensor,
    sq_sum: Tensor,
    baseline: Tensor,
    log_w: Tensor,
    *,
    robust_step_size: float = 1e-2,
    eps: float = 1e-7,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One ExcessMTL step: ``(w [m] float64 (sum m), S [m, n], baseline [m], log w [m])``.

    ``baseline`` holds ``b`` (``0`` where not taken yet: on the first step, all of it).
    """
    g = jacobian.detach()
    s_new = sq_sum.to(g) + g * g
    h = (s_new + eps).sqrt()
    # 0/0 = 0: with eps = 0 an entry of S is 0 only where every gradient so far was 0
    e = torch.where(h > 0, g * g / torch.where(h > 0, h, 1.0), 0.0).sum(1).to(torch.float64)
    b = baseline.to(device=g.device, dtype=torch.float64)
    have = b > 0
    ratio = torch.where(have, e / torch.where(have, b, 1.0), 0.0)
    b_new = torch.where(have, b, e)
    lw = log_w.to(device=g.device, dtype=torch.float64) + robust_step_size * ratio
    m = lw.shape[0]
    lw = lw - torch.logsumexp(lw, 0) + torch.log(torch.tensor(float(m), dtype=lw.dtype))
    return lw.exp(), s_new, b_new, lw


class ExcessMTL(Aggregator):
    """Excess-risk task weights (exponentiated gradient on AdaGrad-scaled excess risks).

    Args:
        robust_step_size: the step size ``η`` of the weight update (1e-2).
        eps: added under the square root of ``S`` (1e-7, the official code's).
        reduction: ``"sum"`` (default, ``Σ w = m``) or ``"mean"`` (``Σ w = 1``).
    """

    sq_sum: Tensor | None
    baseline: Tensor | None
    log_w: Tensor | None

    supports_missing_tasks = False
    missing_tasks_note = (
        "its robust weights are a normalised exponential over every task's excess risk "
        "(not implemented for a step without some tasks)"
    )

    def __init__(
        self, *, robust_step_size: float = 1e-2, eps: float = 1e-7, reduction: Reduction = "sum"
    ) -> None:
        super().__init__(reduction)
        if not robust_step_size > 0:
            raise ValueError(f"robust_step_size must be > 0, got {robust_step_size}")
        if eps < 0:
            raise ValueError(f"eps must be ≥ 0, got {eps}")
        self.robust_step_size = float(robust_step_size)
        self.eps = float(eps)
        self.homogeneity = 1 if self.eps == 0 else None
        self.add_state("sq_sum", None)
        self.add_state("baseline", None)
        self.add_state("log_w", None)

    def hparams(self) -> dict[str, object]:
        return {
            "robust_step_size": self.robust_step_size,
            "eps": self.eps,
            "reduction": self.reduction,
        }

    def weights_now(self) -> Tensor:
        """The current task weights ``w`` (``Σ w = m``; ones before the first step)."""
        if self.log_w is None:
            raise ValueError("ExcessMTL has not taken a step yet")
        return self.log_w.exp()

    def aggregate_jacobian(self, jacobian: Tensor, ctx: StepContext | None = None) -> Tensor:
        m, n = jacobian.shape
        s = self.sq_sum
        if s is None:
            s = torch.zeros_like(jacobian)
        elif tuple(s.shape) != (m, n):
            raise ValueError(
                f"ExcessMTL holds squared-gradient sums for {s.shape[0]} tasks × {s.shape[1]} "
                f"entries, got a Jacobian of {m} × {n} (the shared part, or the cut point's "
                "batch size, must not change between steps)"
            )
        dev = jacobian.device
        b = self.baseline if self.baseline is not None else torch.zeros(m, dtype=torch.float64)
        lw = self.log_w if self.log_w is not None else torch.zeros(m, dtype=torch.float64)
        w, self.sq_sum, self.baseline, self.log_w = excess_mtl_step(
            jacobian,
            s,
            b.to(dev),
            lw.to(dev),
            robust_step_size=self.robust_step_size,
            eps=self.eps,
        )
        return (w * self._scale(m)).to(jacobian.dtype) @ jacobian
