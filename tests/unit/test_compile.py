"""torch.compile: every path (loss level, cut point, parameters with both engines) against eager.

The compiled models use the default backend, inductor (it needs a C++ compiler on CPU; the
tests are skipped without one). Inductor's backward cannot run batched (``is_grads_batched``):
at the parameters the per-task gradients are then taken one task at a time (the exact fallback
of :mod:`mtlbal.engine.fallback`), warned once. The compiled models are compiled with
``torch._functorch.config.donated_buffer = False`` (the documented recipe: the per-task
gradients take several backward passes through the compiled region). The fallback itself is
also tested without the compiler, on an op whose backward refuses a batched cotangent.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
import torch._functorch.config
from torch import Tensor, nn

import mtlbal
from mtlbal.aggregation import MGDA, UPGrad
from mtlbal.engine import BatchedBackwardFallbackWarning
from mtlbal.engine.fallback import is_batching_error
from mtlbal.weighting import UncertaintyWeighting

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("cc") is None,
    reason="inductor needs a C++ compiler on CPU",
)


class Net(nn.Module):
    def __init__(self, m: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(m)])

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    with torch._functorch.config.patch(donated_buffer=False):
        yield
    torch._dynamo.reset()


def _data(steps: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(7, 5, generator=g), torch.randn(3, 7, generator=g)) for _ in range(steps)]


def _losses(outs: list[Tensor], y: Tensor) -> dict[str, Tensor]:
    return {f"t{i}": ((o - yy) ** 2).mean() for i, (o, yy) in enumerate(zip(outs, y))}


def _run(
    model: Net,
    forward: Callable[[Tensor], list[Tensor]],
    make: Callable[[Net], mtlbal.Balancer],
    steps: int,
) -> tuple[list[list[Tensor]], list[mtlbal.StepInfo], list[Any]]:
    b = make(model)
    grads, infos = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in _data(steps):
            model.zero_grad(set_to_none=True)
            for p in b.parameters():
                p.grad = None
            infos.append(b.backward(_losses(forward(x), y)))
            ps = [*model.parameters(), *b.parameters()]
            grads.append([p.grad.clone() if p.grad is not None else p.new_zeros(()) for p in ps])
    fallback = [w for w in caught if issubclass(w.category, BatchedBackwardFallbackWarning)]
    return grads, infos, fallback


def _grad(p: Tensor) -> Tensor:
    assert p.grad is not None
    return p.grad.clone()


def _compare(make: Callable[[Net], mtlbal.Balancer], steps: int = 3) -> tuple[list[Any], Any]:
    torch.manual_seed(0)
    eager = Net()
    compiled = copy.deepcopy(eager)
    g_e, _, w_e = _run(eager, eager, make, steps)
    g_c, infos, w_c = _run(compiled, torch.compile(compiled), make, steps)
    assert not w_e
    for step_e, step_c in zip(g_e, g_c):
        for a, c in zip(step_e, step_c):
            torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)
    return w_c, infos


@needs_compiler
def test_loss_level_compiled_model() -> None:
    warned, infos = _compare(lambda m: mtlbal.Balancer(m.trunk, weighting=UncertaintyWeighting(3)))
    assert not warned and all("per_task_backward" not in i.extras for i in infos)


@needs_compiler
def test_cut_point_compiled_model() -> None:
    warned, infos = _compare(lambda m: mtlbal.Balancer(m.trunk, aggregator=MGDA(), at=m.trunk))
    assert not warned and all("per_task_backward" not in i.extras for i in infos)


@needs_compiler
@pytest.mark.parametrize("engine", ["dense", "layerwise"])
@pytest.mark.parametrize(("agg", "chunk"), [(MGDA, None), (UPGrad, 1)])
def test_params_compiled_model_falls_back_exactly(
    engine: str, agg: Callable[[], Any], chunk: int | None
) -> None:
    def make(m: Net) -> mtlbal.Balancer:
        return mtlbal.Balancer(
            m.trunk,
            aggregator=agg(),
            engine=engine,  # type: ignore[arg-type]
            chunk_size=chunk,
        )

    warned, infos = _compare(make)
    # inductor's backward cannot be batched: the fallback is chosen once and reported once
    assert len(warned) == 1, [str(w.message) for w in warned]
    assert "one task at a time" in str(warned[0].message)
    assert all(isinstance(i.extras.get("per_task_backward"), str) for i in infos)


@needs_compiler
def test_compiled_forward_and_losses_recipe() -> None:
    """The user-facing recipe: compile a function that runs the forward and the losses; the
    Balancer stays outside."""
    torch.manual_seed(0)
    eager = Net()
    compiled = copy.deepcopy(eager)

    def step_fn(model: Net) -> Callable[[Tensor, Tensor], dict[str, Tensor]]:
        def fn(x: Tensor, y: Tensor) -> dict[str, Tensor]:
            return _losses(model(x), y)

        return fn

    fns = [step_fn(eager), torch.compile(step_fn(compiled))]
    out = []
    for model, fn in zip((eager, compiled), fns):
        b = mtlbal.Balancer(model.trunk, aggregator=UPGrad(), engine="dense")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BatchedBackwardFallbackWarning)
            for x, y in _data(2):
                model.zero_grad(set_to_none=True)
                b.backward(fn(x, y))
        out.append([p.grad for p in model.parameters()])
    for a, c in zip(*out):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the fallback without compile
class _NoBatch(torch.autograd.Function):
    """Identity whose backward refuses a batched cotangent, like inductor's kernels do."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        if torch._C._functorch.is_legacy_batchedtensor(g):
            raise RuntimeError("Batching rule not implemented for aten::mm.out (test)")
        return g


