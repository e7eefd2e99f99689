"""Every strategy the battery runs over. Add one entry per strategy (or configuration).

Each entry builds the Balancer keyword arguments for ``m`` tasks. ``at`` lists where the
strategy is exercised: ``"params"`` and/or ``"cut"``.

Declared behaviour (checked by tests/unit/test_properties.py, decided from each method's paper):

``identical``: what ``m`` tasks with one and the same loss (hence identical task gradients) give
at the shared part. ``"sum"``: exactly the gradient of ``Σ_t L_t``; ``"mean"``: of their mean
(``reduction="mean"``); ``"scaled"``: a positive multiple of it, ``w̄ · ∇Σ_t L_t`` with ``w̄`` the
mean reported weight (a method on its own scale: Nash-MTL's ``α = 1/(√m‖g‖)``, IGB's ``1/L``,
CAGrad's ``(1+c)/(1+c²)``, MGDA-l2's ``1/‖g‖``, learned uncertainties ``e^{−s}/2``);
``"parallel"``: at fixed parameters, a positive multiple of it that no reported weight states
(Jacobian methods whose momentum buffers start at 0: MoCo, DB-MTL);
``None``: nothing of the kind holds (a random weighting draws a different weight per task;
fixed unequal weights).

``permutation``: permuting the tasks permutes the reported weights and leaves the shared update
unchanged. ``False`` for methods that draw random numbers in task order (RLW's weights,
PCGrad's and GradVac's visiting orders) or whose weights come from a network that is not
symmetric in its inputs (IGB v2's SAC agent).

``missing``: a step in which some tasks have no loss (tests/unit/test_missing_tasks.py).
``"slice"``: supported, and equal to the same strategy built for the present tasks only with the
present tasks' slice of the state; ``"own"``: supported, checked against its equation in its own
test (GradNorm: its renormalisation is over every task, so a sliced strategy differs);
``"refuse"``: refused before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mtlbal
from mtlbal import aggregation as A
from mtlbal import transforms as T
from mtlbal import weighting as W


@dataclass(frozen=True)
class Entry:
    name: str
    make: Callable[[int], dict[str, Any]]
    at: tuple[str, ...] = ("params", "cut")
    # epoch boundaries to mark during the battery's runs (every k steps; 0 = never)
    epoch_every: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    identical: str | None = "sum"
    permutation: bool = True
    missing: str = "slice"


P = ("params",)

REGISTRY: list[Entry] = [
    Entry("Equal", lambda m: {}),
    Entry(
        "UncertaintyWeighting",
        lambda m: {"weighting": W.UncertaintyWeighting(m)},
        identical="scaled",
    ),
    Entry(
        "UncertaintyWeighting-simple",
        lambda m: {"weighting": W.UncertaintyWeighting(m, form="simple")},
        identical="scaled",
    ),
    Entry("GradNorm", lambda m: {"weighting": W.GradNorm(m, alpha=1.5)}, missing="own"),
    Entry("DWA", lambda m: {"weighting": W.DWA(m)}, epoch_every=2),
    Entry("RLW", lambda m: {"weighting": W.RLW(m, seed=5)}, identical=None, permutation=False),
    Entry(
        "RLW+UPGrad",
        lambda m: {"weighting": W.RLW(m, seed=2), "aggregator": A.UPGrad()},
        identical=None,
        permutation=False,
    ),
    # FAMO's logit step needs balancer.update(re-evaluated losses) after optimizer.step();
    # without it the battery still exercises objectives + state (the logits stay at 0)
    Entry(
        "FAMO",
        lambda m: {"weighting": W.FAMO(m)},
        extras={"update_after_step": True},
        missing="refuse",
    ),
    Entry("MGDA", lambda m: {"aggregator": A.MGDA()}),
    Entry("MGDA-l2", lambda m: {"aggregator": A.MGDA(normalization="l2")}, identical="scaled"),
    Entry("PCGrad", lambda m: {"aggregator": A.PCGrad(seed=3)}, permutation=False),
    Entry("AlignedMTL", lambda m: {"aggregator": A.AlignedMTL()}),
    Entry("AlignedMTL-median", lambda m: {"aggregator": A.AlignedMTL(scale_mode="median")}),
    Entry("AlignedMTL-rmse", lambda m: {"aggregator": A.AlignedMTL(scale_mode="rmse")}),
    Entry(
        "AlignedMTL-mean",
        lambda m: {"aggregator": A.AlignedMTL(reduction="mean")},
        identical="mean",
    ),
    # IGB takes log L_t: the battery's losses must be positive (extras["positive_losses"])
    Entry(
        "IGBv1",
        lambda m: {"weighting": W.IGB(m, base_epoch=0)},
        epoch_every=2,
        extras={"positive_losses": True},
        missing="refuse",
        identical="scaled",
    ),
    Entry(
        "IGBv2",
        lambda m: {
            "weighting": W.IGB(
                m,
                version=2,
                base_epoch=0,
                update_after=1,
                start_epoch=2,
                update_every=2,
                batch_size=8,
                buffer_size=64,
                hidden=(16, 16),
                seed=0,
            )
        },
        epoch_every=2,
        extras={"positive_losses": True},
        missing="refuse",
        identical=None,
        permutation=False,
    ),
    Entry(
        "IGBv1+AlignedMTL",
        lambda m: {"weighting": W.IGB(m, base_epoch=0), "aggregator": A.AlignedMTL()},
        epoch_every=2,
        extras={"positive_losses": True},
        missing="refuse",
        identical="scaled",
    ),
    Entry(
        "UW+PCGrad",
        lambda m: {"weighting": W.UncertaintyWeighting(m), "aggregator": A.PCGrad(seed=1)},
        identical="scaled",
        permutation=False,
    ),
    Entry("CAGrad", lambda m: {"aggregator": A.CAGrad()}, identical="scaled"),
    Entry("DualProj", lambda m: {"aggregator": A.DualProj()}),
    Entry("GradVac", lambda m: {"aggregator": A.GradVac(seed=2)}, permutation=False),
    Entry("IMTLG", lambda m: {"aggregator": A.IMTLG()}),
    Entry("NashMTL", lambda m: {"aggregator": A.NashMTL()}, identical="scaled"),
    Entry("UPGrad", lambda m: {"aggregator": A.UPGrad()}),
    # PCD: task 0 is the primary, the others are constraints; identical tasks give g_0 (weights
    # (1, 0, …): not alike, nothing of the sum), and permuting the tasks changes the primary
    # (eps=0: exactly homogeneous; the default eps=1e-8 is exercised in test_properties.AGGS)
    Entry(
        "PCD",
        lambda m: {"aggregator": A.PCD(tau=0.2, eps=0.0)},
        identical=None,
        permutation=False,
        missing="refuse",
    ),
    # MoDo / SDMGrad on one batch (samples=1: the biased one-batch variant; the independent
    # samples layout is tested in test_modo.py / test_sdmgrad.py). MoDo has no degree of
    # homogeneity (its step size acts on λ in absolute units): test_properties.NO_DEGREE
    Entry("MoDo", lambda m: {"aggregator": A.MoDo()}, missing="refuse"),
    # lr=1, not the default 10: a step of 10 on the normalised A (eigenvalues up to ~m) makes the
    # projected inner SGD bounce between faces of the simplex and amplify round-off (the DDP
    # Gramian's last bits) to ~1e-9 in 20 steps; the battery's 1e-10 comparisons need a
    # well-conditioned configuration
    Entry("SDMGrad", lambda m: {"aggregator": A.SDMGrad(lr=1.0, eps=0.0)}, missing="refuse"),
    Entry("FairGrad", lambda m: {"aggregator": A.FairGrad(alpha=2.0)}, identical="scaled"),
    # Jacobian methods (MoCo, ExcessMTL, DB-MTL, ConFIG, M-ConFIG) run at the parameters: a cut
    # point's Jacobian is not gathered under DDP, and a per-entry state (momenta, squared sums)
    # at a cut would be indexed by sample positions that hold different samples at every step.
    # Identical tasks give a positive multiple of the gradient (MoCo's and DB-MTL's buffers
    # start at 0: "parallel") or an Adam-normalised step (M-ConFIG: nothing holds)
    Entry("MoCo", lambda m: {"aggregator": A.MoCo()}, at=P, identical="parallel", missing="refuse"),
    Entry(
        "MoCo-projection",
        lambda m: {"aggregator": A.MoCo(simplex="projection", normalize="none", rho=0.1)},
        at=P,
        identical="parallel",
        missing="refuse",
    ),
    # eps = 0 (ExcessMTL, DB-MTL, M-ConFIG): exactly homogeneous; the defaults' absolute eps
    # breaks the degree (their default configurations are checked in their own test files)
    Entry(
        "ExcessMTL",
        lambda m: {"aggregator": A.ExcessMTL(robust_step_size=0.5, eps=0.0)},
        at=P,
        missing="refuse",
    ),
    Entry(
        "DBMTL",
        lambda m: {"aggregator": A.DBMTL(eps=0.0)},
        at=P,
        identical="parallel",
        missing="refuse",
    ),
    Entry("ConFIG", lambda m: {"aggregator": A.ConFIG()}, at=P),
    Entry(
        "MConFIG",
        lambda m: {"aggregator": A.MConFIG(eps=0.0)},
        at=P,
        identical=None,
        missing="refuse",
    ),
    Entry(
        "MConFIG-cyclic",
        lambda m: {"aggregator": A.MConFIG(schedule="cyclic", eps=0.0)},
        at=P,
        identical=None,
        permutation=False,
        missing="refuse",
    ),
    # loss-level methods of issue 10; the log-based ones need positive losses
    Entry(
        "GeometricMean",
        lambda m: {"weighting": W.GeometricMean(m)},
        extras={"positive_losses": True},
    ),
    Entry(
        "ScaleInvariant",
        lambda m: {"weighting": W.ScaleInvariant(m)},
        extras={"positive_losses": True},
        identical="scaled",
    ),
    Entry("UWSO", lambda m: {"weighting": W.UWSO(m, temperature=0.5)}),
    Entry("IMTLL", lambda m: {"weighting": W.IMTLL(m)}, identical="scaled"),
    Entry(
        "IMTLL+IMTLG",
        lambda m: {"weighting": W.IMTLL(m), "aggregator": A.IMTLG()},
        identical="scaled",
    ),
    # warm-up (Σ log L) during epoch 0, whose mean loss becomes the reference; STCH afterwards
    Entry(
        "STCH",
        lambda m: {"weighting": W.STCH(m, warmup_epoch=0)},
        epoch_every=2,
        extras={"positive_losses": True},
        identical="scaled",
        missing="refuse",
    ),
    Entry(
        "STCH-reference",
        lambda m: {"weighting": W.STCH(m, mu=0.5, reference=[0.5] * m, reduction="mean")},
        extras={"positive_losses": True},
        identical="scaled",
        missing="refuse",
    ),
    # sparse training: half of each trunk neuron's inputs frozen (selected when the Balancer is
    # built, on the trunk's initial weights). The shared gradient is the masked one, so
    # "equal weights == sum(losses).backward()" holds only on the live entries; frozen entries
    # stay bitwise unchanged after wrap()'s step.
    Entry("SparseMask", lambda m: {"transforms": T.SparseMask(ratio=0.5)}, extras={"masked": True}),
    Entry(
        "SparseMask+MGDA",
        lambda m: {"aggregator": A.MGDA(), "transforms": T.SparseMask(ratio=0.5)},
        extras={"masked": True},
    ),
    # GO4Align, LDC-MTL, COSMOS, PBI (issue 10). GO4Align's β = ΣL/L_t and LDC-MTL's ratio to
    # the first losses need positive losses; LDC-MTL pairs tasks t, t+1 (order matters)
    Entry(
        "GO4Align",
        lambda m: {"weighting": W.GO4Align(m)},
        extras={"positive_losses": True},
        missing="refuse",
    ),
    Entry("GO4Align-K1", lambda m: {"weighting": W.GO4Align(m, num_groups=1)}, missing="refuse"),
    Entry(
        "LDCMTL",
        lambda m: {"weighting": W.LDCMTL(m)},
        extras={"positive_losses": True},
        permutation=False,
        missing="refuse",
    ),
    Entry(
        "LDCMTL-log+UPGrad",
        lambda m: {
            "weighting": W.LDCMTL(m, normalization="log_initial"),
            "aggregator": A.UPGrad(),
        },
        extras={"positive_losses": True},
        identical="scaled",
        permutation=False,
        missing="refuse",
    ),
    # uniform preference r = 1/m: identical losses lie on the ray, w = r
    Entry("COSMOS", lambda m: {"weighting": W.COSMOS(lambda_=1.0)}, identical="mean"),
    # on the ray w = ŵ = 1/√m each
    Entry(
        "PBI",
        lambda m: {"weighting": W.PBI(theta=5.0)},
        extras={"positive_losses": True},
        identical="scaled",
    ),
    Entry("Sum", lambda m: {"aggregator": A.Sum()}),
    Entry("Mean", lambda m: {"aggregator": A.Mean()}, identical="mean"),
    # fixed unequal weights, bound to task positions: neither symmetric nor equivariant
    Entry(
        "Constant",
        lambda m: {"aggregator": A.Constant([0.5 + 0.5 * t for t in range(m)])},
        identical=None,
        permutation=False,
    ),
    Entry("Random", lambda m: {"aggregator": A.Random(seed=4)}, identical=None, permutation=False),
    # robust aggregators: identical rows are all selected (Krum shares exact ties) / all kept
    Entry("Krum", lambda m: {"aggregator": A.Krum(n_byzantine=0)}, missing="refuse"),
    Entry("TrimmedMean", lambda m: {"aggregator": A.TrimmedMean(trim_number=1)}, missing="refuse"),
    Entry("GradDrop", lambda m: {"aggregator": A.GradDrop(seed=3)}),
    Entry("CRMOGM+UPGrad", lambda m: {"aggregator": A.CRMOGM(A.UPGrad(), alpha=0.5)}),
    # FULLER-style calibration needs a model with modality branches: its task level alone is
    # "PCGrad" at the cut above; both levels are tested in tests/unit/test_fuller.py.
    # ---- issue 13 (a): validation-driven and GRPO-family weightings
    # CoBa reads validation losses: the loops feed the step's losses (no gradient) after each
    # step (extras["validate_every"], feed_validation); warm-up 4 steps, so a 4-step loop that
    # feeds none (tests/unit/test_state_io.py) is not refused; identical losses give equal slopes
    Entry(
        "CoBa",
        lambda m: {"weighting": W.CoBa(m, warmup_steps=4, history=4)},
        extras={"validate_every": 1},
        missing="refuse",
    ),
    Entry(
        "CoBa-code",
        lambda m: {"weighting": W.CoBa(m, warmup_steps=4, history=4, variant="code")},
        extras={"validate_every": 1},
        missing="refuse",
    ),
    # MT-GRPO on supervised losses: the IWU step needs balancer.update(re-evaluated losses)
    Entry(
        "MTGRPO",
        lambda m: {"weighting": W.MTGRPO(m, lam=0.5)},
        extras={"update_after_step": True},
        missing="refuse",
    ),
    # c / running median: identical losses get one weight 1/L
    Entry(
        "MedGRPO",
        lambda m: {"weighting": W.MedGRPO(m, window=3)},
        identical="scaled",
        missing="refuse",
    ),
    # fixed unequal weights bound to task positions (like Constant)
    Entry(
        "VisATB",
        lambda m: {
            "weighting": W.VisATB(
                [0.2 + 0.3 * t for t in range(m)],
                [0.5 - 0.1 * t for t in range(m)],
                [0.9 - 0.2 * t for t in range(m)],
            )
        },
        identical=None,
        permutation=False,
        missing="own",
    ),
    # ---- end of issue 13 (a)
]


def feed_validation(entry: Entry, balancer: Any, losses: Callable[[], Any], k: int) -> None:
    """After step ``k``: feed validation losses (``losses()``, without gradient) to an entry
    that reads them (``extras["validate_every"]``: every that many steps)."""
    every = entry.extras.get("validate_every", 0)
    if every and (k + 1) % every == 0:
        import torch

        with torch.no_grad():
            balancer.observe_validation(losses())


__all__ = ["REGISTRY", "Entry", "feed_validation", "mtlbal"]
