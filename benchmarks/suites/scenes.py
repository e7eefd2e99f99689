"""Scenes: an offline NYUv2-like dense-prediction suite (segmentation, depth, surface normals).

**Data.** Procedural indoor scenes, ray-cast analytically (no download, no randomness outside
``data_seed``). A pinhole camera at the origin looks along ``+z`` (``y`` points down, focal
length ``f = 0.9·W`` pixels, principal point at the image centre); pixel ``(u, v)`` casts the ray
``d = ((u − c)/f, (v − c)/f, 1)``, so the ray parameter of a hit *is* its depth ``z``. A scene
holds a back wall (distance 5–8, turned up to ±35° about the vertical), a floor plane
``y = h`` (``h`` in 1.0–1.6), sometimes a side wall, 1–2 spheres and 1–2 boxes (turned about the
vertical) resting on the floor. Every pixel keeps its nearest hit: the **class** (4: wall, floor,
sphere, box), the **depth** ``z`` and the unit **normal** of the surface hit (the plane's normal,
``(p − centre)/r`` on a sphere, the face normal on a box), in camera coordinates and facing the
camera. Normals and depth come from the same geometry, so the normal of a plane pixel equals the
cross product of the finite differences of the back-projected depth map (a unit test checks it).
The RGB image is Lambertian shading (random light from above the camera, ambient 0.3) of
per-scene class colours drawn from overlapping ranges, a checkerboard on the floor (a
perspective cue to depth) and stripes on the walls, plus Gaussian noise (σ = 0.03).

**Model.** A small U-Net-style conv encoder-decoder (3→16→16 at full resolution, 32 at 1/2 and
1/4, skip connections, 16 channels back at full resolution): that whole trunk is shared, its
last 3×3 conv block is the **cut point** (the shared representation ``[B, 16, H, W]``, where the
``-UB`` variants take their per-task gradients); each task has its own head (3×3 conv, ReLU, 1×1
conv). Losses as in MTAN/Nash-MTL on NYUv2: pixel cross-entropy, L1 depth error, ``1 − cos``
between predicted (normalised) and true normals. Adam, lr 3e-3, batch 32.

**Metrics** (the NYUv2 ones, over all test pixels): segmentation mIoU (per-class IoU from the
test confusion matrix, averaged over the classes that occur) and pixel accuracy; depth absolute
error ``mean |d − d*|`` and relative error ``mean |d − d*| / d*``; normal angle error mean and
median (degrees) and the % of pixels within 11.25°, 22.5° and 30°.
**Δm%** is against the **single-task baselines** as in the papers (Nash-MTL, FAMO): three
networks of the same architecture, one per task, trained with the same budget and seeds;
the per-seed rows also let a report compare against Equal.
"""

from __future__ import annotations

import functools
import math
import pathlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import mtlbal
from benchmarks import metrics as M
from benchmarks import strategies as S
from benchmarks.common import missing_note, progress, seed_everything

NAME = "scenes"
TITLE = "Scenes (NYUv2-like dense prediction: segmentation, depth, normals)"
DESCRIPTION = (
    "Procedural indoor scenes ray-cast offline (walls, floor, spheres, boxes) rendered to small "
    "RGB images with per-pixel class, depth and surface normals from the same geometry; a small "
    "conv encoder-decoder shared by three task heads (pixel cross-entropy, L1 depth, 1 − cos "
    "normals); the NYUv2 metrics (mIoU, pixel accuracy, absolute/relative depth error, normal "
    "angle mean/median and % within 11.25°/22.5°/30°); Δm% against single-task networks. "
    "Exercises convolutions at the shared parameters and the cut point (-UB variants)."
)
CLASSES = ("wall", "floor", "sphere", "box")
STL = "STL"
# the strategies run when none are named (a conv model: every one costs about a minute a seed)
DEFAULT_STRATEGIES = ("Equal", "UW", "MGDA", "MGDA-UB", "UPGrad", "FAMO", "PCGrad", "AlignedMTL-UB")

