"""CoBa: float64 references from the paper's equations (plain Python), the official code's core
re-implemented (codefuse-ai/MFTCoder @ 8ba13f44e2036f1412a343bc343dc6cda7383d73,
mftcoder_accelerate/src/utils/loss_utils.py, CoBaStatus.compute_per_task_weight and
fit_window_slope), the schedule, the refusal when validation losses never come, and resume."""

from __future__ import annotations

import io
import math

import pytest
import torch

import mtlbal
from mtlbal.weighting import CoBa
from mtlbal.weighting.coba import coba_scores, coba_weights, window_slope


def _softmax(x: list[float]) -> list[float]:
    mx = max(x)
    e = [math.exp(v - mx) for v in x]
    s = sum(e)
    return [v / s for v in e]


def _slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    den = sum((x - mx) ** 2 for x in xs)
    return num / den


def _paper_replay(
    obs: list[tuple[int, list[float]]], m: int, warmup: int, n_hist: int, tau: float
) -> list[list[float] | None]:
    """The paper's weights after each observation (None: still uniform), from scratch."""
    v0 = obs[0][1]
    steps: list[float] = []
    vals: list[list[float]] = []
    slopes: list[list[float]] = []
    maxes: list[float] = []
    out: list[list[float] | None] = []
    for step, v in obs:
        steps.append(float(step))
        vals.append([a / b for a, b in zip(v, v0)])
        steps, vals = steps[-n_hist:], vals[-n_hist:]
        if step < warmup or len(steps) < 2:
            out.append(None)
            continue
        alpha = [_slope(steps, [row[t] for row in vals]) for t in range(m)]
        amax = _slope(steps, [max(row) for row in vals])
        slopes = [*slopes, alpha][-n_hist:]
        maxes = [*maxes, amax]
        rcs = _softmax([m * a / sum(abs(b) for b in alpha) for a in alpha])
        w_len = len(slopes)
        acs = _softmax([-w_len * alpha[t] / sum(abs(row[t]) for row in slopes) for t in range(m)])
        s = len(maxes)
        den = sum(abs(a) for a in maxes)
        df = min(s * _softmax([-tau * s * a / den for a in maxes])[-1], 1.0)
        out.append([df * r + (1 - df) * a for r, a in zip(rcs, acs)])
    return out