class _Plain(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return g


class _Broken(torch.autograd.Function):
    """Identity whose backward fails for an unrelated reason."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        raise RuntimeError("something else went wrong")


def _unbatchable_trunk(fn: Any) -> Net:
    torch.manual_seed(0)
    net = Net()
    inner = net.trunk

    class T(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            return self.inner[2](fn.apply(self.inner[1](self.inner[0](x))))

    net.trunk = T()  # type: ignore[assignment]
    return net


@pytest.mark.parametrize("engine", ["dense", "layerwise"])
@pytest.mark.parametrize("chunk", [None, 1])
def test_fallback_matches_batched_and_warns_once(engine: str, chunk: int | None) -> None:
    plain = _unbatchable_trunk(_NoBatch)
    ref = _unbatchable_trunk(_Plain)  # same init, a backward that batches
    results = []
    for net in (ref, plain):
        b = mtlbal.Balancer(
            net.trunk,
            aggregator=UPGrad(),
            engine=engine,  # type: ignore[arg-type]
            chunk_size=chunk,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            infos = []
            for x, y in _data(3):
                net.zero_grad(set_to_none=True)
                infos.append(b.backward(_losses(net(x), y)))
        warned = [w for w in caught if issubclass(w.category, BatchedBackwardFallbackWarning)]
        results.append(([_grad(p) for p in net.parameters()], warned, infos))
    (g_ref, w_ref, i_ref), (g, w, infos) = results
    assert not w_ref and all("per_task_backward" not in i.extras for i in i_ref)
    assert len(w) == 1 and "aten::mm.out" in str(w[0].message)
    assert all("aten::mm.out" in i.extras["per_task_backward"] for i in infos)
    for a, c in zip(g_ref, g):
        torch.testing.assert_close(c, a)


@pytest.mark.parametrize("engine", ["dense", "layerwise"])
def test_unrelated_error_propagates_and_writes_nothing(engine: str) -> None:
    net = _unbatchable_trunk(_Broken)
    b = mtlbal.Balancer(net.trunk, aggregator=MGDA(), engine=engine)  # type: ignore[arg-type]
    x, y = _data(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchedBackwardFallbackWarning)
        with pytest.raises(RuntimeError, match="something else went wrong"):
            b.backward(_losses(net(x), y))
    assert all(p.grad is None for p in net.parameters())
    assert b.step_count == 0 and b._batched_backward.mode is None


class _Donated(torch.autograd.Function):
    """Identity whose backward refuses a retained graph, like a compiled region with donated
    buffers does."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        raise RuntimeError(
            "This backward function was compiled with non-empty donated buffers which requires "
            "create_graph=False and retain_graph=False (test)"
        )


def test_donated_buffers_say_what_to_do() -> None:
    net = _unbatchable_trunk(_Donated)
    b = mtlbal.Balancer(net.trunk, aggregator=MGDA(), engine="dense")
    x, y = _data(1)[0]
    with pytest.raises(RuntimeError, match="donated_buffer = False"):
        b.backward(_losses(net(x), y))
    assert all(p.grad is None for p in net.parameters())