# (key, higher is better, task); the order of the NYUv2 tables
METRICS: tuple[tuple[str, bool, str], ...] = (
    ("seg/mIoU", True, "seg"),
    ("seg/pixAcc", True, "seg"),
    ("depth/abs", False, "depth"),
    ("depth/rel", False, "depth"),
    ("normal/mean", False, "normal"),
    ("normal/median", False, "normal"),
    ("normal/11.25", True, "normal"),
    ("normal/22.5", True, "normal"),
    ("normal/30", True, "normal"),
)
TASKS = ("seg", "depth", "normal")


# ---------------------------------------------------------------------------- rendering


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def camera_rays(size: int) -> tuple[np.ndarray, float, float]:
    """Ray directions ``[size, size, 3]`` (z component 1), the focal length and the centre."""
    f = 0.9 * size
    c = (size - 1) / 2.0
    v, u = np.meshgrid(
        np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij"
    )
    d = np.stack([(u - c) / f, (v - c) / f, np.ones_like(u)], axis=-1)
    return d, f, c


def _plane(d: np.ndarray, n: np.ndarray, offset: float) -> np.ndarray:
    """Depth of the hit of rays ``d`` on the plane ``n·p = offset`` (inf where none)."""
    nd = d @ n
    with np.errstate(divide="ignore", invalid="ignore"):
        t = offset / nd
    return np.where((nd != 0) & (t > 1e-6), t, np.inf)


