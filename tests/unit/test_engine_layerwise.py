"""The layer-wise engine against a naive loop of per-task backward passes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import mtlbal
from mtlbal.aggregation import MGDA
from mtlbal.engine.layerwise import LayerwiseCapture, layerwise_per_task_grads
from mtlbal.transforms.base import GradientTransform

M = 3


def reference(losses: Tensor, params: list[Tensor]) -> Tensor:
    """J [m, n] from one torch.autograd.grad call per task."""
    rows = []
    for t in range(losses.shape[0]):
        gs = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(gs, params)
                ]
            )
        )
    return torch.stack(rows)


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}


def check(
    trunk: nn.Module,
    forward: Callable[[], Tensor | list[Tensor]],
    dtype: torch.dtype,
    *,
    chunk_size: int | None = None,
    expect_covered: int | None = None,
    extra_shared: list[Tensor] | None = None,
    mix: Callable[[Tensor], Tensor] | None = None,
    expect_split: bool | None = None,
) -> None:
    trunk.to(dtype)
    cap = LayerwiseCapture([trunk])
    task_losses: list[Tensor] | None = None
    out = forward()
    if mix is not None:
        task_losses = list(out.unbind(0)) if isinstance(out, Tensor) else list(out)
        losses = mix(torch.stack(task_losses))
    else:
        losses = out
    shared = [p for p in trunk.parameters() if p.requires_grad] + (extra_shared or [])
    J = reference(losses, shared)
    eng = layerwise_per_task_grads(
        losses, cap.take(), shared, chunk_size=chunk_size, task_losses=task_losses
    )
    if expect_split is not None:
        assert eng.task_split == expect_split
    if expect_covered is not None:
        assert len(eng.terms) == expect_covered
    G = eng.gramian()
    torch.testing.assert_close(G, J @ J.T, **tol(dtype))
    torch.testing.assert_close(eng.jacobian(), J, **tol(dtype))
    w = torch.linspace(0.5, 1.5, losses.shape[0], dtype=dtype)
    for p in shared:
        p.grad = None
    eng.apply_weights(w)
    got = torch.cat([p.grad.reshape(-1) for p in shared])  # type: ignore[union-attr]
    torch.testing.assert_close(got, w @ J, **tol(dtype))
    # accumulate on top of existing .grad, and apply_direction
    eng.apply_direction(torch.ones(J.shape[1], dtype=dtype))
    got2 = torch.cat([p.grad.reshape(-1) for p in shared])  # type: ignore[union-attr]
    torch.testing.assert_close(got2, w @ J + 1, **tol(dtype))
    cap.remove()


def heads_losses(z: Tensor, m: int = M, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    z = z.reshape(z.shape[0], -1)
    ws = [torch.randn(z.shape[1], 2, generator=g, dtype=z.dtype) for _ in range(m)]
    return torch.stack([((z @ w) ** 2).mean() + (z @ w).sin().sum() for w in ws])


DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_mlp(dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Linear(5, 7, bias=bias), nn.ReLU(inplace=True), nn.Linear(7, 4, bias=bias)
    )
    x = torch.randn(6, 5, dtype=dtype)
    check(trunk, lambda: heads_losses(trunk(x)), dtype, expect_covered=4 if bias else 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_batch_takes_explicit_path(dtype: torch.dtype) -> None:
    # N=40 rows > d: the per-task weight-gradient path is cheaper and must agree too
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 3))
    x = torch.randn(40, 3, dtype=dtype)
    check(trunk, lambda: heads_losses(trunk(x)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_input(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 5))
    x = torch.randn(3, 7, 4, dtype=dtype)
    check(trunk, lambda: heads_losses(trunk(x).mean(1) + trunk(x)[:, 0]), dtype, expect_covered=6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv(dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=bias),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, (2, 3), stride=2, dilation=(1, 2), bias=bias),
        nn.Conv2d(4, 2, 3, padding="same", padding_mode="reflect", bias=bias),
    )
    x = torch.randn(2, 2, 7, 9, dtype=dtype)
    check(trunk, lambda: heads_losses(trunk(x)), dtype, expect_covered=8 if bias else 5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv1d_batchnorm1d(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv1d(3, 4, 3, padding="same"),
        nn.BatchNorm1d(4),
        nn.Conv1d(4, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(12, 5),
        nn.BatchNorm1d(5),
    )
    x = torch.randn(4, 3, 12, dtype=dtype)
    check(trunk, lambda: heads_losses(trunk(x)), dtype, expect_covered=10)


def test_batchnorm_eval_uses_running_stats() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    trunk(torch.randn(8, 3))  # update running stats
    trunk.eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    check(trunk, lambda: heads_losses(trunk(x)), torch.float64, expect_covered=6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_padding_and_repeats(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(11, 4, padding_idx=0)
    trunk = nn.Sequential(emb, nn.Linear(4, 3))
    idx = torch.tensor([[1, 2, 0, 2], [5, 1, 1, 0], [10, 9, 2, 3]])
    check(trunk, lambda: heads_losses(trunk(idx).sum(1)), dtype, expect_covered=3)
    # many rows (more rows than the vocabulary): explicit scatter path
    idx2 = torch.randint(0, 11, (8, 30))
    check(trunk, lambda: heads_losses(trunk(idx2).mean(1)), dtype, expect_covered=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_tying_and_reuse(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    a = nn.Linear(4, 4)
    b = nn.Linear(4, 4)
    b.weight = a.weight  # tied weight, separate biases
    trunk = nn.ModuleList([a, b])

    def fwd() -> Tensor:
        x = torch.randn(5, 4, dtype=dtype, generator=torch.Generator().manual_seed(2))
        h = torch.tanh(a(x))
        h = torch.tanh(a(h))  # the same module twice
        return heads_losses(b(h))

    check(trunk, fwd, dtype, expect_covered=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_embedding_output_projection_falls_back(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(7, 4)
    lin = nn.Linear(4, 4)
    trunk = nn.ModuleList([emb, lin])
    idx = torch.tensor([1, 3, 3, 6])

    def fwd() -> Tensor:
        h = torch.tanh(lin(emb(idx)))
        logits = h @ emb.weight.T  # the embedding used functionally: not recorded
        return heads_losses(logits)

    check(trunk, fwd, dtype, expect_covered=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tasks_that_do_not_reach_a_layer(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    l1, l2, l3 = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)
    trunk = nn.ModuleList([l1, l2, l3])
    x = torch.randn(5, 3, dtype=dtype)

    def fwd() -> Tensor:
        h = torch.relu(l1(x))
        h2 = l2(h)
        unused = l3(h)  # recorded, reaches no loss
        del unused
        return torch.stack(
            [h2.pow(2).sum(), h.sum(), (h2[:, 0] * h.sum(1)).mean(), h2.exp().mean()]
        )

    check(trunk, fwd, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_smaller_than_m(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4))
    x = torch.randn(6, 5, dtype=dtype)
    check(trunk, lambda: heads_losses(trunk(x), m=5), dtype, chunk_size=2)


class Scale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.s


@pytest.mark.parametrize("dtype", DTYPES)
def test_fallback_module(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(5, 3, dtype=dtype)
    check(trunk, lambda: heads_losses(trunk(x)), dtype, expect_covered=4)


def test_input_modified_in_place_after_the_call_is_not_used_silently() -> None:
    # the recorded input is stale: the engine must not build gradients from it (autograd
    # itself refuses this graph, and so does the engine)
    lin = nn.Linear(3, 3).double()
    cap = LayerwiseCapture([lin])
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    h = x * 2
    y = lin(h)
    h.mul_(3)
    losses = heads_losses(y + h.sum())
    with pytest.raises(RuntimeError, match="inplace"):
        layerwise_per_task_grads(losses, cap.take(), list(lin.parameters()))
    cap.remove()


# ---------------------------------------------------------------------------- the Balancer
def _model() -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8), Scale(8))
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)])
    return trunk, heads


@pytest.mark.parametrize("engine", ["layerwise", "auto"])
def test_balancer_layerwise_equals_dense(engine: str) -> None:
    x = torch.randn(10, 6)
    ys = torch.randn(3, 10, 1)
    grads = {}
    for eng in ("dense", engine):
        trunk, heads = _model()
        b = mtlbal.Balancer(trunk, aggregator=MGDA(), engine=eng)  # type: ignore[arg-type]
        for _ in range(2):  # .grad accumulates over two backward calls
            z = trunk(x)
            b.backward({f"t{i}": (h(z) - ys[i]).pow(2).mean() for i, h in enumerate(heads)})
        grads[eng] = [p.grad.clone() for p in [*trunk.parameters(), *heads.parameters()]]  # type: ignore[union-attr]
        b.remove()
    for a, c in zip(grads["dense"], grads[engine]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


class HalfMask(GradientTransform):
    """Zeroes the second half of one parameter's per-task gradients."""

    def __init__(self, param: Tensor) -> None:
        super().__init__()
        self.param = param

    def applies_to(self, param: Tensor) -> bool:
        return param is self.param

    def per_task(self, param: Tensor, grads: Tensor) -> Tensor:
        flat = grads.reshape(grads.shape[0], -1).clone()
        flat[:, flat.shape[1] // 2 :] = 0
        return flat.reshape(grads.shape)


def test_balancer_transform_sees_per_task_grads() -> None:
    x = torch.randn(10, 6)
    ys = torch.randn(3, 10, 1)
    grads = {}
    for eng in ("dense", "layerwise"):
        trunk, heads = _model()
        mask = HalfMask(trunk[2].weight)
        b = mtlbal.Balancer(trunk, aggregator=MGDA(), transforms=mask, engine=eng)  # type: ignore[arg-type]
        z = trunk(x)
        info = b.backward({f"t{i}": (h(z) - ys[i]).pow(2).mean() for i, h in enumerate(heads)})
        assert info.gramian is not None
        grads[eng] = [info.gramian] + [p.grad.clone() for p in trunk.parameters()]  # type: ignore[union-attr]
        b.remove()
    assert bool((trunk[2].weight.grad.reshape(-1)[32:] == 0).all())  # type: ignore[union-attr]
    for a, c in zip(grads["dense"], grads["layerwise"]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_balancer_remove_drops_the_hooks() -> None:
    trunk, _ = _model()
    b = mtlbal.Balancer(trunk, aggregator=MGDA(), engine="layerwise")
    assert b._capture is not None and b._capture.handles
    b.remove()
    trunk(torch.randn(2, 6))
    assert b._capture is None
    assert not trunk[0]._forward_hooks


def heads_list(z: Tensor, m: int = M) -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    z = z.reshape(z.shape[0], -1)
    ws = [torch.randn(z.shape[1], 2, generator=g, dtype=z.dtype) for _ in range(m)]
    return [((z @ w) ** 2).mean() + (z @ w).sin().sum() for w in ws]


def mixing(losses: Tensor) -> Tensor:
    """A loss weighting that mixes tasks (not elementwise): ℓ = A L + L² / 2."""
    m = losses.shape[0]
    a = torch.eye(m, dtype=losses.dtype) + 0.3 * torch.ones(m, m, dtype=losses.dtype)
    return a @ losses + losses.pow(2) / 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_per_task_heads_then_batched_trunk(dtype: torch.dtype, chunk_size: int | None) -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), Scale(4))
    x = torch.randn(6, 5, dtype=dtype)

    def fwd() -> list[Tensor]:
        z = trunk(x)
        return [*heads_list(z), z.sum() * 0.1]  # 4 tasks; the last reads z directly

    check(trunk, fwd, dtype, mix=mixing, chunk_size=chunk_size, expect_split=True)


