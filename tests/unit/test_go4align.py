"""GO4Align: the weights of a run against the paper's equations (float64; the smooth-alignment
factor in closed form, softmax(−η Σ_τ L(τ)), and K-means by enumerating every partition),
parity with the official code's computation (autumn9999/GO4Align @
5fcbc716b8fa44750fdbe9588b55389c0f34ca66, methods/cluster_methods.py
GO4ALIGN.get_weighted_loss, re-implemented here with a Lloyd K-means as kmeans_pytorch runs
it), the exact 1-D K-means, state and resume, the domain."""

from __future__ import annotations

import itertools

import pytest
import torch

import mtlbal
from mtlbal.functional import go4align_indicators, kmeans_1d
from mtlbal.weighting import GO4Align
from mtlbal.weighting.base import LossContext

from ._methods_helpers import check_resume

F64 = torch.float64


# ---------------------------------------------------------------- references
def brute_force_kmeans(x: list[float], k: int) -> tuple[float, list[float]]:
    """Every assignment of the m values to k non-empty groups (for m > 7: every split of the
    sorted values into k runs, where the optimum of 1-D K-means is known to lie): the least
    within-group sum of squares and each value's group mean."""
    if len(x) > 7:
        return _contiguous_kmeans(x, k)
    best: tuple[float, list[float]] | None = None
    for labels in itertools.product(range(k), repeat=len(x)):
        if len(set(labels)) != k:
            continue
        means = {}
        for g in range(k):
            members = [v for v, lab in zip(x, labels) if lab == g]
            means[g] = sum(members) / len(members)
        sse = sum((v - means[lab]) ** 2 for v, lab in zip(x, labels))
        if best is None or sse < best[0] - 1e-15:
            best = (sse, [means[lab] for lab in labels])
    assert best is not None
    return best


def _contiguous_kmeans(x: list[float], k: int) -> tuple[float, list[float]]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    best: tuple[float, list[float]] | None = None
    for cuts in itertools.combinations(range(1, len(x)), k - 1):
        bounds = [0, *cuts, len(x)]
        out = [0.0] * len(x)
        sse = 0.0
        for a, b in itertools.pairwise(bounds):
            members = [x[i] for i in order[a:b]]
            mean = sum(members) / len(members)
            sse += sum((v - mean) ** 2 for v in members)
            for i in order[a:b]:
                out[i] = mean
        if best is None or sse < best[0] - 1e-15:
            best = (sse, out)
    assert best is not None
    return best


def paper_weights(history: list[list[float]], eta: float, k: int) -> list[float]:
    """Weights at the last step of ``history`` (each a loss vector): β_t = ΣL/L_t, α =
    softmax(−η Σ_τ L(τ)) (the multiplicative update from α₀ = 1/m, in closed form), γ = β⊙α,
    then each task gets its K-means group's mean γ."""
    m = len(history[0])
    cum = [sum(step[t] for step in history) for t in range(m)]
    e = [torch.exp(torch.tensor(-eta * c, dtype=F64)).item() for c in cum]
    alpha = [v / sum(e) for v in e]
    losses = history[-1]
    gamma = [sum(losses) / losses[t] * alpha[t] for t in range(m)]
    return brute_force_kmeans(gamma, k)[1]