def _sphere(d: np.ndarray, c: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.einsum("...i,...i->...", d, d)
    b = -2.0 * (d @ c)
    cc = float(c @ c) - r * r
    disc = b * b - 4 * a * cc
    ok = disc >= 0
    t = np.where(ok, (-b - np.sqrt(np.where(ok, disc, 0.0))) / (2 * a), np.inf)
    t = np.where(t > 1e-6, t, np.inf)
    n = (np.where(np.isfinite(t), t, 0.0)[..., None] * d - c) / r  # meaningless where no hit
    return t, n


def _box(
    d: np.ndarray, c: np.ndarray, half: np.ndarray, rot: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Slab test of an oriented box (centre ``c``, half sizes ``half``, box→camera rotation)."""
    dl = d @ rot  # rotᵀ d, per ray: the ray in box coordinates
    ol = -(rot.T @ c)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - ol) / dl
        t2 = (half - ol) / dl
    tmin = np.minimum(t1, t2)
    tmax = np.maximum(t1, t2)
    tmin = np.where(np.isnan(tmin), -np.inf, tmin)
    tmax = np.where(np.isnan(tmax), np.inf, tmax)
    near = tmin.max(axis=-1)
    far = tmax.min(axis=-1)
    axis = tmin.argmax(axis=-1)
    hit = (near <= far) & (near > 1e-6)
    t = np.where(hit, near, np.inf)
    nl = np.zeros(d.shape)
    sign = -np.sign(np.take_along_axis(dl, axis[..., None], axis=-1))[..., 0]
    np.put_along_axis(nl, axis[..., None], sign[..., None], axis=-1)
    return t, nl @ rot.T


@dataclass
class Scene:
    """One rendered scene: ``image [3, S, S]`` (float32 in [0, 1]), ``label [S, S]`` (int64),
    ``depth [S, S]``, ``normal [3, S, S]`` (unit, camera coordinates) and ``instance [S, S]``
    (which surface each pixel hit, by its place in the scene: back wall, floor, the side wall
    when there is one, then the objects)."""

    image: np.ndarray
    label: np.ndarray
    depth: np.ndarray
    normal: np.ndarray
    instance: np.ndarray


def render(rng: np.random.Generator, size: int, *, objects: bool = True) -> Scene:
    """Draw one scene from ``rng`` and ray-cast it at ``size × size`` pixels."""
    d, _, _ = camera_rays(size)
    hits: list[tuple[np.ndarray, np.ndarray, int]] = []  # (depth, normal, class)
    # back wall through (0, 0, D), turned by a about the vertical; normal faces the camera
    a = rng.uniform(-0.6, 0.6)
    n_wall = _rot_y(a) @ np.array([0.0, 0.0, -1.0])
    dist = rng.uniform(5.0, 8.0)
    t = _plane(d, n_wall, float(n_wall @ np.array([0.0, 0.0, dist])))
    hits.append((t, np.broadcast_to(n_wall, d.shape), 0))
    # floor y = h, normal up (towards the camera, −y)
    h = rng.uniform(1.0, 1.6)
    t = _plane(d, np.array([0.0, 1.0, 0.0]), h)
    hits.append((t, np.broadcast_to(np.array([0.0, -1.0, 0.0]), d.shape), 1))
    # sometimes a side wall x = ±s, normal pointing inwards
    side = rng.uniform(2.0, 3.5) * rng.choice([-1.0, 1.0])
    if rng.uniform() < 0.5:
        t = _plane(d, np.array([1.0, 0.0, 0.0]), side)
        hits.append((t, np.broadcast_to(np.array([-np.sign(side), 0.0, 0.0]), d.shape), 0))
    if objects:
        for _ in range(rng.integers(1, 3)):
            r = rng.uniform(0.4, 0.9)
            c = np.array([rng.uniform(-2.0, 2.0), h - r, rng.uniform(3.0, 6.0)])
            t, n = _sphere(d, c, r)
            hits.append((t, n, 2))
        for _ in range(rng.integers(1, 3)):
            half = rng.uniform(0.3, 0.8, size=3)
            c = np.array([rng.uniform(-2.0, 2.0), h - half[1], rng.uniform(3.0, 6.5)])
            t, n = _box(d, c, half, _rot_y(rng.uniform(-0.8, 0.8)))
            hits.append((t, n, 3))
    ts = np.stack([t for t, _, _ in hits])  # [K, S, S]
    inst = ts.argmin(axis=0)
    depth = np.take_along_axis(ts, inst[None], axis=0)[0]
    if not np.all(np.isfinite(depth)):
        raise RuntimeError("a ray hit nothing: the scene parameters are out of range")
    normals = np.stack([np.broadcast_to(n, d.shape) for _, n, _ in hits])
    normal = np.take_along_axis(normals, inst[None, ..., None], axis=0)[0]
    normal = normal / np.linalg.norm(normal, axis=-1, keepdims=True)
    label = np.array([k for _, _, k in hits])[inst]
    # shading: Lambert with a light from above the camera, ambient 0.3
    light = np.array([rng.uniform(-0.5, 0.5), -1.0, rng.uniform(-0.8, -0.2)])
    light /= np.linalg.norm(light)
    shade = 0.3 + 0.7 * np.clip(normal @ light, 0.0, None)
    base = {
        0: rng.uniform([0.55, 0.5, 0.4], [0.85, 0.8, 0.75]),
        1: rng.uniform([0.35, 0.25, 0.15], [0.65, 0.5, 0.4]),
    }
    colours = np.stack([base.get(k, rng.uniform(0.15, 0.95, size=3)) for _, _, k in hits])
    albedo = colours[inst]
    p = depth[..., None] * d  # hit points
    check = (np.floor(p[..., 0] * 1.5) + np.floor(p[..., 2] * 1.5)) % 2
    albedo = albedo * np.where(label == 1, 0.75 + 0.25 * check, 1.0)[..., None]
    stripes = 0.9 + 0.1 * np.sign(np.sin(p[..., 1] * 6.0))
    albedo = albedo * np.where(label == 0, stripes, 1.0)[..., None]
    img = albedo * shade[..., None] + rng.normal(0.0, 0.03, size=albedo.shape)
    return Scene(
        image=np.clip(img, 0.0, 1.0).transpose(2, 0, 1).astype(np.float32),
        label=label.astype(np.int64),
        depth=depth,
        normal=normal.transpose(2, 0, 1),
        instance=inst,
    )


@functools.lru_cache(maxsize=4)
def make_data(n: int, size: int, data_seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` scenes: images ``[n, 3, S, S]``, labels ``[n, S, S]``, depth ``[n, 1, S, S]`` and
    normals ``[n, 3, S, S]`` (float32), fixed by ``data_seed``."""
    rng = np.random.default_rng(data_seed)
    scenes = [render(rng, size) for _ in range(n)]
    return (
        torch.from_numpy(np.stack([s.image for s in scenes])),
        torch.from_numpy(np.stack([s.label for s in scenes])),
        torch.from_numpy(np.stack([s.depth for s in scenes])[:, None].astype(np.float32)),
        torch.from_numpy(np.stack([s.normal for s in scenes]).astype(np.float32)),
    )


# ---------------------------------------------------------------------------- metrics


def seg_metrics(pred: Tensor, target: Tensor, num_classes: int) -> tuple[float, float]:
    """mIoU and pixel accuracy of class maps ``pred``/``target`` (same shape, int): the IoU
    ``TP / (TP + FP + FN)`` of each class from the confusion matrix of all pixels, averaged over
    the classes present in the prediction or the target."""
    if pred.shape != target.shape:
        raise ValueError(f"segmentation: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    p, t = pred.reshape(-1).long(), target.reshape(-1).long()
    cm = (
        torch.bincount(t * num_classes + p, minlength=num_classes**2)
        .reshape(num_classes, num_classes)
        .double()
    )
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    miou = float((tp[present] / union[present]).mean())
    return miou, float(tp.sum() / cm.sum())


def depth_metrics(pred: Tensor, target: Tensor) -> tuple[float, float]:
    """Absolute ``mean |d − d*|`` and relative ``mean |d − d*| / d*`` depth error."""
    if pred.shape != target.shape:
        raise ValueError(f"depth: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    if bool((target <= 0).any()):
        raise ValueError("depth: the target has a non-positive depth")
    err = (pred.double() - target.double()).abs()
    return float(err.mean()), float((err / target.double()).mean())


def normal_metrics(pred: Tensor, target: Tensor) -> tuple[float, float, float, float, float]:
    """Angle error (degrees) between normal maps ``[N, 3, H, W]`` (``pred`` is normalised here,
    ``target`` must be unit): mean, median, and the % of pixels within 11.25°, 22.5°, 30°."""
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(
            f"normals: need [N, 3, H, W] pairs, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    p, t = F.normalize(pred.double(), dim=1), target.double()
    # atan2(|p × t|, p · t): accurate at small angles, where acos(p · t) loses half the digits
    ang = torch.rad2deg(torch.atan2(torch.linalg.cross(p, t, dim=1).norm(dim=1), (p * t).sum(1)))
    ang = ang.reshape(-1).cpu()
    return (
        float(ang.mean()),
        float(np.median(ang.numpy())),  # the mean of the two middle values of an even count
        float((ang < 11.25).double().mean() * 100),
        float((ang < 22.5).double().mean() * 100),
        float((ang < 30).double().mean() * 100),
    )


# ---------------------------------------------------------------------------- model


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU())


class Trunk(nn.Module):
    """The shared encoder-decoder; ``rep`` (its last conv block) outputs the representation."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(_block(3, w), _block(w, w))
        self.enc2 = _block(w, 2 * w)
        self.enc3 = _block(2 * w, 2 * w)
        self.dec2 = _block(4 * w, 2 * w)
        self.rep = _block(3 * w, w)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)  # S
        e2 = self.enc2(F.max_pool2d(e1, 2))  # S/2
        e3 = self.enc3(F.max_pool2d(e2, 2))  # S/4
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0), e2], 1))
        return self.rep(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))


def _head(width: int, out: int) -> nn.Sequential:
    return nn.Sequential(_block(width, width), nn.Conv2d(width, out, 1))


class DenseNet(nn.Module):
    """A shared :class:`Trunk` and one head per task in ``tasks``."""

    def __init__(self, tasks: tuple[str, ...] = TASKS, width: int = 16) -> None:
        super().__init__()
        self.tasks = tasks
        self.trunk = Trunk(width)
        outs = {"seg": len(CLASSES), "depth": 1, "normal": 3}
        self.heads = nn.ModuleDict({t: _head(width, outs[t]) for t in tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


class STLNets(nn.Module):
    """One :class:`DenseNet` per task, trained together on the summed loss: their parameters
    are disjoint, so each gets its own task's gradient and Adam trains each as if alone."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.nets = nn.ModuleDict({t: DenseNet((t,), width) for t in TASKS})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: net(x)[t] for t, net in self.nets.items()}


def task_losses(out: dict[str, Tensor], y: tuple[Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
    lab, dep, nor = y
    return {
        "seg": F.cross_entropy(out["seg"], lab),
        "depth": (out["depth"] - dep).abs().mean(),
        "normal": 1.0 - (F.normalize(out["normal"], dim=1) * nor).sum(1).mean(),
    }


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: tuple[Tensor, Tensor, Tensor]) -> dict[str, float]:
    model.eval()
    outs = [model(x[i : i + 256]) for i in range(0, x.shape[0], 256)]
    model.train()
    seg = torch.cat([o["seg"] for o in outs]).argmax(1)
    dep = torch.cat([o["depth"] for o in outs])
    nor = torch.cat([o["normal"] for o in outs])
    miou, pix = seg_metrics(seg.cpu(), y[0].cpu(), len(CLASSES))
    ab, rel = depth_metrics(dep.cpu(), y[1].cpu())
    values = (miou, pix, ab, rel, *normal_metrics(nor.cpu(), y[2].cpu()))
    return {k: v for (k, _, _), v in zip(METRICS, values)}


# ---------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Config:
    size: int = 32
    n_train: int = 1000
    n_test: int = 200
    epochs: int = 4
    batch_size: int = 32
    lr: float = 3e-3
    width: int = 16


QUICK = Config()
FULL = Config(size=48, n_train=3000, n_test=500, epochs=12)
TINY = Config(size=16, n_train=32, n_test=16, epochs=1, batch_size=16, width=4)


def train_one(strategy: str, seed: int, cfg: Config, device: str = "cpu") -> dict[str, Any]:
    """Train ``strategy`` (or the single-task networks for ``"STL"``) once; the test metrics,
    wall and process-CPU seconds, and CPU ms per step."""
    x, lab, dep, nor = (t.to(device) for t in make_data(cfg.n_train, cfg.size, 1))
    xt, labt, dept, nort = (t.to(device) for t in make_data(cfg.n_test, cfg.size, 2))
    seed_everything(seed)
    balancer = None
    if strategy == STL:
        model: nn.Module = STLNets(cfg.width).to(device)
        opt: Any = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    else:
        net = DenseNet(TASKS, cfg.width).to(device)
        model = net
        spec = S.get(strategy)(len(TASKS), seed)
        balancer = mtlbal.Balancer(
            net.trunk,
            weighting=spec.weighting,
            aggregator=spec.aggregator,
            at=net.trunk.rep if spec.at == "cut" else "params",
        ).to(device)
        opt = mtlbal.wrap(torch.optim.Adam(net.parameters(), lr=cfg.lr), balancer)
    famo = balancer is not None and callable(getattr(balancer.weighting, "update", None))
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    steps = 0
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            yb = (lab[idx], dep[idx], nor[idx])
            losses = task_losses(model(x[idx]), yb)
            opt.zero_grad(set_to_none=True)
            if balancer is None:
                torch.stack(list(losses.values())).sum().backward()
            else:
                opt.backward(losses)
            opt.step()
            if famo:
                assert balancer is not None
                with torch.no_grad():
                    balancer.update(task_losses(model(x[idx]), yb))
            steps += 1
        if balancer is not None:
            balancer.epoch_end()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    if balancer is not None:
        balancer.remove()
    row: dict[str, Any] = {"strategy": strategy, "seed": seed}
    row.update(evaluate(model, xt, (labt, dept, nort)))
    row.update(wall_s=round(wall, 3), cpu_s=round(cpu, 3), ms_per_step=1000 * cpu / steps)
    return row


def summarize(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str, list[str]]:
    """Per strategy: each metric mean ± std over seeds, Δm% against the single-task baselines
    (the mean of the STL seeds, per seed then mean ± std), CPU ms/step and s/run. Adds
    ``delta_m`` to every row. A metric whose baseline is 0 (an untrained smoke run: no pixel
    within 11.25°) has no relative change: it is left out of Δm% and returned by name."""
    keys = [k for k, _, _ in METRICS]
    hib = [h for _, h, _ in METRICS]
    stl = [r for r in rows if r["strategy"] == STL]
    if not stl:
        raise ValueError("no single-task baseline row: Δm needs one")
    base_all = [float(np.mean([r[k] for r in stl])) for k in keys]
    dropped = [k for k, b in zip(keys, base_all) if b == 0]
    used = [i for i, b in enumerate(base_all) if b != 0]
    base = [base_all[i] for i in used]
    hib_used = [hib[i] for i in used]
    order = list(dict.fromkeys(r["strategy"] for r in rows))
    head = ["strategy", *(f"{k} {'↑' if h else '↓'}" for k, h in zip(keys, hib))]
    head += ["Δm% ↓", "CPU ms/step", "s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out = []
    for s in order:
        rs = [r for r in rows if r["strategy"] == s]
        for r in rs:
            r["delta_m"] = M.delta_m([r[keys[i]] for i in used], base, hib_used)
        dm = M.mean_std([r["delta_m"] for r in rs])
        srow: dict[str, Any] = {
            "strategy": s,
            "n_seeds": len(rs),
            "delta_m": dm[0],
            "delta_m_std": dm[1],
        }
        cells = [f"**{s}**" if s == STL else s]
        for k in keys:
            mu, sd = M.mean_std([r[k] for r in rs])
            srow[k], srow[k + "_std"] = mu, sd
            digits = 1 if k.startswith("normal/") else 3
            cells.append(f"{mu:.{digits}f} ± {sd:.{digits}f}")
        ms = float(np.median([r["ms_per_step"] for r in rs]))
        wall = float(np.median([r["wall_s"] for r in rs]))
        srow.update(median_ms_per_step=ms, median_wall_s=wall)
        cells += [
            "0 (ref.)" if s == STL else f"{dm[0]:+.2f} ± {dm[1]:.2f}",
            f"{ms:.0f}",
            f"{wall:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        out.append(srow)
    return out, "\n".join(lines), dropped


def run(
    *,
    strategies: list[str] | None,
    seeds: list[int],
    quick: bool,
    device: str = "cpu",
    out_dir: pathlib.Path | None = None,
    show_progress: bool = True,
    tiny: bool = False,
) -> dict[str, Any]:
    """Train the single-task networks and every strategy once per seed (seeds interleaved)."""
    names, missing = S.available(strategies)
    if strategies is None:  # this suite's default set, not every registered strategy
        names = [s for s in DEFAULT_STRATEGIES if s in names]
        missing = {k: v for k, v in missing.items() if k in DEFAULT_STRATEGIES}
    cfg = TINY if tiny else QUICK if quick else FULL
    jobs = [(s, seed) for seed in seeds for s in [STL, *names]]
    rows = [
        train_one(s, seed, cfg, device)
        for s, seed in progress(jobs, total=len(jobs), desc=NAME, enabled=show_progress)
    ]
    summary, table, dropped = summarize(rows)
    intro = (
        f"{cfg.n_train} training and {cfg.n_test} test scenes at {cfg.size}×{cfg.size}; "
        f"conv encoder-decoder (width {cfg.width}) + 3 heads; Adam lr {cfg.lr}, batch "
        f"{cfg.batch_size}, {cfg.epochs} epochs; seeds {seeds}. Δm% over the 9 metrics against "
        "the single-task networks (STL). CPU ms/step: process CPU time per training step."
    )
    md = f"### {TITLE}\n\n{intro}\n\n{table}\n" + missing_note(missing)
    if dropped:
        md += f"\nLeft out of Δm% (single-task baseline 0): {', '.join(dropped)}.\n"
    result = {
        "name": NAME,
        "title": TITLE,
        "description": DESCRIPTION,
        "config": {**cfg.__dict__, "seeds": list(seeds), "quick": quick},
        "metrics": [{"key": k, "higher_is_better": h, "task": t} for k, h, t in METRICS],
        "tasks": list(TASKS),
        "baseline": STL,
        "rows": rows,
        "summary": summary,
        "markdown": md,
        "delta_m_left_out": dropped,
        "missing_strategies": missing,
    }
    return result
