"""The toy suite: the numerical Pareto front on a problem solved by hand, the loss-space verdict,
the batched runner against the Balancer, the reference settings, a tiny run with its plot."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from benchmarks.suites import toy


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _bowls(x: torch.Tensor) -> torch.Tensor:
    # L1 = x1² + x2², L2 = (x1 − 1)² + x2²: the Pareto set is x2 = 0, x1 ∈ [0, 1], so the front
    # is (t², (1 − t)²), t ∈ [0, 1], i.e. √L1 + √L2 = 1 from (0, 1) to (1, 0)
    x1, x2 = x[..., 0], x[..., 1]
    return torch.stack([x1**2 + x2**2, (x1 - 1) ** 2 + x2**2], -1)


def test_nondominated_by_hand() -> None:
    pts = np.array([[1.0, 5.0], [2.0, 3.0], [2.0, 4.0], [3.0, 3.0], [4.0, 1.0], [0.5, 6.0]])
    assert toy.nondominated(pts).tolist() == [[0.5, 6.0], [1.0, 5.0], [2.0, 3.0], [4.0, 1.0]]


def test_pareto_front_of_two_bowls() -> None:
    front = toy.pareto_front(_bowls, (-2.0, -2.0), (2.0, 2.0), n=101, refine=2, n_fine=401)
    assert len(front) > 50
    # every front point lies on √L1 + √L2 = 1 (up to the fine grid's resolution in x2)
    assert np.abs(np.sqrt(front[:, 0]) + np.sqrt(front[:, 1]) - 1).max() < 1e-3
    # it spans the whole front: from (0, 1) to (1, 0)
    assert front[0] == pytest.approx([0.0, 1.0], abs=1e-3)
    assert front[-1] == pytest.approx([1.0, 0.0], abs=1e-3)
    # distance and position: the balanced point (¼, ¼) has the normal (1, 1)/√2, so a point δ
    # along it is δ away; by symmetry it sits half-way along the front
    for delta in (0.0, 0.05, 0.2):
        p = [0.25 + delta / math.sqrt(2), 0.25 + delta / math.sqrt(2)]
        assert toy.front_distance(p, front) == pytest.approx(delta, abs=2e-3)
        assert toy.front_position(p, front) == pytest.approx(0.5, abs=5e-3)
    # the ends: the point best for L1 is at 0, the one best for L2 at 1
    assert toy.front_position([0.0, 1.2], front) == pytest.approx(0.0, abs=1e-3)
    assert toy.front_position([1.2, 0.0], front) == pytest.approx(1.0, abs=1e-3)
    assert toy.where_on_front(0.05) == "L₁ end" and toy.where_on_front(0.5) == "balanced"


def test_toy_front_is_the_known_pareto_set() -> None:
    # CAGrad's toy: the Pareto set is close to x2 = −8.3552, x1 ∈ [−7, 7]; its image lies on
    # the computed front (near the ends the true set bends slightly off that line, so the
    # computed front is a little better there: within 0.02)
    front = toy.toy_front(n=201, n_fine=401)
    x1 = torch.linspace(-7, 7, 57, dtype=torch.float64)
    image = toy.toy_losses(torch.stack([x1, torch.full_like(x1, -8.3552)], -1)).numpy()
    assert max(toy.front_distance(p, front) for p in image[5:-5]) < 2e-3
    assert max(toy.front_distance(p, front) for p in image) < 0.02
    # and no point of that curve dominates a point of the front (beyond the grid resolution)
    for f in front:
        assert not np.any(np.all(image < f - 2e-3, axis=1))
    assert 100 < len(front) < 20_000  # thinned


def test_judge_flags_position_and_motion() -> None:
    front = toy.toy_front(n=201, n_fine=401)
    still = {"path": [[0.0, 0.0]] * 10 + [[6.9, -8.3552]] * 30}
    v = toy.judge(still, front)
    assert v["on_front"] and not v["moving"]
    # x1 = 7 is task 1's minimum: the end best for L1
    assert v["where"] == "L₁ end" and v["front_pos"] < 0.1
    # moving along the front (x1 from −1 to 0.95): L2 changes by ≈ 0.08 per recorded point
    moving = {"path": [[-1.0 + 0.05 * k, -8.3552] for k in range(40)]}
    m = toy.judge(moving, front)
    assert m["moving"] and m["where"] == "balanced"
    off = toy.judge({"path": [[0.0, 0.0]] * 5}, front)
    assert not off["on_front"] and off["where"] == "off the front"


@pytest.mark.parametrize("strategy", ["Equal", "MGDA", "NashMTL", "FAMO", "PCGrad"])
def test_batched_runner_matches_the_balancer(strategy: str) -> None:
    inits = [(0.0, 0.0), (9.0, -1.0)]
    batched = toy.run_batched([strategy], inits, steps=25, lr=1e-2, seed=3, record_every=5)
    for init, b in zip(inits, batched):
        one = toy.trajectory(strategy, init, steps=25, lr=1e-2, seed=3, record_every=5)
        assert np.abs(np.asarray(one["path"]) - np.asarray(b["path"])).max() < 1e-12
        assert one["solver_failures"] == b["solver_failures"]


def test_reference_settings() -> None:
    famo = toy._spec("FAMO", 0, toy.SCALE).weighting
    assert famo is not None and famo.hparams()["weight_decay"] == 0.0  # the toy's γ = 0
    nash = toy._spec("NashMTL", 0, toy.SCALE).aggregator
    assert nash is not None and nash.max_norm == 1.0  # the reference clips to norm 1
    assert toy.fast_path_supported(toy._spec("MGDA", 0, toy.SCALE))
    assert not toy.fast_path_supported(toy._spec("UW", 0, toy.SCALE))  # learnable weights


def test_toy_tiny_run_and_plot(tmp_path: pathlib.Path) -> None:
    res = toy.run(
        strategies=["Equal", "NashMTL", "UW"],
        seeds=[0],
        quick=True,
        tiny=True,
        out_dir=tmp_path,
        show_progress=False,
    )
    assert len(res["rows"]) == 3 * len(toy.INITS)
    for r in res["rows"]:
        assert {"L1", "L2", "front_dist", "on_front", "where", "moving", "solver_failures"} <= set(
            r
        )
    assert (tmp_path / "toy_trajectories.png").stat().st_size > 1000
    assert "outside their domain" not in res["markdown"]
    json.dumps(res)
