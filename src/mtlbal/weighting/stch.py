"""STCH — smooth Tchebycheff scalarization (Lin et al., "Smooth Tchebycheff
Scalarization for Multi-Objective Optimization", ICML 2024, arXiv:2402.19078).

The Tchebycheff scalarization ``max_t λ_t (f_t − z*_t)`` is smoothed into

    g_μ(f) = μ · log Σ_t exp(λ_t (f_t − z*_t) / μ),

whose gradient is ``Σ_t p_t λ_t ∇f_t`` with ``p = softmax(λ (f − z*) / μ)``: the objectives with
the largest (weighted, shifted) values get the largest weights. ``μ → 0`` is the
Tchebycheff ``max``; ``μ → ∞`` the linear scalarization ``Σ_t λ_t f_t / m`` (plus a constant).

**For multi-task learning** (the authors' code, ``Xi-L/STCH`` ``STCH_MTL``, identical to
LibMTL's ``STCH``) the objectives are the log-losses normalised by a reference ``z`` (the code's
``nadir_vector``),

    f_t = log(L_t / z_t + ε),   z*_t = 0,   λ_t = 1,   total = m · g_μ(f),

so ``ℓ_t = m·p_t·f_t`` with ``p`` detached and ``∂ℓ_t/∂L_t = m·p_t / (L_t + ε·z_t)``. ``z`` is
estimated by a warm-up: during epochs ``0 … warmup_epoch`` the objective is the
scale-invariant ``Σ_t log(L_t + ε)`` (:class:`ScaleInvariant`), and ``z`` is the mean training
loss of epoch ``warmup_epoch`` (0-indexed; the code's default 4, so STCH proper starts at epoch
5). Epochs are marked by :meth:`mtlbal.Balancer.epoch_end`. A ``reference`` given to the
constructor skips the warm-up. The factor ``m`` makes the switch continuous: for balanced
normalised losses ``p_t = 1/m`` and the weight is ``1/L_t``, the warm-up's.

``transform="none"`` is the paper's general form on the raw losses, ``f_t = L_t`` shifted by the
reference point ``z*`` (``reference``, or the warm-up estimate; during a warm-up the objective
is then ``Σ_t L_t``), as TorchJD's ``STCH(mu, weights, reference)``.

Parameters and conventions: ``mu`` (the code's default 1.0; the paper studies 0.01–1);
``pref`` = ``λ`` (default ones, the MTL code's; TorchJD's default is ``1/m``, which is not a
rescaling: ``g_{μ}`` with ``λ/m`` equals ``g_{mμ}`` with ``λ``, divided by ``m``);
``reduction="sum"`` is the code's ``m·g``, ``"mean"`` the paper's ``g`` (the warm-up's ``Σ log``
is divided by ``m`` too). The log-sum-exp is computed with the largest term factored out (as the
paper's appendix and both codes), so small ``μ`` never overflows.

Domain (``transform="log"``): ``L_t / z_t + ε > 0`` (during the warm-up ``L_t + ε > 0``); the
estimated reference must be ``> 0`` (checked once, when the warm-up epoch ends: one host read
per run). A loss outside the domain is refused naming the task (folded into the Balancer's one
host sync). ``ε = 1e-20`` by default, the code's: a loss of exactly 0 then gets the weight
``~1/(ε·z)`` — an enormous gradient (pitfall of the original; raise ``eps`` if your losses can
reach 0).

State (in ``state_dict``): the reference ``z``, the running sum of the warm-up epoch's losses,
their count and the epoch counter. Under DDP the strategy sees the rank mean of the losses, so
every rank estimates the same ``z``. No host sync per step.

Missing tasks: refused (``supports_missing_tasks = False``): the reference is every task's mean
loss over one epoch and the softmax couples all the tasks.

Shapes: ``L`` ``[m]`` → weights ``[m]``.

Example:
    >>> import torch
    >>> stch = STCH(mu=1.0, reference=[1.0, 1.0])  # no warm-up: z given
    >>> stch(torch.tensor([1.0, 3.0]))  # m·softmax(log L)/L = 2·(L/ΣL)/L = 2/ΣL
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mtlbal.step import Need
from mtlbal.weighting.base import LossContext, LossWeighting, WeightedLosses

__all__ = ["STCH", "stch_scalarization", "stch_weights"]

Transform = Literal["log", "none"]


def stch_scalarization(values: Tensor, mu: float, pref: Tensor | None = None) -> Tensor:
    """``μ · log Σ_t exp(λ_t v_t / μ)`` (a scalar, differentiable in ``values``), with the largest
    term factored out; ``values`` ``[m]`` are the shifted objectives ``f − z*``, ``pref`` is
    ``λ`` (``None``: ones)."""
    y = values if pref is None else pref.to(values) * values
    top = y.detach().max()
    return mu * torch.logsumexp((y - top) / mu, dim=0) + top


def stch_weights(values: Tensor, mu: float, pref: Tensor | None = None) -> Tensor:
    """``∂ g_μ / ∂v_t = λ_t · softmax(λ v / μ)_t`` (``[m]``, detached) for the shifted objectives
    ``values`` ``[m]``."""
    v = values.detach()
    if pref is None:
        return torch.softmax(v / mu, dim=0)
    lam = pref.to(v)
    return lam * torch.softmax(lam * v / mu, dim=0)


class STCH(LossWeighting):
    """Smooth Tchebycheff scalarization of the (log-normalised) losses, with the reference
    estimated by a warm-up as in the authors' multi-task code.

    Args:
        num_tasks: optional; checked against the number of losses when given.
        mu: smoothing ``μ > 0`` (default 1.0, the code's).
        pref: preference ``λ`` (``m`` non-negative numbers; default ones).
        reference: ``z`` in loss units (``m`` numbers; positive for ``transform="log"``). Given,
            there is no warm-up; ``None`` (default): estimated as the mean training loss of
            epoch ``warmup_epoch``.
        warmup_epoch: the 0-indexed epoch whose mean loss becomes ``z`` (default 4, the code's).
        transform: ``"log"`` (default: ``f = log(L/z + ε)``, the code's) or ``"none"``
            (``f = L − z``, the paper's general form and TorchJD's).
        eps: ``ε ≥ 0`` inside the log (default ``1e-20``, the code's).
        reduction: ``"sum"`` (default: ``m·g``, the code's) or ``"mean"`` (``g``).
    """

    reference: Tensor | None
    epoch_sum: Tensor | None
    pref_t: Tensor | None

    supports_missing_tasks = False
    missing_tasks_note = (
        "its reference z is each task's mean loss over an epoch and its softmax couples every "
        "task: a step without some tasks has no STCH value"
    )

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        mu: float = 1.0,
        pref: Sequence[float] | None = None,
        reference: Sequence[float] | None = None,
        warmup_epoch: int = 4,
        transform: Transform = "log",
        eps: float = 1e-20,
        reduction: Literal["sum", "mean"] = "sum",
    ) -> None:
        super().__init__()
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        if not (mu > 0 and mu != float("inf")):
            raise ValueError(f"mu must be finite and > 0, got {mu}")
        if transform not in ("log", "none"):
            raise ValueError(f"transform must be 'log' or 'none', got {transform!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if warmup_epoch < 0:
            raise ValueError(f"warmup_epoch must be ≥ 0, got {warmup_epoch}")
        if not eps >= 0:
            raise ValueError(f"eps must be ≥ 0, got {eps}")
        sizes = {len(x) for x in (pref, reference) if x is not None}
        if num_tasks is not None:
            sizes.add(num_tasks)
        if len(sizes) > 1:
            raise ValueError(
                f"STCH: num_tasks, pref and reference disagree on the number of tasks: "
                f"num_tasks={num_tasks}, pref={pref}, reference={reference}"
            )
        if pref is not None:
            pref = [float(x) for x in pref]
            if not all(0 <= x < float("inf") for x in pref):
                raise ValueError(f"pref must be finite and ≥ 0, got {pref}")
        if reference is not None:
            reference = [float(x) for x in reference]
            if not all(abs(x) < float("inf") for x in reference):
                raise ValueError(f"reference must be finite, got {reference}")
            if transform == "log" and not all(x > 0 for x in reference):
                raise ValueError(
                    f"STCH(transform='log') divides the losses by the reference: it must be "
                    f"> 0, got {reference}"
                )
        self.num_tasks = num_tasks
        self.mu = float(mu)
        self.pref = pref
        self.reference_init = reference
        self.warmup_epoch = int(warmup_epoch)
        self.transform: Transform = transform
        self.eps = float(eps)
        self.reduction: Literal["sum", "mean"] = reduction
        if reference is None:
            self.needs = frozenset({Need.EPOCHS})
        lam = None if pref is None else torch.tensor(pref, dtype=torch.float64)
        self.register_buffer("pref_t", lam, persistent=False)
        ref = None if reference is None else torch.tensor(reference, dtype=torch.float64)
        self.add_state("reference", ref)
        self.add_state("epoch_sum", None)
        self.epoch = 0
        self.epoch_count = 0

    def hparams(self) -> dict[str, object]:
        return {
            "num_tasks": self.num_tasks,
            "mu": self.mu,
            "pref": self.pref,
            "reference": self.reference_init,
            "warmup_epoch": self.warmup_epoch,
            "transform": self.transform,
            "eps": self.eps,
            "reduction": self.reduction,
        }

    def extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "epoch_count": self.epoch_count}

    def load_extra_state(self, state: Any) -> None:
        self.epoch = int(state["epoch"])
        self.epoch_count = int(state["epoch_count"])

    def reset_extra(self) -> None:
        self.epoch = 0
        self.epoch_count = 0

    @property
    def warming_up(self) -> bool:
        """Whether the reference is still unknown (the objective is the warm-up's)."""
        return self.reference is None

    # ------------------------------------------------------------------ epochs
    def observe(self, losses: Tensor, present: tuple[int, ...] | None = None) -> None:
        """Accumulate the raw losses of a taken step during epoch ``warmup_epoch`` (on device);
        ``present`` is never set (STCH refuses missing-task steps)."""
        if self.reference is not None or self.epoch != self.warmup_epoch:
            return
        raw = losses.detach().to(torch.float64)
        self.epoch_sum = raw if self.epoch_sum is None else self.epoch_sum + raw
        self.epoch_count += 1

    def epoch_end(self) -> None:
        """Close the current epoch; at the end of epoch ``warmup_epoch`` set ``z`` to its mean
        loss. Called by :meth:`mtlbal.Balancer.epoch_end`."""
        if self.reference is None and self.epoch == self.warmup_epoch:
            if self.epoch_sum is None or self.epoch_count == 0:
                raise ValueError(
                    f"STCH: epoch {self.epoch} (warmup_epoch) ended without any step; the "
                    "reference is the mean training loss of that epoch"
                )
            z = self.epoch_sum / self.epoch_count
            if self.transform == "log":
                positive = (z > 0).tolist()  # once per run: the losses are divided by z
                if not all(positive):
                    i = positive.index(False)
                    raise ValueError(
                        f"STCH: the reference z (mean loss of epoch {self.epoch}) must be > 0, "
                        f"the losses are divided by it; task {i} has {float(z[i])!r}"
                    )
            self.reference = z
            self.epoch_sum = None
            self.epoch_count = 0
        self.epoch += 1

    # ------------------------------------------------------------------ weights
    def _parts(self, losses: Tensor) -> tuple[Tensor, Tensor, Tensor, str]:
        """``(f, c, ok, what)``: the per-task transformed losses ``f`` (differentiable), their
        detached coefficients ``c`` (``ℓ = c·f``), the domain and its wording."""
        m = losses.shape[0]
        if self.num_tasks is not None and m != self.num_tasks:
            raise ValueError(f"STCH was built for {self.num_tasks} tasks, got {m} losses")
        if self.pref_t is not None and self.pref_t.shape[0] != m:
            raise ValueError(f"STCH has {self.pref_t.shape[0]} preferences, got {m} losses")
        raw = losses.detach()
        k = float(m) if self.reduction == "sum" else 1.0
        if self.reference is None:  # warm-up: Σ log(L + ε) (or Σ L)
            if self.transform == "log":
                f = torch.log(losses + self.eps if self.eps else losses)
                ok = raw + self.eps > 0
                what = f"STCH's warm-up takes log(L + eps) (eps={self.eps}) and needs L + eps > 0"
            else:
                f, ok, what = losses, torch.ones_like(raw, dtype=torch.bool), ""
            c = torch.full_like(raw, k / m)
            return f, c, ok, what
        z = self.reference.to(device=losses.device, dtype=losses.dtype)
        if z.shape[0] != m:
            raise ValueError(f"STCH has a reference for {z.shape[0]} tasks, got {m} losses")
        if self.transform == "log":
            f = torch.log(losses / z + self.eps)
            ok = raw / z + self.eps > 0
            what = (
                f"STCH takes log(L/z + eps) (eps={self.eps}) and needs L/z + eps > 0 for "
                "its reference z > 0"
            )
        else:
            f, ok, what = losses - z, torch.ones_like(raw, dtype=torch.bool), ""
        lam = None if self.pref_t is None else self.pref_t.to(device=raw.device, dtype=raw.dtype)
        c = k * stch_weights(f.detach(), self.mu, lam)
        return f, c, ok, what

    def _weights(self, losses: Tensor, f: Tensor, c: Tensor) -> Tensor:
        """``∂ℓ_t/∂L_t = c_t · f'(L_t)``."""
        if self.transform == "none":
            return c
        raw = losses.detach()
        if self.reference is None:
            return c / (raw + self.eps)
        z = self.reference.to(device=raw.device, dtype=raw.dtype)
        return c / (raw + self.eps * z)

    def objectives(self, losses: Tensor, ctx: LossContext) -> WeightedLosses:
        f, c, ok, what = self._parts(losses)
        w = self._weights(losses, f, c).detach()
        ok = ok & torch.isfinite(w)
        what = (what + "; " if what else "STCH ") + "needs weights the dtype can hold"
        return WeightedLosses(c * f, w, domain=(ok, what))

    def current_weights(self, losses: Tensor) -> Tensor:
        raw = losses.detach()
        f, c, _, _ = self._parts(raw)
        return self._weights(raw, f, c)
