"""The one registry of balancing strategies, shared by the test battery and the benchmark.

Every strategy (or configuration) is declared once, as an :class:`Entry`: its name, how to build
the ``mtlbal.Balancer`` keyword arguments for ``m`` tasks (``make``), where the battery exercises
it (``at``), the behaviour the battery checks (``identical``, ``permutation``, ``missing``) and,
in ``bench``, the rows it gives the benchmark (:class:`Bench`: the row's name, its Balancer
arguments as a Python expression, the place of the per-task gradients, whether ``make bench``
runs it).

Why here and not in ``tests/``: the benchmark is a program users run (``python -m benchmarks``
from the repository root) and must not depend on the test tree; the tests always run from the
repository root too (``python -m pytest``), where ``benchmarks`` is importable. So the registry
lives with the benchmark and ``tests/registry.py`` re-exports the battery's part of it
(``from registry import REGISTRY, Entry`` keeps working). The ``Entry(...)`` format is the one
``tests/registry.py`` had, with two new keyword fields at the end (``bench``, ``battery``): an
entry written for the old file is pasted here unchanged.

Two configurations of one method may differ on purpose: the battery's ``make`` picks the
configuration its exact checks need (``eps=0`` for exact homogeneity, small IGB v2 buffers, fixed
seeds); a :class:`Bench` row is the configuration a user gets (the defaults, or the reference's
hyper-parameters), written as the code a user would write. The docs table shows that code, and
``tests/unit/test_bench_registry.py`` builds every row.

Battery declarations (checked by tests/unit/test_properties.py, decided from each method's paper):

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

Benchmark rows (:class:`Bench`): ``code`` is evaluated with ``weighting``, ``aggregation``,
``transforms`` (the mtlbal modules), ``m``, ``seed`` and ``task_types`` (``"regression"`` or
``"classification"`` per task, from the suite) in scope. ``reference_heads``: the method's
reference code back-propagates the *weighted* loss ``Σ_t w_t L_t`` (nash-mtl's Nash-MTL and MGDA),
so its task heads receive ``w_t ∇L_t``; mtlbal gives heads their raw ``∇L_t``. With the
benchmark's ``--heads reference`` the suites scale each head's gradient by the step's
``grad_weights`` for those rows (see :func:`benchmarks.common.weight_heads`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import mtlbal
from mtlbal import aggregation as A
from mtlbal import transforms as T
from mtlbal import weighting as W

__all__ = [
    "BENCH",
    "CLOSURE_ENTRIES",
    "REGISTRY",
    "Bench",
    "Entry",
    "bench_rows",
    "build_alone",
    "build_bench",
    "mtlbal",
]


@dataclass(frozen=True)
class Bench:
    """One benchmark row built from a registry entry.

    Args:
        name: the row's name in the benchmark's tables.
        code: the Balancer keyword arguments as Python (``"aggregator=aggregation.MGDA()"``;
            ``""`` for plain equal weights), shown verbatim in the report.
        at: ``"params"`` (per-task gradients of the shared parameters) or ``"cut"`` (of the
            shared representation: the ``-UB`` rows).
        note: a few words for the report (what the configuration is, where it comes from).
        quick: whether ``make bench`` (the quick suite) runs it.
        reference_heads: the reference weights the task heads' gradients (see the module
            docstring); used with ``--heads reference``.
        closure: the row's step needs a closure that re-runs the forward on the step's batch.
    """

    name: str
    code: str
    at: Literal["params", "cut"] = "params"
    note: str = ""
    quick: bool = False
    reference_heads: bool = False
    # the step needs ``backward(losses, closure=...)`` (F-MTL): the suites re-run the forward
    closure: bool = False


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
    # the benchmark's rows of this strategy (none: the benchmark does not run it)
    bench: tuple[Bench, ...] = ()
    # False: a benchmark-only configuration, which the battery leaves out
    battery: bool = True


def _bench_only(b: Bench) -> Entry:
    """An entry for a benchmark configuration the battery does not need (its configuration is
    covered by the battery's entries of the same classes)."""
    return Entry(b.name, lambda m: build_bench(b, m, 0), bench=(b,), battery=False)


P = ("params",)

REGISTRY: list[Entry] = [
    Entry(
        "Equal",
        lambda m: {},
        bench=(Bench("Equal", "", note="the sum of the losses: no balancing", quick=True),),
    ),
    Entry(
        "UncertaintyWeighting",
        lambda m: {"weighting": W.UncertaintyWeighting(m)},
        identical="scaled",
        bench=(
            Bench(
                "UW",
                "weighting=weighting.UncertaintyWeighting(m, task_types=task_types)",
                note="Kendall et al.: ½·e^{−s}·L + ½·s for regression, e^{−s}·L + ½·s for "
                "classification tasks",
                quick=True,
            ),
        ),
    ),
    Entry(
        "UncertaintyWeighting-simple",
        lambda m: {"weighting": W.UncertaintyWeighting(m, form="simple")},
        identical="scaled",
    ),
    Entry(
        "GradNorm",
        lambda m: {"weighting": W.GradNorm(m, alpha=1.5)},
        missing="own",
        bench=(Bench("GradNorm", "weighting=weighting.GradNorm(m, alpha=1.5)"),),
    ),
    Entry(
        "DWA",
        lambda m: {"weighting": W.DWA(m)},
        epoch_every=2,
        bench=(Bench("DWA", "weighting=weighting.DWA(m)", note="epoch-level loss ratios"),),
    ),
    Entry(
        "RLW",
        lambda m: {"weighting": W.RLW(m, seed=5)},
        identical=None,
        permutation=False,
        bench=(Bench("RLW", "weighting=weighting.RLW(m, seed=seed)", note="random loss weights"),),
    ),
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
        bench=(Bench("FAMO", "weighting=weighting.FAMO(m)", quick=True),),
    ),
    Entry(
        "MGDA",
        lambda m: {"aggregator": A.MGDA()},
        bench=(
            Bench("MGDA", "aggregator=aggregation.MGDA()", reference_heads=True, quick=True),
            Bench(
                "MGDA-UB",
                "aggregator=aggregation.MGDA()",
                at="cut",
                note="at the shared representation",
                reference_heads=True,
                quick=True,
            ),
        ),
    ),
    Entry("MGDA-l2", lambda m: {"aggregator": A.MGDA(normalization="l2")}, identical="scaled"),
    Entry(
        "PCGrad",
        lambda m: {"aggregator": A.PCGrad(seed=3)},
        permutation=False,
        bench=(Bench("PCGrad", "aggregator=aggregation.PCGrad(seed=seed)", quick=True),),
    ),
    Entry(
        "AlignedMTL",
        lambda m: {"aggregator": A.AlignedMTL()},
        bench=(
            Bench("AlignedMTL", "aggregator=aggregation.AlignedMTL()"),
            Bench(
                "AlignedMTL-UB",
                "aggregator=aggregation.AlignedMTL()",
                at="cut",
                note="at the shared representation",
                quick=True,
            ),
        ),
    ),
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
        bench=(
            Bench(
                "IGBv1",
                "weighting=weighting.IGB(m, seed=seed)",
                note="improvable-gap balancing, heuristic",
            ),
        ),
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
        bench=(
            Bench(
                "IGBv2",
                "weighting=weighting.IGB(m, version=2, seed=seed)",
                note="improvable-gap balancing, SAC agent",
            ),
        ),
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
        bench=(
            Bench(
                "UW+PCGrad",
                "weighting=weighting.UncertaintyWeighting(m, task_types=task_types), "
                "aggregator=aggregation.PCGrad(seed=seed)",
                note="learned loss scales, then PCGrad's projections",
            ),
        ),
    ),
    Entry(
        "CAGrad",
        lambda m: {"aggregator": A.CAGrad()},
        identical="scaled",
        bench=(Bench("CAGrad", "aggregator=aggregation.CAGrad()", quick=True),),
    ),
    Entry(
        "DualProj",
        lambda m: {"aggregator": A.DualProj()},
        bench=(Bench("DualProj", "aggregator=aggregation.DualProj()"),),
    ),
    Entry(
        "GradVac",
        lambda m: {"aggregator": A.GradVac(seed=2)},
        permutation=False,
        bench=(Bench("GradVac", "aggregator=aggregation.GradVac(seed=seed)"),),
    ),
    Entry(
        "IMTLG",
        lambda m: {"aggregator": A.IMTLG()},
        bench=(Bench("IMTLG", "aggregator=aggregation.IMTLG()"),),
    ),
    Entry(
        "NashMTL",
        lambda m: {"aggregator": A.NashMTL()},
        identical="scaled",
        bench=(
            Bench(
                "NashMTL",
                'aggregator=aggregation.NashMTL(on_failure="warn")',
                note="keeps its previous weights when the solver fails, as the reference does",
                reference_heads=True,
                quick=True,
            ),
        ),
    ),
    Entry(
        "UPGrad",
        lambda m: {"aggregator": A.UPGrad()},
        bench=(Bench("UPGrad", "aggregator=aggregation.UPGrad()", quick=True),),
    ),
    # PCD: task 0 is the primary, the others are constraints; identical tasks give g_0 (weights
    # (1, 0, …): not alike, nothing of the sum), and permuting the tasks changes the primary
    # (eps=0: exactly homogeneous; the default eps=1e-8 is exercised in test_properties.AGGS)
    Entry(
        "PCD",
        lambda m: {"aggregator": A.PCD(tau=0.2, eps=0.0)},
        identical=None,
        permutation=False,
        missing="refuse",
        bench=(Bench("PCD", "aggregator=aggregation.PCD()", note="the first task is the primary"),),
    ),
    # MoDo / SDMGrad on one batch (samples=1: the biased one-batch variant; the independent
    # samples layout is tested in test_modo.py / test_sdmgrad.py). MoDo has no degree of
    # homogeneity (its step size acts on λ in absolute units): test_properties.NO_DEGREE
    Entry(
        "MoDo",
        lambda m: {"aggregator": A.MoDo()},
        missing="refuse",
        bench=(
            Bench("MoDo", "aggregator=aggregation.MoDo()", note="one batch: the biased variant"),
        ),
    ),
    # lr=1, not the default 10: a step of 10 on the normalised A (eigenvalues up to ~m) makes the
    # projected inner SGD bounce between faces of the simplex and amplify round-off (the DDP
    # Gramian's last bits) to ~1e-9 in 20 steps; the battery's 1e-10 comparisons need a
    # well-conditioned configuration
    Entry(
        "SDMGrad",
        lambda m: {"aggregator": A.SDMGrad(lr=1.0, eps=0.0)},
        missing="refuse",
        bench=(
            Bench(
                "SDMGrad", "aggregator=aggregation.SDMGrad()", note="one batch: the biased variant"
            ),
        ),
    ),
    Entry(
        "FairGrad",
        lambda m: {"aggregator": A.FairGrad(alpha=2.0)},
        identical="scaled",
        bench=(
            Bench(
                "FairGrad",
                'aggregator=aggregation.FairGrad(alpha=2.0, on_failure="warn")',
                note="α = 2 as the official CelebA/QM9 scripts",
            ),
        ),
    ),
    # Jacobian methods (MoCo, ExcessMTL, DB-MTL, ConFIG, M-ConFIG) run at the parameters: a cut
    # point's Jacobian is not gathered under DDP, and a per-entry state (momenta, squared sums)
    # at a cut would be indexed by sample positions that hold different samples at every step.
    # Identical tasks give a positive multiple of the gradient (MoCo's and DB-MTL's buffers
    # start at 0: "parallel") or an Adam-normalised step (M-ConFIG: nothing holds)
    Entry(
        "MoCo",
        lambda m: {"aggregator": A.MoCo()},
        at=P,
        identical="parallel",
        missing="refuse",
        bench=(Bench("MoCo", "aggregator=aggregation.MoCo()"),),
    ),
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
        bench=(Bench("ExcessMTL", "aggregator=aggregation.ExcessMTL()"),),
    ),
    Entry(
        "DBMTL",
        lambda m: {"aggregator": A.DBMTL(eps=0.0)},
        at=P,
        identical="parallel",
        missing="refuse",
        bench=(
            Bench(
                "DB-MTL",
                "weighting=weighting.ScaleInvariant(m), aggregator=aggregation.DBMTL()",
                note="log losses, then the max-norm EMA of the paper",
            ),
        ),
    ),
    Entry(
        "ConFIG",
        lambda m: {"aggregator": A.ConFIG()},
        at=P,
        bench=(Bench("ConFIG", "aggregator=aggregation.ConFIG()"),),
    ),
    Entry(
        "MConFIG",
        lambda m: {"aggregator": A.MConFIG(eps=0.0)},
        at=P,
        identical=None,
        missing="refuse",
        bench=(Bench("MConFIG", "aggregator=aggregation.MConFIG()"),),
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
        bench=(
            Bench(
                "GLS", "weighting=weighting.GeometricMean(m)", note="geometric mean of the losses"
            ),
        ),
    ),
    Entry(
        "ScaleInvariant",
        lambda m: {"weighting": W.ScaleInvariant(m)},
        extras={"positive_losses": True},
        identical="scaled",
        bench=(
            Bench(
                "SI",
                "weighting=weighting.ScaleInvariant(m)",
                note="Σ log L: the scale-invariant baseline",
                quick=True,
            ),
        ),
    ),
    Entry(
        "UWSO",
        lambda m: {"weighting": W.UWSO(m, temperature=0.5)},
        bench=(
            Bench(
                "UWSO", "weighting=weighting.UWSO(m)", note="softmax of the inverse losses, T = 1"
            ),
        ),
    ),
    Entry(
        "IMTLL",
        lambda m: {"weighting": W.IMTLL(m)},
        identical="scaled",
        bench=(Bench("IMTLL", "weighting=weighting.IMTLL(m)", note="learnable loss scales"),),
    ),
    Entry(
        "IMTLL+IMTLG",
        lambda m: {"weighting": W.IMTLL(m), "aggregator": A.IMTLG()},
        identical="scaled",
        bench=(
            Bench(
                "IMTL",
                "weighting=weighting.IMTLL(m), aggregator=aggregation.IMTLG()",
                note="the paper's hybrid: IMTL-L's loss scales and IMTL-G's gradient weights",
            ),
        ),
    ),
    # warm-up (Σ log L) during epoch 0, whose mean loss becomes the reference; STCH afterwards
    Entry(
        "STCH",
        lambda m: {"weighting": W.STCH(m, warmup_epoch=0)},
        epoch_every=2,
        extras={"positive_losses": True},
        identical="scaled",
        missing="refuse",
        bench=(Bench("STCH", "weighting=weighting.STCH(m)", note="smooth Tchebycheff of log L"),),
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
        bench=(Bench("GO4Align", "weighting=weighting.GO4Align(m, num_groups=2)"),),
    ),
    Entry("GO4Align-K1", lambda m: {"weighting": W.GO4Align(m, num_groups=1)}, missing="refuse"),
    Entry(
        "LDCMTL",
        lambda m: {"weighting": W.LDCMTL(m)},
        extras={"positive_losses": True},
        permutation=False,
        missing="refuse",
        bench=(Bench("LDC-MTL", "weighting=weighting.LDCMTL(m)"),),
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
    Entry(
        "COSMOS",
        lambda m: {"weighting": W.COSMOS(lambda_=1.0)},
        identical="mean",
        bench=(
            Bench(
                "COSMOS",
                "weighting=weighting.COSMOS(lambda_=1.0, num_tasks=m)",
                note="uniform preference",
            ),
        ),
    ),
    # on the ray w = ŵ = 1/√m each
    Entry(
        "PBI",
        lambda m: {"weighting": W.PBI(theta=5.0)},
        extras={"positive_losses": True},
        identical="scaled",
        bench=(Bench("PBI", "weighting=weighting.PBI(num_tasks=m)", note="uniform preference"),),
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
    Entry(
        "Random",
        lambda m: {"aggregator": A.Random(seed=4)},
        identical=None,
        permutation=False,
        bench=(
            Bench(
                "Random",
                "aggregator=aggregation.Random(seed=seed)",
                note="random weights on the task gradients",
            ),
        ),
    ),
    # robust aggregators: identical rows are all selected (Krum shares exact ties) / all kept
    Entry("Krum", lambda m: {"aggregator": A.Krum(n_byzantine=0)}, missing="refuse"),
    Entry("TrimmedMean", lambda m: {"aggregator": A.TrimmedMean(trim_number=1)}, missing="refuse"),
    Entry(
        "GradDrop",
        lambda m: {"aggregator": A.GradDrop(seed=3)},
        bench=(Bench("GradDrop", "aggregator=aggregation.GradDrop(seed=seed)", at="cut"),),
    ),
    Entry("CRMOGM+UPGrad", lambda m: {"aggregator": A.CRMOGM(A.UPGrad(), alpha=0.5)}),
    # benchmark-only configurations (their classes are in the battery above)
    _bench_only(
        Bench(
            "UW+UPGrad",
            "weighting=weighting.UncertaintyWeighting(m, task_types=task_types), "
            "aggregator=aggregation.UPGrad()",
            note="learned loss scales, then UPGrad's projections",
        )
    ),
    _bench_only(
        Bench(
            "CRMOGM-MGDA",
            "aggregator=aggregation.CRMOGM(aggregation.MGDA())",
            note="an EMA of MGDA's weights",
        )
    ),
    # FULLER-style calibration needs a model with modality branches: its task level alone is
    # "PCGrad" at the cut above; both levels are tested in tests/unit/test_fuller.py.
]

# ---- issue 13 (b): Rep-MTL, F-MTL, ARL
# Rep-MTL regularises the saliencies at the cut point (at="cut" only). Its CSA term contrasts
# the samples of one batch: under DDP the negatives are a rank's own samples, so only the TSR
# configuration equals one process on the concatenated batch ("ddp": False opts the other out of
# tests/distributed/test_ddp_registry.py). With identical tasks TSR is constant (P = 1/m), CSA
# is not; the regulariser is scale-free, so the update has no degree ("scaling": False).
# Gradient accumulation is refused ("accumulate": False; tested in test_rep_mtl.py).
REGISTRY += [
    Entry(
        "RepMTL-TSR",
        lambda m: {"transforms": T.RepMTL(lambda_csa=0.0)},
        at=("cut",),
        extras={"accumulate": False},
    ),
    Entry(
        "RepMTL+UPGrad",
        lambda m: {"aggregator": A.UPGrad(), "transforms": T.RepMTL()},
        at=("cut",),
        identical=None,
        extras={"ddp": False, "accumulate": False, "scaling": False},
    ),
    _bench_only(
        Bench(
            "Rep-MTL",
            "weighting=weighting.ScaleInvariant(m), transforms=[transforms.RepMTL()]",
            at="cut",
            note="log losses and the saliency regulariser at the representation, as in its paper",
        )
    ),
]
# ---- issue 13 (a): validation-driven and GRPO-family weightings
# CoBa reads validation losses: the loops feed the step's losses (no gradient) after each
# step (extras["validate_every"], tests/registry.py's feed_validation); warm-up 4 steps, so a
# 4-step loop that feeds none (tests/unit/test_state_io.py) is not refused; identical losses give
# equal slopes. The benchmark holds out a tenth of the training set as CoBa's validation split and
# feeds one validation batch per step (benchmarks/common.py). VisATB needs contributions measured
# by pilot runs on validation sets: not benchmarked.
REGISTRY += [
    Entry(
        "CoBa",
        lambda m: {"weighting": W.CoBa(m, warmup_steps=4, history=4)},
        extras={"validate_every": 1},
        missing="refuse",
        bench=(
            Bench(
                "CoBa",
                "weighting=weighting.CoBa(m)",
                note="validation-slope weights; a tenth of train held out for them",
            ),
        ),
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
        bench=(
            Bench(
                "MTGRPO",
                "weighting=weighting.MTGRPO(m)",
                note="IWU task weights from −L and its decrease per step",
            ),
        ),
    ),
    # c / running median: identical losses get one weight 1/L
    Entry(
        "MedGRPO",
        lambda m: {"weighting": W.MedGRPO(m, window=3)},
        identical="scaled",
        missing="refuse",
        bench=(
            Bench(
                "MedGRPO",
                "weighting=weighting.MedGRPO(m)",
                note="c / running median of each task's loss",
            ),
        ),
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
]
# F-MTL needs a closure at every step (backward(losses, closure=...)), which the generic
# battery does not pass: these entries run in tests/unit/test_fmtl.py (resume, refusal, the
# equations) and tests/distributed/test_ddp_fmtl_arl.py (DDP). ARL needs a model with modality
# branches and auxiliary unimodal losses: tests/unit/test_arl.py and the same DDP test.
CLOSURE_ENTRIES: list[Entry] = [
    Entry(
        "FMTL",
        lambda m: {"aggregator": A.FMTL(rho=0.05)},
        at=P,
        bench=(
            Bench(
                "F-MTL",
                "aggregator=aggregation.FMTL(rho=0.05)",
                note="per-task SAM, the sum of the loss and flatness directions",
                closure=True,
            ),
        ),
    ),
    Entry(
        "FMTL+UPGrad",
        lambda m: {"aggregator": A.FMTL(A.UPGrad(), rho=0.05)},
        at=P,
        bench=(
            Bench(
                "F-MTL-UPGrad",
                "aggregator=aggregation.FMTL(aggregation.UPGrad(), rho=0.05)",
                note="UPGrad on each direction set",
                closure=True,
            ),
        ),
    ),
    Entry(
        "FMTL+PCGrad-adaptive",
        lambda m: {"aggregator": A.FMTL(A.PCGrad(seed=1), rho=0.5, adaptive=True)},
        at=P,
        permutation=False,
    ),
]


TaskType = Literal["regression", "classification"]


def build_bench(
    b: Bench, m: int, seed: int, task_types: Sequence[TaskType] | None = None
) -> dict[str, Any]:
    """The Balancer keyword arguments of benchmark row ``b`` for ``m`` tasks (``weighting``,
    ``aggregator``, ``transforms``; the place of the gradients is ``b.at``).

    ``task_types`` (default: all ``"regression"``) is what the suite knows of its tasks; only the
    rows that use it (UW's classification form) depend on it.
    """
    if task_types is None:
        task_types = ["regression"] * m
    if len(task_types) != m:
        raise ValueError(f"{b.name}: task_types has {len(task_types)} entries for {m} tasks")
    scope = {
        "weighting": mtlbal.weighting,
        "aggregation": mtlbal.aggregation,
        "transforms": mtlbal.transforms,
        "m": m,
        "seed": seed,
        "task_types": list(task_types),
    }
    kwargs = eval(f"dict({b.code})", {"__builtins__": {"dict": dict}}, scope)
    unknown = set(kwargs) - {"weighting", "aggregator", "transforms"}
    if unknown:
        raise ValueError(f"{b.name}: unknown Balancer arguments {sorted(unknown)}")
    return dict(kwargs)


def bench_rows(registry: Sequence[Entry] | None = None) -> dict[str, Bench]:
    """Every benchmark row by name, in registry order (a repeated name raises)."""
    out: dict[str, Bench] = {}
    for e in [*REGISTRY, *CLOSURE_ENTRIES] if registry is None else registry:
        for b in e.bench:
            if b.name in out:
                raise ValueError(f"benchmark row {b.name!r} is declared twice")
            out[b.name] = b
    return out


BENCH: dict[str, Bench] = bench_rows()


def _makers(m: int) -> list[Callable[[], dict[str, Any]]]:
    # the benchmark's rows first (a user's configuration), then the battery's entries
    out: list[Callable[[], dict[str, Any]]] = [
        functools.partial(build_bench, b, m, 0) for b in BENCH.values() if b.at == "params"
    ]
    out += [functools.partial(e.make, m) for e in REGISTRY if e.battery]
    return out


def build_alone(cls: type, m: int) -> Any | None:
    """An instance of strategy class ``cls`` for ``m`` tasks as the registry configures it: from
    the first row (benchmark rows first, then battery entries) whose Balancer arguments are one
    instance of exactly ``cls`` and nothing else; ``None`` when no row builds ``cls`` alone.

    The cost suite measures every class this way, so a class with a required argument (COSMOS's
    λ, Constant's weights) is measured in the configuration declared here.
    """
    found = _alone(m).get(cls)
    if found is None:
        return None
    key, make = found
    return make()[key]


@functools.lru_cache(maxsize=8)
def _alone(m: int) -> dict[type, tuple[str, Callable[[], dict[str, Any]]]]:
    # every row built once: the first row that builds each class alone
    out: dict[type, tuple[str, Callable[[], dict[str, Any]]]] = {}
    for make in _makers(m):
        kw = make()
        if len(kw) == 1:
            key, obj = next(iter(kw.items()))
            out.setdefault(type(obj), (key, make))
    return out