def test_split_declined_when_a_task_owns_a_shared_layer() -> None:
    torch.manual_seed(0)
    l1, l2 = nn.Linear(3, 4), nn.Linear(4, 2)
    trunk = nn.ModuleList([l1, l2])
    x = torch.randn(5, 3, dtype=torch.float64)

    def fwd() -> list[Tensor]:
        h = torch.tanh(l1(x))
        return [l2(h).pow(2).sum(), h.sum(), h.pow(3).mean()]  # l2 reached by task 0 only

    check(trunk, fwd, torch.float64, mix=mixing, expect_split=False)


def test_split_declined_when_the_weighting_reads_the_model() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(3, 4)
    x = torch.randn(5, 3, dtype=torch.float64)

    def fwd() -> list[Tensor]:
        return heads_list(lin(x))

    def mix(losses: Tensor) -> Tensor:
        return losses * lin.weight.sum()

    check(lin, fwd, torch.float64, mix=mix, expect_split=False)


def test_balancer_with_learnable_weighting_equals_dense() -> None:
    # ℓ_t = exp(-s_t) L_t + s_t: heads get Σ_t ∂ℓ_t/∂q through the weighting's Jacobian, the
    # log-variances get their own gradient
    x = torch.randn(10, 6)
    ys = torch.randn(3, 10, 1)
    grads = {}
    for eng in ("dense", "layerwise"):
        trunk, heads = _model()
        uw = mtlbal.weighting.UncertaintyWeighting(3)
        with torch.no_grad():
            for p in uw.parameters():
                p.copy_(torch.tensor([0.3, -0.2, 0.5]).view_as(p))
        b = mtlbal.Balancer(trunk, weighting=uw, aggregator=MGDA(), engine=eng)  # type: ignore[arg-type]
        z = trunk(x)
        b.backward({f"t{i}": (h(z) - ys[i]).pow(2).mean() for i, h in enumerate(heads)})
        ps = [*trunk.parameters(), *heads.parameters(), *b.parameters()]
        grads[eng] = [p.grad.clone() for p in ps]  # type: ignore[union-attr]
        b.remove()
    assert len(grads["dense"]) == len(grads["layerwise"])
    for a, c in zip(grads["dense"], grads["layerwise"]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_mixed_dtypes_between_input_and_output() -> None:
    # as under autocast: the recorded input is float32, the layer computes in float64 here
    torch.manual_seed(0)
    lin = nn.Linear(3, 4)
    x = torch.randn(5, 3)
    cap = LayerwiseCapture([lin])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
    assert out.dtype == torch.bfloat16 and x.dtype == torch.float32
    losses = heads_losses(out.double())
    shared = list(lin.parameters())
    J = reference(losses, shared)
    eng = layerwise_per_task_grads(losses, cap.take(), shared)
    assert len(eng.terms) == 2
    gram = eng.gramian()
    assert gram.dtype == torch.float32  # a Gramian is formed in at least float32
    # δ is bf16 (8 bits of mantissa) in both computations; the reference's weight gradient is
    # a bf16 matmul, the engine's an fp32 one: they agree to bf16 precision
    torch.testing.assert_close(gram, (J @ J.T).float(), rtol=2e-2, atol=1e-3)
    cap.remove()


def test_subclass_with_own_forward_is_not_trusted() -> None:
    # an nn.Linear subclass that computes something else: its weight gradient is not δᵀa, so
    # the engine must take it densely (exact), not rebuild it from the recorded input
    class Scaled(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return 3.0 * nn.functional.linear(x.pow(2), self.weight, self.bias)

    torch.manual_seed(0)
    lin = Scaled(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    cap = LayerwiseCapture([lin])
    assert cap.modules == []
    losses = heads_losses(lin(x))
    shared = list(lin.parameters())
    J = reference(losses, shared)
    eng = layerwise_per_task_grads(losses, cap.take(), shared)
    torch.testing.assert_close(eng.jacobian(), J)
    torch.testing.assert_close(eng.gramian(), J @ J.T)
    cap.remove()


def test_transform_meaning_is_the_same_on_every_engine() -> None:
    # a transform whose per-task and combined steps differ: where per-task gradients of a
    # parameter are formed (a gradient method at the parameters), `per_task` acts on them and
    # the combination is written as is; `combined` acts only where they are not formed. Both
    # engines must give the same .grad (the dense engine used to apply both: 2x .grad)
    import mtlbal
    from mtlbal.transforms import GradientTransform

    class Halve(GradientTransform):
        def per_task(self, param: Tensor, grads: Tensor) -> Tensor:
            return 0.5 * grads

        def combined(self, param: Tensor, grad: Tensor) -> Tensor:
            return 2.0 * grad

        def applies_to(self, param: Tensor) -> bool:
            return param.dim() == 2

    torch.manual_seed(0)
    grads = {}
    for engine in ("dense", "layerwise"):
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
        x = torch.randn(7, 4, dtype=torch.float64)
        b = mtlbal.Balancer(
            trunk, aggregator=mtlbal.aggregation.UPGrad(), transforms=Halve(), engine=engine
        )
        b.backward(list(heads_losses(trunk(x)).unbind(0)))
        grads[engine] = [p.grad.clone() for p in trunk.parameters()]  # type: ignore[union-attr]
        b.remove()
    for a, c in zip(grads["dense"], grads["layerwise"]):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    # and the meaning: the aggregator sees the transformed per-task gradients (weight
    # matrices halved, biases as they are) and their combination is what is written
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    losses = heads_losses(trunk(x))
    J = reference(losses, list(trunk.parameters()))
    w = mtlbal.aggregation.UPGrad().weights(J @ J.T)
    # the Gramian the aggregator saw is that of the transformed gradients
    scale = torch.cat(
        [
            torch.full((p.numel(),), 0.5 if p.dim() == 2 else 1.0, dtype=torch.float64)
            for p in trunk.parameters()
        ]
    )
    Jt = J * scale
    wt = mtlbal.aggregation.UPGrad().weights(Jt @ Jt.T)
    expected = wt @ Jt
    got = torch.cat([g.reshape(-1) for g in grads["dense"]])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(w, wt)  # the transform did change what the solver saw
