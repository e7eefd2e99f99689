"""The Balancer's promises on models other than the small MLP of ``conftest.make_problem``.

Models: a small CNN (Conv2d + BatchNorm2d + ReLU, 8x8 inputs, train mode), a tiny transformer
encoder (``nn.Embedding`` + ``nn.TransformerEncoderLayer``, batch_first, d_model 16), and a
model with a layer applied twice, a bare ``nn.Parameter`` in the shared part (one on the trunk
module, one passed on its own) and a head that reuses a trunk layer. On each, for a
representative subset of the registry:

1. engine parity: the dense and layer-wise engines (and chunk_size 1 / 2, diagnostics) give the
   same ``.grad`` (float64, tight); a cut point equals the parameters for fixed weights;
2. a step refused at the last moment before the commit changes nothing a user can see, and the
   next step equals the one taken without it;
3. equal weights are bitwise ``sum(losses).backward()``, at the parameters and at a cut point,
   for losses given as a dict, a list or a 1-D tensor, with float32 and float64 mixed.

BatchNorm's running statistics are updated by the user's forward, not by the Balancer: a
refused step does not roll them back (documented in docs/concepts.md, "The step").
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import mtlbal
from registry import REGISTRY, Entry, feed_validation

from .test_transaction import assert_same, refuse_then_step

M = 3
DT = torch.float64


@dataclass
class Model:
    trunk: nn.Module
    heads: nn.ModuleList
    extra: list[nn.Parameter]  # bare parameters of the shared part, outside the trunk module
    forward: Callable[[], list[Tensor]]

    def shared(self) -> list[Any]:
        return [self.trunk, *self.extra]

    def params(self) -> list[Tensor]:
        seen: set[int] = set()
        out: list[Tensor] = []
        for q in [*self.trunk.parameters(), *self.extra, *self.heads.parameters()]:
            if id(q) not in seen:
                seen.add(id(q))
                out.append(q)
        return out

    def losses(self) -> dict[str, Tensor]:
        return {f"task{t}": v for t, v in enumerate(self.forward())}


def _task_losses(outs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    return [
        (t + 1.0) * (o - y).pow(2).mean() + 0.1 * (t + 1) for t, (o, y) in enumerate(zip(outs, ys))
    ]


def make_cnn(dtype: torch.dtype = DT) -> Model:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    trunk = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
    ).to(dtype)
    heads = nn.ModuleList([nn.Linear(64, 2) for _ in range(M)]).to(dtype)
    x = torch.randn(6, 2, 8, 8, generator=g, dtype=dtype)
    ys = [torch.randn(6, 2, generator=g, dtype=dtype) for _ in range(M)]

    def forward() -> list[Tensor]:
        z = trunk(x)
        return _task_losses([h(z) for h in heads], ys)

    return Model(trunk, heads, [], forward)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.layer = nn.TransformerEncoderLayer(
            16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )

    def forward(self, idx: Tensor) -> Tensor:
        return self.layer(self.emb(idx)).mean(1)


def make_transformer(dtype: torch.dtype = DT) -> Model:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    trunk = Encoder().to(dtype)
    heads = nn.ModuleList([nn.Linear(16, 2) for _ in range(M)]).to(dtype)
    idx = torch.randint(0, 10, (4, 5), generator=g)
    ys = [torch.randn(4, 2, generator=g, dtype=dtype) for _ in range(M)]

    def forward() -> list[Tensor]:
        z = trunk(idx)
        return _task_losses([h(z) for h in heads], ys)

    return Model(trunk, heads, [], forward)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.lin = nn.Linear(8, 8)  # applied twice
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, 8))  # a bare parameter of the trunk

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.lin(h))
        return torch.tanh(self.lin(h)) * self.gate


def make_tied(dtype: torch.dtype = DT, *, reuse: bool = True) -> Model:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    trunk = Tied().to(dtype)
    free = nn.Parameter(torch.linspace(0.8, 1.2, 6, dtype=dtype))  # shared, in no module
    heads = nn.ModuleList([nn.Linear(8, 2) for _ in range(M)]).to(dtype)
    x = torch.randn(7, 6, generator=g, dtype=dtype)
    ys = [torch.randn(7, 2, generator=g, dtype=dtype) for _ in range(M)]

    def forward() -> list[Tensor]:
        z = trunk(x * free)
        # task 0's head reuses a trunk layer on the representation (at the parameters only: a
        # cut point at the trunk refuses it with per-task gradients)
        z0 = torch.tanh(trunk.lin(z)) if reuse else z
        outs = [heads[0](z0)] + [h(z) for h in heads[1:]]
        return _task_losses(outs, ys)

    return Model(trunk, heads, [free], forward)


MODELS: dict[str, Callable[..., Model]] = {
    "cnn": make_cnn,
    "transformer": make_transformer,
    "tied": make_tied,
}


def at_cut(mname: str) -> Callable[..., Model]:
    """The model for a cut point at its trunk: the tied model without the head that reuses a
    trunk layer (refused there with per-task gradients, see the last tests)."""
    if mname == "tied":
        return lambda dtype=DT: make_tied(dtype, reuse=False)
    return MODELS[mname]


NAMES = [
    "Equal",
    "UncertaintyWeighting",
    "GradNorm",
    "FAMO",
    "MGDA",
    "UPGrad",
    "PCGrad",
    "NashMTL",
    "CAGrad",
    "AlignedMTL",
    "SparseMask",
    "SparseMask+MGDA",
]
ENTRIES = [e for e in REGISTRY if e.name in NAMES]
assert len(ENTRIES) == len(NAMES)


def build(
    entry: Entry, model: Model, at: str, engine: str = "auto", **kw: Any
) -> tuple[mtlbal.Balancer, Any]:
    where: Any = "params" if at == "params" else model.trunk
    kw = {"engine": engine, **entry.make(M), **kw}
    bal = mtlbal.Balancer(model.shared(), at=where, **kw)
    # the strategies' own parameters (uncertainty weighting's log-variances) follow the model's
    # dtype; left in float32 their .grad is rounded differently by each path
    bal.to(dtype=model.params()[0].dtype)
    opt = mtlbal.wrap(torch.optim.SGD(model.params(), lr=0.05, momentum=0.9), bal)
    return bal, opt


def train(entry: Entry, model: Model, opt: Any, steps: int) -> list[tuple[list[Tensor], Tensor]]:
    out = []
    for _ in range(steps):
        opt.zero_grad()
        info = opt.backward(model.losses())
        grads = [torch.zeros_like(q) if q.grad is None else q.grad.clone() for q in model.params()]
        out.append((grads, info.weights.clone()))
        opt.step()
        if entry.extras.get("update_after_step"):
            with torch.no_grad():
                opt.balancer.update(model.losses())
        feed_validation(entry, opt.balancer, model.losses, len(out) - 1)
    return out


def world(model: Model, bal: mtlbal.Balancer, opt: Any) -> dict[str, Any]:
    return {
        "grads": [None if q.grad is None else q.grad.clone() for q in model.params()],
        "params": [q.detach().clone() for q in model.params()],
        "strategy_params": [q.detach().clone() for q in bal.parameters()],
        "strategy_grads": [None if q.grad is None else q.grad.clone() for q in bal.parameters()],
        "balancer": copy.deepcopy(bal.state_dict()),
        "optimizer": copy.deepcopy(opt.state_dict()),
        "step": bal.step_count,
    }


def _close(a: Tensor, b: Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- 1. engine parity
PARITY = [(mn, e) for mn in MODELS for e in ENTRIES]


@pytest.mark.parametrize(("mname", "entry"), PARITY, ids=[f"{m}-{e.name}" for m, e in PARITY])
def test_engines_agree(mname: str, entry: Entry) -> None:
    variants: list[dict[str, Any]] = [
        {"engine": "layerwise"},
        {"engine": "dense", "chunk_size": 1},
        {"engine": "layerwise", "chunk_size": 2, "diagnostics": True},
    ]
    ref_model = MODELS[mname]()
    _, opt = build(entry, ref_model, "params", engine="dense")
    ref = train(entry, ref_model, opt, 3)
    for kw in variants:
        model = MODELS[mname]()
        _, opt = build(entry, model, "params", **kw)
        got = train(entry, model, opt, 3)
        for k, ((ga, wa), (gb, wb)) in enumerate(zip(ref, got)):
            _close(wb, wa, f"{kw} step {k}: weights")
            for i, (x, y) in enumerate(zip(ga, gb)):
                _close(y, x, f"{kw} step {k}: .grad[{i}]")


FIXED = ["Equal", "UncertaintyWeighting", "FAMO"]
CUT_EQ = [(mn, e) for mn in MODELS for e in ENTRIES if e.name in FIXED]


@pytest.mark.parametrize(("mname", "entry"), CUT_EQ, ids=[f"{m}-{e.name}" for m, e in CUT_EQ])
def test_cut_point_equals_params_for_fixed_weights(mname: str, entry: Entry) -> None:
    a, b = at_cut(mname)(), at_cut(mname)()
    ra = train(entry, a, build(entry, a, "params")[1], 3)
    rb = train(entry, b, build(entry, b, "cut", diagnostics=True)[1], 3)
    for k, ((ga, wa), (gb, wb)) in enumerate(zip(ra, rb)):
        _close(wb, wa, f"step {k}: weights")
        for i, (x, y) in enumerate(zip(ga, gb)):
            _close(y, x, f"step {k}: .grad[{i}]")


# ---------------------------------------------------------------- 2. refusal changes nothing
REFUSE = [
    (mn, e, at, eng)
    for mn in MODELS
    for e in ENTRIES
    for at in e.at
    for eng in (("auto", "dense") if at == "params" else ("auto",))
]


@pytest.mark.parametrize(
    ("mname", "entry", "at", "engine"),
    REFUSE,
    ids=[f"{m}-{e.name}@{a}-{g}" for m, e, a, g in REFUSE],
)
def test_refused_step_changes_nothing(
    mname: str, entry: Entry, at: str, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make = MODELS[mname] if at == "params" else at_cut(mname)
    p, q = make(), make()
    bal, opt = build(entry, p, at, engine)
    bal_q, opt_q = build(entry, q, at, engine)
    train(entry, p, opt, 2)
    train(entry, q, opt_q, 2)
    # (BatchNorm in train mode normalises by the batch: the running statistics the refused
    # forward updated do not enter the next step)
    refuse_then_step(p, q, (bal, opt), (bal_q, opt_q), world, monkeypatch)


# ---------------------------------------------------------------- 3. equal weights are the sum
def _mixed(losses: dict[str, Tensor], form: str) -> Any:
    vals = list(losses.values())
    if form == "tensor":
        return torch.stack(vals)
    vals[1] = vals[1].float()  # float32 and float64 mixed
    if form == "list":
        return vals
    return dict(zip(losses, vals))


def _plain(losses: Any) -> Tensor:
    vals = list(losses.values()) if isinstance(losses, dict) else list(losses)
    total: Tensor = vals[0]
    for v in vals[1:]:
        total = total + v
    return total


EQUAL = [
    (mn, at, form)
    for mn in MODELS
    for at in ("params", "cut")
    for form in ("dict", "list", "tensor")
]


@pytest.mark.parametrize(("mname", "at", "form"), EQUAL, ids=[f"{m}@{a}-{f}" for m, a, f in EQUAL])
def test_equal_weights_are_bitwise_the_summed_backward(mname: str, at: str, form: str) -> None:
    a, b = MODELS[mname](), MODELS[mname]()
    bal = mtlbal.Balancer(a.shared(), at="params" if at == "params" else a.trunk)
    for _ in range(2):  # two backward calls without zero_grad: accumulates as torch does
        bal.backward(_mixed(a.losses(), form))
        _plain(_mixed(b.losses(), form)).backward()
    for i, (x, y) in enumerate(zip(a.params(), b.params())):
        assert x.grad is not None and y.grad is not None
        assert torch.equal(x.grad, y.grad), f".grad[{i}] differs"


@pytest.mark.parametrize("mname", list(MODELS))
@pytest.mark.parametrize("eval_mode", [False, True])
def test_reused_losses_are_refused_and_change_nothing(mname: str, eval_mode: bool) -> None:
    model = MODELS[mname]()
    model.trunk.train(not eval_mode)
    entry = next(e for e in ENTRIES if e.name == "MGDA")
    bal, opt = build(entry, model, "params")
    losses = model.losses()
    opt.backward(losses)
    before = world(model, bal, opt)
    with pytest.raises(ValueError, match="already backpropagated"):
        opt.backward(losses)
    assert_same(before, world(model, bal, opt), "world")


# ---------------------------------------------------------------- a cut module applied repeatedly
@pytest.mark.parametrize(
    "kwargs", [{"diagnostics": True}, {"aggregator": mtlbal.aggregation.MGDA()}]
)
def test_cut_point_applied_to_its_own_output_is_refused(kwargs: dict[str, Any]) -> None:
    # tied.trunk.lin runs on its own output (twice in the trunk, once more in task 0's head):
    # per-task gradients at detached leaves would stop at the earlier call's leaf. Found on
    # this model: .grad silently wrong (inp's bias off by 0.28) before the check existed
    model = make_tied()
    lin: nn.Module = model.trunk.lin  # type: ignore[assignment]
    bal = mtlbal.Balancer(model.shared(), at=lin, **kwargs)
    with pytest.raises(ValueError, match="runs on its own output: its call 2"):
        bal.backward(model.losses())
    assert all(q.grad is None for q in model.params())
    assert bal.step_count == 0


def test_cut_point_called_in_parallel_equals_params() -> None:
    # the same module on two independent inputs (a siamese trunk): every output is captured and
    # combined; with equal weights the cut equals the parameters
    def run(at_cut: bool) -> list[Tensor]:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        enc = nn.Sequential(nn.Linear(5, 6), nn.Tanh()).to(DT)
        heads = nn.ModuleList([nn.Linear(12, 1) for _ in range(M)]).to(DT)
        x1, x2 = torch.randn(2, 7, 5, generator=g, dtype=DT)
        bal = mtlbal.Balancer(enc, at=enc if at_cut else "params", diagnostics=True)
        z = torch.cat([enc(x1), enc(x2)], 1)
        bal.backward([(t + 1.0) * h(z).pow(2).mean() for t, h in enumerate(heads)])
        return [q.grad.clone() for q in [*enc.parameters(), *heads.parameters()]]  # type: ignore[union-attr]

    for x, y in zip(run(False), run(True)):
        _close(y, x, "cut vs params")


@pytest.mark.parametrize(
    "kwargs", [{"diagnostics": True}, {"aggregator": mtlbal.aggregation.MGDA()}]
)
def test_head_reusing_a_weight_of_the_cut_module_is_refused(kwargs: dict[str, Any]) -> None:
    # task 0's head calls trunk.lin on the representation: with a cut at the trunk, that share
    # of trunk.lin's gradient would escape the per-task gradients (as with select=, where a
    # head reading the trunk through another element is refused)
    model = make_tied()
    bal = mtlbal.Balancer(model.shared(), at=model.trunk, **kwargs)
    with pytest.raises(ValueError, match="task 'task0' reaches the parameters of the cut point"):
        bal.backward(model.losses())
    assert all(q.grad is None for q in model.params())
    assert bal.step_count == 0


@pytest.mark.parametrize("name", ["UncertaintyWeighting", "GradNorm", "UPGrad"])
def test_overflow_under_a_grad_scaler_on_the_cnn(name: str) -> None:
    # a gradient method forms per-task gradients: the overflow is seen (info.skipped) and no
    # state changes; a loss weighting alone forms none, so the overflow reaches .grad as in a
    # plain scaled step (documented): either way the scaler skips the step and halves the scale
    entry = next(e for e in ENTRIES if e.name == name)
    model = make_cnn(torch.float32)
    bal, opt = build(entry, model, "params")
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    opt.backward(model.losses(), scaler=scaler)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = world(model, bal, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    losses = model.losses()
    losses["task1"] = losses["task1"] * 1e20  # finite in float32; its gradient x 2^100 is not
    info = opt.backward(losses, scaler=scaler)
    assert info.skipped == (name == "UPGrad")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**99
    after = world(model, bal, opt)
    assert_same(before["params"], after["params"], "params")
    if info.skipped:  # .grad holds the plain (non-finite) sum for the scaler; nothing else moved
        for key in ("strategy_params", "strategy_grads", "balancer", "optimizer", "step"):
            assert_same(before[key], after[key], key)
        return
    # the loss-level step was committed: it counts, and GradNorm renormalised its weights at
    # its start (Σw = m, deferred from the last optimizer step: the same weights)
    assert bal.step_count == before["step"] + 1
    for a, b in zip(before["strategy_params"], after["strategy_params"]):
        torch.testing.assert_close(b / b.sum(), a / a.sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("mname", list(MODELS))
def test_two_forwards_before_two_backwards_at_a_cut(mname: str) -> None:
    # at the parameters this just works; at a cut point the first backward takes every output
    # captured since the last one (the second forward's gets a zero per-task gradient), so the
    # first step is right and the second is refused cleanly, with a message that says why
    a, b = at_cut(mname)(), at_cut(mname)()
    bal_a = mtlbal.Balancer(a.shared(), at=a.trunk, aggregator=mtlbal.aggregation.UPGrad())
    bal_b = mtlbal.Balancer(b.shared(), at=b.trunk, aggregator=mtlbal.aggregation.UPGrad())
    first, second = a.losses(), a.losses()
    bal_a.backward(first)
    bal_b.backward(b.losses())
    for x, y in zip(a.params(), b.params()):
        assert x.grad is not None and y.grad is not None
        _close(x.grad, y.grad, "first step")
    before = [None if q.grad is None else q.grad.clone() for q in a.params()]
    with pytest.raises(ValueError, match="run forward and backward in turn"):
        bal_a.backward(second)
    assert_same(before, [q.grad for q in a.params()], "grads")
    assert bal_a.step_count == 1