# ---------------------------------------------------------------- the step itself compiled
@needs_compiler
@pytest.mark.parametrize(
    ("path", "backend"),
    [
        ("loss", "eager"),
        ("dense", "aot_eager"),
        pytest.param("cut", "eager", marks=pytest.mark.slow),
        pytest.param("layerwise", "eager", marks=pytest.mark.slow),
    ],
)
def test_compiled_step(path: str, backend: str) -> None:
    """``torch.compile`` of a whole step (forward, losses, ``balancer.backward``): dynamo
    breaks the graph around the autograd calls and the solvers and runs them eagerly; the
    result is the eager one. Backends ``eager`` / ``aot_eager`` (the tracing is under test;
    inductor here takes about 30 s to compile, and was checked by hand: the fallback runs
    inside the compiled step, on "Cannot access storage of BatchedTensorImpl"); the cut point
    and the layer-wise engine are marked slow (about 5-10 s of tracing each)."""
    configs: dict[str, Callable[[Net], mtlbal.Balancer]] = {
        "loss": lambda m: mtlbal.Balancer(m.trunk, weighting=UncertaintyWeighting(3)),
        "cut": lambda m: mtlbal.Balancer(m.trunk, aggregator=MGDA(), at=m.trunk),
        "layerwise": lambda m: mtlbal.Balancer(
            m.trunk, aggregator=MGDA(), engine="layerwise", chunk_size=1
        ),
        "dense": lambda m: mtlbal.Balancer(m.trunk, aggregator=UPGrad(), engine="dense"),
    }
    torch.manual_seed(0)
    eager = Net()
    compiled = copy.deepcopy(eager)
    out = []
    for model, comp in ((eager, False), (compiled, True)):
        b = configs[path](model)

        def step(x: Tensor, y: Tensor, model: Net = model, b: mtlbal.Balancer = b) -> Tensor:
            return b.backward(_losses(model(x), y)).weights

        fn = torch.compile(step, backend=backend) if comp else step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BatchedBackwardFallbackWarning)
            for x, y in _data(1):  # one step: a second one recompiles (compile time)
                model.zero_grad(set_to_none=True)
                fn(x, y)
        out.append([_grad(p) for p in model.parameters()] + [p.detach() for p in b.parameters()])
    for a, c in zip(*out):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


class _Switch(torch.autograd.Function):
    """Identity whose backward refuses a batched cotangent once ``refuse`` is set."""

    refuse = False

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        if _Switch.refuse and torch._C._functorch.is_legacy_batchedtensor(g):
            raise RuntimeError("Batching rule not implemented for aten::mm.out (test)")
        return g


def test_batching_failure_after_batched_steps() -> None:
    """Batched at first, unbatchable later (e.g. compiled since): the step whose graph the
    failed batched backward freed is refused with nothing written, the next ones fall back."""
    net = _unbatchable_trunk(_Switch)
    b = mtlbal.Balancer(net.trunk, aggregator=MGDA(), engine="dense")
    (x0, y0), (x1, y1), (x2, y2) = _data(3)
    _Switch.refuse = False
    try:
        b.backward(_losses(net(x0), y0))
        assert b._batched_backward.mode == "batched"
        _Switch.refuse = True
        net.zero_grad(set_to_none=True)
        with (
            pytest.warns(BatchedBackwardFallbackWarning),
            pytest.raises(RuntimeError, match="cannot be completed"),
        ):
            b.backward(_losses(net(x1), y1))
        assert all(p.grad is None for p in net.parameters()) and b.step_count == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error", BatchedBackwardFallbackWarning)
            info = b.backward(_losses(net(x2), y2))
        assert "aten::mm.out" in info.extras["per_task_backward"] and b.step_count == 2
    finally:
        _Switch.refuse = False


def test_batching_errors_recognised() -> None:
    for msg in (
        "Batching rule not implemented for aten::mm.out",
        "Cannot access data pointer of Tensor that doesn't have storage",
        "vmap: inplace arithmetic(self, *extra_args) is not possible",
    ):
        assert is_batching_error(RuntimeError(msg))
    # a compiled step: inductor's kernels on a batched tensor
    assert is_batching_error(NotImplementedError("Cannot access storage of BatchedTensorImpl"))
    assert not is_batching_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_batching_error(ValueError("Batching rule not implemented"))


@needs_compiler
@pytest.mark.parametrize("mode", ["linear", "jacobian", "cut"])
def test_accumulation_window_compiled_model(mode: str) -> None:
    """Gradient accumulation (every window mode) on a compiled model equals eager."""

    def make(m: Net) -> mtlbal.Balancer:
        if mode == "linear":
            return mtlbal.Balancer(m.trunk, weighting=UncertaintyWeighting(3), accumulate=2)
        if mode == "jacobian":
            return mtlbal.Balancer(m.trunk, aggregator=UPGrad(), accumulate=2)
        return mtlbal.Balancer(m.trunk, aggregator=MGDA(), at=m.trunk, accumulate=2)

    def run(model: Net, forward: Callable[[Tensor], list[Tensor]]) -> list[list[Tensor]]:
        b = make(model)
        assert b._accum_mode == mode
        out = []
        for x, y in _data(2):
            model.zero_grad(set_to_none=True)
            for p in b.parameters():
                p.grad = None
            assert b.backward(_losses(forward(x[:4]), y[:, :4])).pending
            info = b.backward(_losses(forward(x[4:]), y[:, 4:]))
            assert info.micro_batches == 2
            out.append([_grad(p) for p in [*model.parameters(), *b.parameters()]])
        return out

    torch.manual_seed(0)
    eager = Net()
    compiled = copy.deepcopy(eager)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BatchedBackwardFallbackWarning)
        got = run(compiled, torch.compile(compiled))
    for step_e, step_c in zip(run(eager, eager), got):
        for a, c in zip(step_e, step_c):
            torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)
