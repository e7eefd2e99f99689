"""GradNorm's layer norms ``‖∇_W L_t‖`` at the parameters from the layer-wise identity (the
default engine, on a Linear layer where ``N (d_in + m d_out) < 0.7 m d_in d_out``) against the
naive loop, one ``autograd.grad`` per task, in float64; and the per-task loop where the identity
does not pay (convolutions, normalisation layers, few wide rows)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import mtlbal
from mtlbal.step import StepContext
from mtlbal.weighting import GradNorm
from mtlbal.weighting.base import WeightedLosses


class Recording(GradNorm):
    """GradNorm that keeps the norms the Balancer gave it."""

    seen: Tensor | None = None

    def objectives(self, losses: Tensor, ctx: StepContext) -> WeightedLosses:  # type: ignore[override]
        self.seen = ctx.layer_grad_norms
        return super().objectives(losses, ctx)


class Twice(nn.Module):
    """The same Linear applied twice (its rows are concatenated by the engine)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.b(torch.tanh(self.a(x)))))


# few rows, wide layers: the identity pays
def _linear() -> tuple[nn.Module, int, Tensor]:
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 16)), 16, torch.randn(4, 5)


def _sequence() -> tuple[nn.Module, int, Tensor]:
    trunk = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Flatten())
    return trunk, 3 * 16, torch.randn(2, 3, 5)  # rows: batch × tokens


def _twice() -> tuple[nn.Module, int, Tensor]:
    return Twice(), 16, torch.randn(3, 5)


# the loop: a convolution, a normalisation layer, many rows


def _conv() -> tuple[nn.Module, int, Tensor]:
    trunk = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.Flatten()
    )
    return trunk, 3 * 4 * 4, torch.randn(5, 2, 6, 6)


def _norm_last() -> tuple[nn.Module, int, Tensor]:
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6)), 6, torch.randn(12, 5)


def _many_rows() -> tuple[nn.Module, int, Tensor]:
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 7)), 7, torch.randn(40, 5)


IDENTITY = {"linear": _linear, "sequence": _sequence, "applied-twice": _twice}
LOOP = {"conv": _conv, "layernorm": _norm_last, "many-rows": _many_rows}
MODELS: dict[str, Callable[[], tuple[nn.Module, int, Tensor]]] = {**IDENTITY, **LOOP}


def _problem(model: str, m: int) -> tuple[nn.Module, nn.ModuleList, Tensor, Tensor]:
    torch.manual_seed(0)
    trunk, width, x = MODELS[model]()
    heads = nn.ModuleList(nn.Sequential(nn.Tanh(), nn.Linear(width, 2)) for _ in range(m))
    trunk.double()
    heads.double()
    y = torch.randn(m, x.shape[0], 2, dtype=torch.float64)
    return trunk, heads, x.double(), y


def _losses(trunk: nn.Module, heads: nn.ModuleList, x: Tensor, y: Tensor) -> list[Tensor]:
    z = trunk(x)
    return [(t + 1.0) * (h(z) - y[t]).pow(2).mean() for t, h in enumerate(heads)]


def _naive(losses: list[Tensor], layer: list[Tensor]) -> Tensor:
    out = []
    for v in losses:
        gs = torch.autograd.grad(v, layer, retain_graph=True)
        out.append(torch.sqrt(sum(g.pow(2).sum() for g in gs)))  # type: ignore[arg-type]
    return torch.stack(out)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("m", [2, 5])
def test_layerwise_norms_equal_the_per_task_loop(
    model: str, m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    loops = []
    original = mtlbal.balancer.task_grad_norms

    def counting(*args: object, **kwargs: object) -> Tensor:
        loops.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mtlbal.balancer, "task_grad_norms", counting)
    trunk, heads, x, y = _problem(model, m)
    gn = Recording(m)
    bal = mtlbal.Balancer(trunk, weighting=gn)
    layer = gn.grad_norm_params()
    for _ in range(2):
        losses = _losses(trunk, heads, x, y)
        ref = _naive(losses, layer)
        bal.backward(losses)
        assert gn.seen is not None
        torch.testing.assert_close(gn.seen, ref, rtol=1e-12, atol=1e-14)
    assert len(loops) == (0 if model in IDENTITY else 2)  # which path ran


def test_a_layer_tied_outside_the_trunk_falls_back_exactly() -> None:
    # the last layer's weight is also read by a head: not covered by the identity, so its
    # per-task gradients come from the exact batched fallback
    m = 3
    trunk, heads, x, y = _problem("linear", m)
    last = trunk[2]
    gn = Recording(m)
    bal = mtlbal.Balancer(trunk, weighting=gn)
    assert bal._norm_capture is not None

    def losses() -> list[Tensor]:
        z = trunk(x)
        extra = (z @ last.weight).sum(1, keepdim=True) * 1e-2  # a head that reads W too
        return [(t + 1.0) * (h(z) + extra - y[t]).pow(2).mean() for t, h in enumerate(heads)]

    ls = losses()
    ref = _naive(ls, gn.grad_norm_params())
    bal.backward(ls)
    assert gn.seen is not None
    torch.testing.assert_close(gn.seen, ref, rtol=1e-12, atol=1e-14)


def test_same_step_as_the_dense_engine() -> None:
    # the whole GradNorm step (its weights' gradient, the network's gradient) is the one of
    # the per-task loop (engine="dense" keeps the loop)
    m = 4
    grads = []
    for engine in ("auto", "dense"):
        trunk, heads, x, y = _problem("sequence", m)
        gn = GradNorm(m)
        bal = mtlbal.Balancer(trunk, weighting=gn, engine=engine)  # type: ignore[arg-type]
        assert (bal._norm_capture is None) == (engine == "dense")
        opt = mtlbal.wrap(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1), bal)
        for _ in range(3):
            opt.zero_grad()
            opt.backward(_losses(trunk, heads, x, y))
            opt.step()
        grads.append([gn.weights.grad.clone(), *[p.grad.clone() for p in trunk.parameters()]])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_an_explicit_parameter_subset_keeps_the_loop() -> None:
    # W = the weight alone (not its bias): no layer owns exactly it, the norms take the loop
    trunk, heads, x, y = _problem("linear", 2)
    gn = Recording(2, layer=[trunk[2].weight])
    bal = mtlbal.Balancer(trunk, weighting=gn)
    assert bal._norm_capture is None
    ls = _losses(trunk, heads, x, y)
    ref = _naive(ls, [trunk[2].weight])
    bal.backward(ls)
    assert gn.seen is not None
    torch.testing.assert_close(gn.seen, ref, rtol=1e-12, atol=1e-14)


def test_gramian_when_every_head_also_reads_a_trunk_weight() -> None:
    # the task split of the layer-wise engine must not count the trunk twice when a task enters
    # the shared part at two nodes, one below the other (here: z, and z @ W shared by all)
    m = 3
    trunk, heads, x, y = _problem("linear", m)
    last = trunk[2]
    bal = mtlbal.Balancer(trunk, aggregator=mtlbal.aggregation.Sum(), diagnostics=True)
    z = trunk(x)
    extra = (z @ last.weight[:, :9]).sum(1, keepdim=True) * 1e-2
    ls = [(t + 1.0) * (h(z) + extra - y[t]).pow(2).mean() for t, h in enumerate(heads)]
    params = list(trunk.parameters())
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, params, retain_graph=True)])
        for v in ls
    ]
    jac = torch.stack(rows)
    info = bal.backward(ls)
    assert info.gramian is not None
    torch.testing.assert_close(info.gramian, jac @ jac.T, rtol=1e-12, atol=1e-14)
