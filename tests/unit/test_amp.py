"""Mixed precision: GradScaler-scaled gradients with strategies seeing unscaled losses."""

from __future__ import annotations

import pytest
import torch

import mtlbal
from conftest import make_problem
from mtlbal.aggregation import MGDA, PCGrad
from mtlbal.weighting import GradNorm, UncertaintyWeighting


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"weighting": "uw"},
        {"weighting": "gn"},
        {"aggregator": "mgda"},
        {"aggregator": "pcgrad", "at": "cut"},
    ],
)
def test_scaled_gradients_are_scale_times_unscaled(kwargs: dict[str, str]) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def make(p):  # type: ignore[no-untyped-def]
        w = {"uw": UncertaintyWeighting(3), "gn": GradNorm(3), None: None}[kwargs.get("weighting")]
        a = {"mgda": MGDA(), "pcgrad": PCGrad(seed=0), None: None}[kwargs.get("aggregator")]
        at = p.trunk if kwargs.get("at") == "cut" else "params"
        return mtlbal.Balancer(p.trunk, weighting=w, aggregator=a, at=at)

    p = make_problem(3, dtype=torch.float64)
    make(p).backward(p.losses())
    ref = p.grads()
    p2 = make_problem(3, dtype=torch.float64)
    info = make(p2).backward(p2.losses(), scaler=scaler)
    for a, b in zip(ref, p2.grads()):
        torch.testing.assert_close(b, 1024.0 * a, rtol=1e-5, atol=1e-9)  # PCGrad: eps
    # the strategies saw the unscaled losses
    torch.testing.assert_close(info.losses, torch.stack([v.detach() for v in p.losses().values()]))


def test_wrapped_optimizer_with_scaler_step() -> None:
    p = make_problem(2)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    opt = mtlbal.wrap(torch.optim.SGD(p.params(), lr=0.1), mtlbal.Balancer(p.trunk))
    ref = make_problem(2)
    ref_opt = torch.optim.SGD(ref.params(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        opt.backward(p.losses(), scaler=scaler)
        scaler.step(opt)
        scaler.update()
        ref_opt.zero_grad()
        sum(ref.losses().values()).backward()
        ref_opt.step()
    for a, b in zip(p.params(), ref.params()):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- autocast
AMP_METHODS = ["MGDA", "UPGrad", "DualProj", "CAGrad", "NashMTL", "AlignedMTL", "GradVac"]


def _amp_model(width: int = 256) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(
        torch.nn.Linear(32, width), torch.nn.Tanh(), torch.nn.Linear(width, width)
    )
    heads = torch.nn.ModuleList([torch.nn.Linear(width, 1) for _ in range(3)])
    return trunk, heads


def _amp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 32, generator=g), torch.randn(64, 3, generator=g)


def _amp_step(
    trunk: torch.nn.Module,
    heads: torch.nn.ModuleList,
    opt: object,
    scaler: object,
    c: float,
    dtype: torch.dtype | None = torch.float16,
) -> mtlbal.StepInfo:
    x, ys = _amp_data()
    with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
        z = trunk(x)
        outs = [h(z) for h in heads]
    losses = {
        f"t{i}": (c * (i + 1) * (o.float()[:, 0] - ys[:, i])).pow(2).mean()
        for i, o in enumerate(outs)
    }
    return opt.backward(losses, scaler=scaler)  # type: ignore[attr-defined,no-any-return]


def _build(name: str, at: str, trunk: torch.nn.Module, heads: torch.nn.ModuleList) -> object:
    kwargs = {"seed": 0} if name == "GradVac" else {}
    agg = getattr(mtlbal.aggregation, name)(**kwargs)
    bal = mtlbal.Balancer(trunk, aggregator=agg, at="params" if at == "params" else trunk)
    return mtlbal.wrap(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=1e-4), bal)


