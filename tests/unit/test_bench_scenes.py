"""The Scenes suite (NYUv2-like dense prediction): its metrics against hand-computed values,
the renderer's geometry (analytic hits, normals consistent with the depth map), and a tiny
end-to-end run (seconds) through the shared parameters and the cut point."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from benchmarks.suites import scenes


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- metrics, by hand


def test_seg_metrics_by_hand() -> None:
    pred = torch.tensor([[0, 0, 1], [1, 2, 0]])
    target = torch.tensor([[0, 1, 1], [1, 2, 2]])
    # class 0: TP 1, FP 2 (pixels 1, 5), FN 0 → 1/3; class 1: TP 2, FN 1 → 2/3;
    # class 2: TP 1, FN 1 → 1/2; class 3 occurs nowhere and is left out
    miou, pix = scenes.seg_metrics(pred, target, 4)
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3, abs=1e-12)
    assert pix == pytest.approx(4 / 6, abs=1e-12)
    assert scenes.seg_metrics(target, target, 4) == (1.0, 1.0)
    with pytest.raises(ValueError, match="segmentation"):
        scenes.seg_metrics(pred, target[:1], 4)


def test_depth_metrics_by_hand() -> None:
    ab, rel = scenes.depth_metrics(torch.tensor([2.0, 4.0]), torch.tensor([1.0, 5.0]))
    assert ab == pytest.approx(1.0, abs=1e-12)
    assert rel == pytest.approx((1 / 1 + 1 / 5) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="non-positive"):
        scenes.depth_metrics(torch.tensor([1.0]), torch.tensor([0.0]))


def test_normal_metrics_by_hand() -> None:
    a = math.radians(20.0)
    # angles 0°, 45° (an unnormalised prediction), 90°, 20° against the target (0, 0, 1)
    pred = torch.tensor(
        [[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [math.sin(a), 0.0, math.cos(a)]],
        dtype=torch.float64,
    ).T.reshape(1, 3, 2, 2)
    target = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    target = target.expand(1, 3, 2, 2)
    mean, median, w11, w22, w30 = scenes.normal_metrics(pred, target)
    assert mean == pytest.approx((0 + 45 + 90 + 20) / 4, abs=1e-9)
    assert median == pytest.approx((20 + 45) / 2, abs=1e-9)
    assert (w11, w22, w30) == pytest.approx((25.0, 50.0, 50.0), abs=1e-9)
    with pytest.raises(ValueError, match="normals"):
        scenes.normal_metrics(pred[:, :2], target[:, :2])


# ---------------------------------------------------------------- the renderer


def test_primitives_hit_where_geometry_says() -> None:
    size = 9  # odd: the centre pixel's ray is (0, 0, 1)
    d, f, c = scenes.camera_rays(size)
    assert f == pytest.approx(0.9 * size) and c == 4.0
    wall = scenes._plane(d, np.array([0.0, 0.0, -1.0]), -6.0)  # z = 6
    assert np.allclose(wall, 6.0)  # the ray parameter is the depth z
    floor = scenes._plane(d, np.array([0.0, 1.0, 0.0]), 1.5)  # y = 1.5
    rows = np.arange(size)
    below = rows > c
    assert np.allclose(floor[below, 0], 1.5 * f / (rows[below] - c))
    assert np.all(np.isinf(floor[rows <= c]))  # above the horizon: no hit
    t, n = scenes._sphere(d, np.array([0.0, 0.0, 5.0]), 1.0)
    assert t[4, 4] == pytest.approx(4.0) and np.allclose(n[4, 4], [0.0, 0.0, -1.0])
    assert np.isinf(t[0, 0])  # a corner ray passes far from the sphere
    t, n = scenes._box(d, np.array([0.0, 0.0, 5.0]), np.array([1.0, 1.0, 1.0]), np.eye(3))
    assert t[4, 4] == pytest.approx(4.0) and np.allclose(n[4, 4], [0.0, 0.0, -1.0])


def _normals_from_depth(depth: np.ndarray, size: int) -> np.ndarray:
    """Back-project with the pinhole model written out here and take the cross product of the
    central differences; oriented towards the camera. Valid on interior pixels only."""
    f, c = 0.9 * size, (size - 1) / 2
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    p = np.stack([(u - c) / f * depth, (v - c) / f * depth, depth], axis=-1)
    du = p[1:-1, 2:] - p[1:-1, :-2]
    dv = p[2:, 1:-1] - p[:-2, 1:-1]
    n = np.cross(du, dv)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    ray = p[1:-1, 1:-1]
    return np.where(((n * ray).sum(-1) > 0)[..., None], -n, n)


def test_normals_agree_with_the_depth_map() -> None:
    rng = np.random.default_rng(7)
    size = 48
    checked_plane = checked_sphere = 0
    for _ in range(6):
        sc = scenes.render(rng, size)
        assert sc.image.shape == (3, size, size) and sc.image.dtype == np.float32
        assert np.all(np.isfinite(sc.depth)) and sc.depth.min() > 0
        nrm = sc.normal.transpose(1, 2, 0)
        assert np.allclose(np.linalg.norm(nrm, axis=-1), 1.0)
        d, _, _ = scenes.camera_rays(size)
        assert np.all((nrm * d).sum(-1) < 0)  # every normal faces the camera
        fd = _normals_from_depth(sc.depth, size)
        inner = nrm[1:-1, 1:-1]
        # pixels whose 3×3 neighbourhood lies on one surface with one normal (one plane or
        # one box face), and sphere pixels whose neighbourhood is the same sphere
        same_inst = np.ones((size - 2, size - 2), dtype=bool)
        same_n = np.ones((size - 2, size - 2), dtype=bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                sl = np.s_[1 + dy : size - 1 + dy, 1 + dx : size - 1 + dx]
                same_inst &= sc.instance[sl] == sc.instance[1:-1, 1:-1]
                same_n &= np.all(np.abs(nrm[sl] - inner) < 1e-9, axis=-1)
        cls = sc.label[1:-1, 1:-1]
        ang = np.degrees(np.arccos(np.clip((fd * inner).sum(-1), -1, 1)))
        plane = same_inst & same_n & (cls != 2)
        sphere = same_inst & (cls == 2)
        assert plane.sum() > 100
        assert ang[plane].max() < 1e-3  # a plane back-projects to a plane: exact
        if sphere.any():  # curved: central differences agree to first order
            assert np.median(ang[sphere]) < 2.0 and ang[sphere].max() < 15.0
        checked_plane += int(plane.sum())
        checked_sphere += int(sphere.sum())
        # the classes: floor pixels carry the floor's normal, wall pixels a horizontal one
        assert np.allclose(nrm[sc.label == 1], [0.0, -1.0, 0.0])
        assert np.allclose(nrm[sc.label == 0][:, 1], 0.0)
    assert checked_plane > 5000 and checked_sphere > 50


def test_make_data_is_fixed_by_its_seed() -> None:
    a = scenes.make_data(4, 16, 123)
    b = scenes.make_data.__wrapped__(4, 16, 123)  # bypass the cache: render again
    c = scenes.make_data.__wrapped__(4, 16, 124)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    x, lab, dep, nor = a
    assert x.shape == (4, 3, 16, 16) and lab.shape == (4, 16, 16)
    assert dep.shape == (4, 1, 16, 16) and nor.shape == (4, 3, 16, 16)
    assert set(lab.unique().tolist()) <= set(range(len(scenes.CLASSES)))


# ---------------------------------------------------------------- a tiny run


def test_tiny_run_params_and_cut_point() -> None:
    strategies = ["Equal", "UPGrad", "MGDA-UB", "FAMO"]
    a = scenes.run(strategies=strategies, seeds=[0], quick=True, tiny=True, show_progress=False)
    b = scenes.run(strategies=strategies, seeds=[0], quick=True, tiny=True, show_progress=False)
    assert [r["strategy"] for r in a["rows"]] == ["STL", *strategies]
    keys = [k for k, _, _ in scenes.METRICS]

    def metrics(rows: list[dict]) -> list[list[float]]:
        return [[r[k] for k in keys] for r in rows]

    assert metrics(a["rows"]) == metrics(b["rows"])  # same seed, same numbers
    by = {r["strategy"]: r for r in a["rows"]}
    # the cut-point and Jacobian strategies really changed the training
    assert metrics([by["MGDA-UB"]]) != metrics([by["Equal"]])
    assert metrics([by["UPGrad"]]) != metrics([by["Equal"]])
    for r in a["rows"]:
        assert 0 <= r["seg/mIoU"] <= 1 and 0 <= r["seg/pixAcc"] <= 1
        assert r["depth/abs"] > 0 and 0 <= r["normal/30"] <= 100
        assert r["ms_per_step"] > 0
    assert by["STL"]["delta_m"] == pytest.approx(0.0, abs=1e-9)  # one seed: STL is its own mean
    assert "Δm%" in a["markdown"] and "MGDA-UB" in a["markdown"]
    assert [m["key"] for m in a["metrics"]] == keys
    json.dumps(a)


def test_the_command_finds_the_suite() -> None:
    from benchmarks import __main__ as cli

    assert "scenes" in cli.discover()
    assert cli.expand(["scenes"]) == (["scenes"], False)