@pytest.mark.parametrize(
    ("m", "k"), [(2, 1), (2, 2), (3, 2), (5, 2), (6, 3), (6, 4), (4, 4), (12, 3), (16, 4)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_a_run_matches_the_paper(m: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(10 * m + seed)
    eta = 0.05  # large enough for α to move within a few steps
    go = GO4Align(m, num_groups=k, step_size=eta).double()
    history: list[list[float]] = []
    for _ in range(4):
        losses = torch.rand(m, generator=g, dtype=F64) * 3 + 0.1
        history.append(losses.tolist())
        x = losses.clone().requires_grad_(True)
        out = go.objectives(x, LossContext())
        ref = torch.tensor(paper_weights(history, eta, k), dtype=F64)
        torch.testing.assert_close(out.weights, ref, rtol=1e-12, atol=1e-13)
        (grad,) = torch.autograd.grad(out.objectives.sum(), x)
        torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-13)  # ℓ_t = w_t L_t


def test_scale_is_the_sum() -> None:
    # Σ_t γ_t L_t = Σ_t L_t (K = m); equal losses give w = 1 for every K
    losses = torch.tensor([0.3, 2.0, 1.1, 4.0], dtype=F64)
    go = GO4Align(4, num_groups=4, step_size=0.1).double()
    w = go(losses)
    torch.testing.assert_close((w * losses).sum(), losses.sum())
    for k in (1, 2, 3):
        torch.testing.assert_close(GO4Align(4, num_groups=k)(torch.full((4,), 2.5)), torch.ones(4))


# ---------------------------------------------------------------- the official computation
class OfficialGO4Align:
    """GO4ALIGN.get_weighted_loss of the official code, re-implemented: adv_probs ←
    adv_probs·exp(−η L), normalised; weight = (ΣL/L)·adv_probs; num_groups ≥ 2: Lloyd K-means
    of the weights (kmeans_pytorch: initial centres drawn among the points, assign to the
    nearest, move to the mean, stop when the centres move by less than tol); num_groups = 1:
    every task gets mean(weight). The loss is Σ L·weight."""

    def __init__(self, m: int, num_groups: int, eta: float, seed: int) -> None:
        self.adv_probs = torch.ones(m, dtype=F64) / m
        self.k, self.eta = num_groups, eta
        self.gen = torch.Generator().manual_seed(seed)

    def lloyd(self, x: torch.Tensor) -> torch.Tensor:
        pick = torch.randperm(x.shape[0], generator=self.gen)[: self.k]
        centres = x[pick].clone()
        while True:
            labels = (x[:, None] - centres[None, :]).abs().argmin(1)
            prev = centres.clone()
            for c in range(self.k):
                if (labels == c).any():
                    centres[c] = x[labels == c].mean()
            if float(((centres - prev) ** 2).sum().sqrt()) ** 2 < 1e-4:
                return centres[labels]

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        adjusted = losses.detach()
        scale = adjusted.sum() / adjusted
        self.adv_probs = self.adv_probs * torch.exp(-self.eta * adjusted)
        self.adv_probs = self.adv_probs / self.adv_probs.sum()
        weight = scale * self.adv_probs
        if self.k == 1:
            return torch.ones_like(weight) * weight.mean()
        return self.lloyd(weight)


def _separated_losses(m: int, step: int, gen: torch.Generator) -> torch.Tensor:
    # two well-separated loss levels (hence indicator levels) with a little noise: Lloyd's
    # K-means reaches the global optimum from any start, where the official code and the exact
    # K-means must agree
    levels = torch.tensor([0.2 if t % 2 == 0 else 2.0 for t in range(m)], dtype=F64)
    return levels * (1 + 0.02 * torch.rand(m, generator=gen, dtype=F64)) + 0.01 * step


@pytest.mark.parametrize("m", [2, 3, 5, 8, 16])
@pytest.mark.parametrize("k", [1, 2])
def test_parity_with_the_official_code(m: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m)
    official = OfficialGO4Align(m, k, eta=1e-4, seed=m)
    ours = GO4Align(m, num_groups=k).double()
    for step in range(5):
        losses = _separated_losses(m, step, gen)
        ref = official.weights(losses)
        got = ours.objectives(losses, LossContext()).weights
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(ours.risk_probs, official.adv_probs, rtol=1e-14, atol=1e-15)


def test_lloyd_can_miss_the_optimum_the_exact_kmeans_finds() -> None:
    # the pitfall of the official Lloyd iteration: a poor start ends in a local optimum
    x = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 30.0], dtype=F64)
    opt_sse, opt_w = brute_force_kmeans(x.tolist(), 3)
    labels, centres = kmeans_1d(x, 3)
    torch.testing.assert_close(centres[labels], torch.tensor(opt_w, dtype=F64))
    # Lloyd from the centres (0, 1, 2): converges to {0}, {1}, {2, 10, 11, 30}
    centres0 = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    for _ in range(50):
        lab = (x[:, None] - centres0[None, :]).abs().argmin(1)
        centres0 = torch.stack([x[lab == c].mean() for c in range(3)])
    lloyd_sse = float(((x - centres0[lab]) ** 2).sum())
    assert lloyd_sse > opt_sse + 1.0