def _curves(m: int, n: int, seed: int = 0) -> list[list[float]]:
    g = torch.Generator().manual_seed(seed)
    rates = [0.05, 0.01, 0.02][:m]
    out = []
    for k in range(n):
        noise = (0.02 * torch.randn(m, generator=g, dtype=torch.float64)).tolist()
        row = [(t + 1.0) * math.exp(-rates[t] * k) + noise[t] for t in range(m)]
        if k > n // 2:
            row[2] += 0.03 * (k - n // 2)  # task 2 starts to diverge
        out.append(row)
    return out


def test_paper_reference_float64() -> None:
    m, warmup, n_hist, tau = 3, 3, 6, 5.0
    curves = _curves(m, 20)
    coba = CoBa(m, warmup_steps=warmup, history=n_hist, tau=tau, reduction="mean").double()
    obs = []
    got = []
    for v in curves:
        # validation every other step: slopes are against the training step
        coba.observe(torch.zeros(m))
        coba.observe(torch.zeros(m))
        obs.append((coba.steps, v))
        coba.observe_validation(torch.tensor(v, dtype=torch.float64))
        got.append(coba.weights.clone())
    ref = _paper_replay(obs, m, warmup, n_hist, tau)
    assert ref[0] is None and ref[-1] is not None
    for r, w in zip(ref, got):
        expected = (
            torch.full((m,), 1 / m, dtype=torch.float64)
            if r is None
            else torch.tensor(r, dtype=torch.float64)
        )
        torch.testing.assert_close(w, expected.double(), rtol=1e-12, atol=1e-12)
    # the diverging task ends with less weight than under RCS alone (ACS pulls it down)
    assert float(got[-1][2]) < float(got[-1].max())


def _code_core(
    hist: torch.Tensor,
    per_task_slopes: torch.Tensor | None,
    total_slopes: torch.Tensor | None,
    completed: int,
    warmup: int,
    n_hist: int,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MFTCoder's compute_per_task_weight (re-implemented): ``hist`` [m, steps] of normalised
    validation losses, one column per completed step."""
    m = hist.shape[0]
    start = max(0, completed - n_hist)
    x = torch.arange(start, completed, 1).double()

    def fit(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        xm = torch.stack((xs, torch.ones_like(xs))).T
        return torch.linalg.solve(xm.T @ xm, xm.T @ ys)[0]

    slopes = torch.stack([fit(x, hist[i][-len(x) :]) for i in range(m)])
    total = fit(x, hist[:, -len(x) :].max(dim=0).values)
    if completed == warmup:
        per_task_slopes, total_slopes = slopes.unsqueeze(1), total.unsqueeze(0)
    else:
        assert per_task_slopes is not None and total_slopes is not None
        per_task_slopes = torch.cat((per_task_slopes, slopes.unsqueeze(1)), dim=-1)
        total_slopes = torch.cat((total_slopes, total.unsqueeze(0)), dim=0)
    rcs = torch.softmax(m * slopes / slopes.abs().sum(), dim=-1)
    win = per_task_slopes[:, start:]
    rn = -len(win[0]) * win / win.abs().sum(dim=-1, keepdim=True)
    acs = torch.softmax(rn.T.reshape(-1)[-m:], dim=-1)
    norm = -len(total_slopes) * total_slopes / total_slopes.abs().sum()
    df = torch.softmax(norm * tau, dim=-1)[-1] * len(total_slopes)
    w = torch.softmax((df * rcs + (1 - df) * acs) * m, dim=-1)
    floor = 1 / (m * 10)
    if bool((w < floor).any()):
        w = w * (1 - floor * m) + floor
    return w, per_task_slopes, total_slopes


def test_official_code_core_parity() -> None:
    # one validation observation per step, as the code does; within the first n_hist steps the
    # code's ACS window (sliced by absolute step) equals the last-N window used here
    m, warmup, n_hist, tau = 3, 3, 30, 5.0
    curves = _curves(m, 25, seed=3)
    coba = CoBa(m, warmup_steps=warmup, history=n_hist, tau=tau, variant="code").double()
    v0 = torch.tensor(curves[0], dtype=torch.float64)
    cols: list[torch.Tensor] = []
    pts = tts = None
    for k, v in enumerate(curves):
        vt = torch.tensor(v, dtype=torch.float64)
        coba.observe_validation(vt)  # observed at step k (k committed steps)
        cols.append(vt / v0)
        if k >= warmup:
            w, pts, tts = _code_core(torch.stack(cols, 1), pts, tts, k + 1, warmup + 1, n_hist, tau)
            # the code's step index runs one ahead (its history starts at step 1): slopes are
            # shift-invariant in x
            torch.testing.assert_close(coba.weights * 1, w, rtol=1e-10, atol=1e-12)
        coba.observe(torch.zeros(m))


def test_kernels_edge_cases() -> None:
    z = torch.zeros(3, dtype=torch.float64)
    rcs, acs, df = coba_scores(z, z.unsqueeze(0), torch.zeros(1, dtype=torch.float64), 5.0)
    assert torch.allclose(rcs, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.allclose(acs, rcs) and float(df) == 1.0
    assert torch.equal(window_slope(torch.tensor([1.0]), torch.ones(1, 2)), torch.zeros(2))
    # the paper clips DF at 1: ω stays a convex mix; the code's variant does not
    rcs, acs = torch.tensor([0.7, 0.3]), torch.tensor([0.2, 0.8])
    w = coba_weights(rcs, acs, torch.tensor(1.8))
    torch.testing.assert_close(w, rcs)
    wc = coba_weights(rcs, acs, torch.tensor(1.8), "code")
    assert torch.isclose(wc.sum(), torch.tensor(1.0)) and bool((wc > 0).all())


def _problem() -> tuple[torch.nn.Module, torch.nn.ModuleList, torch.Tensor]:
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 6)
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(2))
    return trunk, heads, torch.randn(16, 4)


def _losses(trunk: torch.nn.Module, heads: torch.nn.ModuleList, x: torch.Tensor) -> dict:
    z = trunk(x)
    return {"a": heads[0](z).pow(2).mean() + 0.1, "b": 3 * heads[1](z).abs().mean() + 0.2}


def test_refused_when_validation_never_comes() -> None:
    trunk, heads, x = _problem()
    bal = mtlbal.Balancer(trunk, weighting=CoBa(2, warmup_steps=2))
    for _ in range(2):
        bal.backward(_losses(trunk, heads, x))
    grad = trunk.weight.grad.clone()
    with pytest.raises(ValueError, match=r"CoBa needs validation losses.*observe_validation"):
        bal.backward(_losses(trunk, heads, x))
    assert torch.equal(trunk.weight.grad, grad) and bal.step_count == 2


def test_validation_through_the_wrapper_and_resume() -> None:
    def run(split: int | None) -> list[torch.Tensor]:
        trunk, heads, x = _problem()
        params = [*trunk.parameters(), *heads.parameters()]
        bal = mtlbal.Balancer(trunk, weighting=CoBa(2, warmup_steps=2, history=4))
        opt = mtlbal.wrap(torch.optim.SGD(params, lr=0.05), bal)
        out = []
        for k in range(8):
            if split is not None and k == split:
                buf = io.BytesIO()
                torch.save(
                    {"opt": opt.state_dict(), "p": [p.detach().clone() for p in params]}, buf
                )
                buf.seek(0)
                saved = torch.load(buf, weights_only=False)
                trunk, heads, x = _problem()
                params = [*trunk.parameters(), *heads.parameters()]
                with torch.no_grad():
                    for p, v in zip(params, saved["p"]):
                        p.copy_(v)
                bal = mtlbal.Balancer(trunk, weighting=CoBa(2, warmup_steps=2, history=4))
                opt = mtlbal.wrap(torch.optim.SGD(params, lr=0.05), bal)
                opt.load_state_dict(saved["opt"])
            opt.zero_grad()
            info = opt.backward(_losses(trunk, heads, x))
            opt.step()
            with torch.no_grad():
                opt.observe_validation(_losses(trunk, heads, x + 0.1))
            out.append(info.weights.detach().clone())
        return out

    full, resumed = run(None), run(5)
    assert not torch.allclose(full[-1], torch.ones(2))  # CoBa's own weights by then
    for a, b in zip(full, resumed):
        torch.testing.assert_close(a, b)


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="history"):
        CoBa(2, history=1)
    with pytest.raises(ValueError, match="variant"):
        CoBa(2, variant="other")  # type: ignore[arg-type]
    coba = CoBa(2)
    with pytest.raises(ValueError, match="needs them > 0"):
        coba.observe_validation(torch.tensor([0.0, 1.0]))
