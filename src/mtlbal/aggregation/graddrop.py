"""GradDrop — Gradient Sign Dropout (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov,
"Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020,
arXiv:2010.06808; Algorithm 1, lines 10–15).

Per coordinate ``k`` of the shared part (a parameter entry, or an activation entry at a cut
point), the *gradient positive sign purity*

    P_k = ½ (1 + Σ_t J_tk / Σ_t |J_tk|)            ∈ [0, 1]

is the probability of keeping the positive components. With one uniform draw ``U_k ~ U(0, 1)``
per coordinate, task ``t`` keeps its component if it has the chosen sign,

    M_tk = 1[P_k > U_k] · 1[J_tk > 0] + 1[P_k < U_k] · 1[J_tk < 0]

and the update is ``d_k = Σ_t (ℓ_t + (1 − ℓ_t) M_tk) J_tk`` with the leak ``ℓ_t ∈ [0, 1]``
(``ℓ_t = 1``: task ``t`` is never masked, the paper's choice for a main task). Where every task
agrees in sign, ``P_k ∈ {0, 1}`` and nothing is dropped.

It needs per-coordinate signs, so it is a Jacobian aggregator: under a Balancer the engine forms
``J`` at the shared parameters, or at a cut point (``at=module``: the activation gradients, the
paper's and LibMTL's setting; not under DDP, where only the Gramian is gathered).

Where it differs from the references:

* TorchJD's ``GradDrop(f, leak)`` computes the same per coordinate, with ``f`` (a monotone map
  of ``P``, default identity) and no epsilon; ``f`` is not offered here (identity). TorchJD
  draws ``U`` from the global RNG; here from the strategy's own generator.
* LibMTL (rep-grad only) first multiplies the representation gradient by ``sign(z)`` and sums
  it over the batch dimension, then draws one ``U`` per feature (the mask is shared by the
  batch), and adds ``1e-7`` to ``Σ|·|``. That batch-summed variant needs the representation
  ``z`` and its batch layout, which an aggregator does not see; it is not provided.
* A coordinate where every task's gradient is 0 has no purity (0/0); it contributes 0, as in
  TorchJD (no epsilon, so the method is exactly positively homogeneous).

Scale: the paper sums the masked gradients (``reduction="sum"``, default, TorchJD's too);
``"mean"`` divides by ``m``. Identical gradients are never masked: the update is ``Σ_t g_t``.

Randomness: a CPU ``torch.Generator`` seeded by ``seed``; ``U`` (``[n]``) is drawn in the
Jacobian's dtype on the CPU and copied to its device (no host sync; a host-to-device copy of
``n`` numbers per step). The generator state is in ``state_dict``: a resumed run draws the same
``U``.

Properties: permutation equivariant when the leaks are equal (one draw per coordinate, not per
task), positively homogeneous of degree 1, no state besides the generator.
``StepInfo.weights`` reports the loss weights (no per-task weight exists).

Example:
    >>> import torch
    >>> J = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    >>> d = GradDrop(seed=0)(J)   # column 0 agrees in sign: kept; column 1: one sign survives
    >>> d[0].item(), d[1].item() in (2.0, -2.0)
    (4.0, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlbal.aggregation.base import Aggregator, Reduction
from mtlbal.step import StepContext

__all__ = ["GradDrop", "graddrop"]


def graddrop(jacobian: Tensor, uniform: Tensor, leak: Tensor | float = 0.0) -> Tensor:
    """GradDrop's update ``[n]`` (sum scale) from ``J`` (``[m, n]``), the draws ``U`` (``[n]``,
    in ``[0, 1)``) and the leaks (a float, or ``[m]``)."""
    m = jacobian.shape[0]
    total = jacobian.sum(0)
    mass = jacobian.abs().sum(0)
    # 0/0 on an all-zero column: any purity does (every component there is 0)
    purity = 0.5 * (1 + total / torch.where(mass > 0, mass, torch.ones_like(mass)))
    u = uniform.to(device=jacobian.device, dtype=jacobian.dtype)
    keep = ((purity > u) & (jacobian > 0)) | ((purity < u) & (jacobian < 0))
    lk = torch.as_tensor(leak, dtype=jacobian.dtype, device=jacobian.device)
    lk = lk.reshape(m, 1) if lk.dim() == 1 else lk
    return ((lk + (1 - lk) * keep.to(jacobian.dtype)) * jacobian).sum(0)


class GradDrop(Aggregator):
    """Gradient sign dropout: per coordinate, keep one sign at random, by its purity.

    Args:
        leak: ``ℓ``, a float for every task or one per task (each in ``[0, 1]``; default 0).
        seed: seed of the generator that draws ``U`` (``None``: nondeterministic).
        reduction: ``"sum"`` (default, the paper's) or ``"mean"`` (divided by ``m``).
    """

    requires = "jacobian"
    homogeneity = 1
    # one draw per coordinate, none per task: a missing-task step is the method on the present
    # tasks' rows (with their leaks)
    supports_missing_tasks = True

    def __init__(
        self,
        leak: float | Sequence[float] = 0.0,
        *,
        seed: int | None = 0,
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__(reduction)
        if isinstance(leak, (int, float)) and not isinstance(leak, bool):
            values: float | list[float] = float(leak)
            check = [float(leak)]
        elif isinstance(leak, Sequence) and not isinstance(leak, str):
            values = [float(v) for v in leak]
            check = values
            if not values:
                raise ValueError("GradDrop: leak is an empty sequence")
        else:
            raise TypeError(f"GradDrop: leak must be a float or a sequence, got {leak!r}")
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in check):
            raise ValueError(f"GradDrop: every leak must be in [0, 1], got {leak!r}")
        self.leak = values
        self.seed = seed
        self._gen = self.add_generator(seed)

    def hparams(self) -> dict[str, object]:
        return {"leak": self.leak, "seed": self.seed, "reduction": self.reduction}

    def _draw(self, n: int, dtype: torch.dtype) -> Tensor:
        draw = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        return torch.rand(n, generator=self._gen, dtype=draw)

    def aggregate_jacobian(self, jacobian: Tensor, ctx: StepContext | None = None) -> Tensor:
        m, n = jacobian.shape
        ctx = ctx if ctx is not None else StepContext()
        leak: float | Tensor = 0.0
        if isinstance(self.leak, list):
            full = ctx.num_all_tasks(m)
            if len(self.leak) != full:
                raise ValueError(f"GradDrop: {len(self.leak)} leaks for {full} tasks")
            values = self.leak if ctx.present is None else [self.leak[i] for i in ctx.present]
            leak = torch.tensor(values)
        else:
            leak = self.leak
        u = self._draw(n, jacobian.dtype)
        return graddrop(jacobian, u, leak) * self._scale(m)

    @property
    def is_stateful(self) -> bool:
        return isinstance(self.leak, list)  # per-task leaks are bound to the task order