# ---------------------------------------------------------------- exact 1-D K-means
@pytest.mark.parametrize("m", [2, 3, 5, 7, 16])
def test_kmeans_1d_is_the_global_optimum(m: int) -> None:
    g = torch.Generator().manual_seed(m)
    for _ in range(3):
        x = torch.randn(m, generator=g, dtype=F64)
        for k in range(1, min(m, 3) + 1):
            labels, centres = kmeans_1d(x, k)
            _, ref = brute_force_kmeans(x.tolist(), k)
            torch.testing.assert_close(centres[labels], torch.tensor(ref, dtype=F64))
            assert torch.all(centres[1:] > centres[:-1])  # numbered by increasing centroid
            assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(k))


def test_kmeans_1d_edges_and_permutation() -> None:
    x = torch.tensor([3.0, -1.0, 2.5, 7.0, 0.0], dtype=F64)
    labels, centres = kmeans_1d(x, 1)
    torch.testing.assert_close(centres, x.mean().view(1))
    labels, centres = kmeans_1d(x, 5)
    torch.testing.assert_close(centres[labels], x)
    perm = torch.tensor([4, 2, 0, 3, 1])
    for k in (2, 3):
        w = kmeans_1d(x, k)[1][kmeans_1d(x, k)[0]]
        wp = kmeans_1d(x[perm], k)[1][kmeans_1d(x[perm], k)[0]]
        torch.testing.assert_close(wp, w[perm])
    with pytest.raises(ValueError, match="between 1 and"):
        kmeans_1d(x, 6)


# ---------------------------------------------------------------- state, domain
def test_group_state_is_saved_and_restored() -> None:
    go = GO4Align(4, num_groups=2, step_size=0.1)
    go.objectives(torch.tensor([0.5, 2.0, 0.6, 3.0]), LossContext())
    state = go.state_dict()
    assert set(state) >= {"risk_probs", "groups"}
    assert state["groups"].tolist() == [1, 0, 1, 0]  # small losses: large β, the upper group
    fresh = GO4Align(4, num_groups=2, step_size=0.1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.risk_probs, go.risk_probs) and torch.equal(fresh.groups, go.groups)
    nxt = torch.tensor([0.4, 1.0, 0.9, 2.0])
    torch.testing.assert_close(fresh(nxt), go(nxt), rtol=0, atol=0)
    fresh.reset()
    assert fresh.groups is None and torch.equal(fresh.risk_probs, torch.full((4,), 0.25))


def test_resume() -> None:
    check_resume(lambda: {"weighting": GO4Align(3, num_groups=2, step_size=0.05)})


def test_current_weights_leave_the_state_alone() -> None:
    go = GO4Align(3, num_groups=2, step_size=0.1)
    before = go.risk_probs.clone()
    go(torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(go.risk_probs, before) and go.groups is None
    alpha = go4align_indicators(torch.tensor([1.0, 2.0, 3.0]), before, 0.1)[1]
    go.objectives(torch.tensor([1.0, 2.0, 3.0]), LossContext())
    torch.testing.assert_close(go.risk_probs, alpha)


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_non_positive_loss_is_refused_naming_the_task(bad: float) -> None:
    go = GO4Align(2, num_groups=2, step_size=0.1)
    lin = torch.nn.Linear(3, 2)
    y = lin(torch.randn(4, 3))
    bal = mtlbal.Balancer(lin, weighting=go)
    alpha = go.risk_probs
    with pytest.raises(ValueError, match=r"L_t > 0.*task\(s\) 'depth'"):
        bal.backward({"seg": y[:, 0].pow(2).mean() + 1.0, "depth": 0.0 * y[:, 1].mean() + bad})
    assert all(p.grad is None for p in lin.parameters())
    assert go.risk_probs is alpha and go.groups is None  # the refused step changed nothing


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match="num_groups must be between 1 and num_tasks"):
        GO4Align(3, num_groups=4)
    with pytest.raises(ValueError, match="num_groups"):
        GO4Align(3, num_groups=0)
    with pytest.raises(ValueError, match="step_size"):
        GO4Align(3, step_size=-1.0)
    with pytest.raises(ValueError, match="3 tasks"):
        GO4Align(3)(torch.ones(2))