@pytest.mark.parametrize("at", ["params", "cut"])
def test_fp16_gramian_is_formed_in_float32(at: str) -> None:
    # the per-task gradients are fp16 (at a cut point: the representation's), scaled by 2^12;
    # their Gramian overflows fp16 but not float32: the step is not lost, and
    # the weights are those of the fp32 step up to fp16's forward error
    trunk, heads = _amp_model()
    opt = _build("MGDA", at, trunk, heads)
    scale = 2.0**12
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    info = _amp_step(trunk, heads, opt, scaler, c=1.0)
    assert not info.skipped
    assert info.gramian is not None and info.gramian.dtype == torch.float32
    assert torch.isfinite(info.gramian).all()
    # the Gramian of the scaled gradients is far outside fp16's range (max 65504)
    assert float(info.gramian.abs().max()) * scale**2 > 10 * 65504
    trunk32, heads32 = _amp_model()
    ref = _amp_step(trunk32, heads32, _build("MGDA", at, trunk32, heads32), None, 1.0, None)
    torch.testing.assert_close(info.weights, ref.weights, rtol=2e-2, atol=1e-3)
    # the Gramian the strategies see is the unscaled one
    assert ref.gramian is not None
    torch.testing.assert_close(info.gramian, ref.gramian, rtol=5e-2, atol=0.0)


@pytest.mark.parametrize("at", ["params", "cut"])
@pytest.mark.parametrize("name", AMP_METHODS)
def test_overflow_is_skipped_as_the_scaler_skips_a_plain_step(name: str, at: str) -> None:
    # large losses x 2^16 overflow fp16 in the per-task backward: no error; the scaler skips
    # the optimizer step and lowers the scale, exactly as for a plain scaled backward; the
    # strategy's state (GradVac's EMA targets, Nash-MTL's counters, ...) does not see the step
    trunk, heads = _amp_model()
    opt = _build(name, at, trunk, heads)
    bal = opt.balancer  # type: ignore[attr-defined]
    # a first finite step gives the strategies some state to protect
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    first = _amp_step(trunk, heads, opt, scaler, c=1.0)
    assert not first.skipped
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()  # type: ignore[attr-defined]
    state = bal.state_dict()
    params = [p.detach().clone() for p in [*trunk.parameters(), *heads.parameters()]]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    info = _amp_step(trunk, heads, opt, scaler, c=100.0)
    assert info.skipped and "overflow" in info.extras
    assert bal.step_count == 1
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**15
    for a, b in zip(params, [*trunk.parameters(), *heads.parameters()]):
        assert torch.equal(a, b)
    _assert_same_state(state, bal.state_dict())
    # and the plain scaled step under the same scaler settings skips too
    trunk2, heads2 = _amp_model()
    plain = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, ys = _amp_data()
    with torch.autocast("cpu", dtype=torch.float16):
        z = trunk2(x)
        total = sum(
            (100.0 * (i + 1) * (h(z).float()[:, 0] - ys[:, i])).pow(2).mean()
            for i, h in enumerate(heads2)
        )
    plain.scale(total).backward()
    sgd = torch.optim.SGD([*trunk2.parameters(), *heads2.parameters()], lr=1e-4)
    plain.step(sgd)
    plain.update()
    assert plain.get_scale() == scaler.get_scale()


@pytest.mark.parametrize("at", ["params", "cut"])
@pytest.mark.parametrize("name", ["MGDA", "UPGrad", "NashMTL", "AlignedMTL", "CAGrad", "IMTLG"])
def test_bf16_autocast_weights_match_fp32(name: str, at: str) -> None:
    def weights(dtype: torch.dtype | None) -> torch.Tensor:
        trunk, heads = _amp_model(64)
        return _amp_step(trunk, heads, _build(name, at, trunk, heads), None, 1.0, dtype).weights

    w32, w16 = weights(None), weights(torch.bfloat16)
    assert (w32 - w16).abs().max() <= 1e-3 * w32.abs().max()


def _assert_same_state(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    else:
        assert a == b
