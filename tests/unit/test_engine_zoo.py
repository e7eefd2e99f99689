"""A zoo of layers through every engine path, against a float64 loop of per-task backwards.

Every model is run through ``layerwise_per_task_grads`` with both policies (``cover``: rebuild
every covered parameter from its layer; ``cost``: the default engine's choice) and through the
Balancer with each engine; the per-task gradients, the Gramian and the final ``.grad`` are
compared with ``J`` from one ``torch.autograd.grad`` call per task (independent of the engines).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import mtlbal
from mtlbal.aggregation import UPGrad
from mtlbal.aggregation.upgrad import upgrad_weights
from mtlbal.engine.layerwise import LayerwiseCapture, layerwise_per_task_grads
from mtlbal.engine.report import EngineFallbackWarning

M = 3
DT = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-11}


def loop_jacobian(losses: Tensor, params: list[Tensor]) -> Tensor:
    rows = []
    for t in range(losses.shape[0]):
        gs = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)]
            )
        )
    return torch.stack(rows)


def heads(z: Tensor, m: int = M) -> Tensor:
    g = torch.Generator().manual_seed(7)
    z = z.reshape(z.shape[0], -1)
    ws = [torch.randn(z.shape[1], 2, generator=g, dtype=z.dtype) for _ in range(m)]
    return torch.stack([((z @ w) ** 2).mean() + (z @ w).sin().sum() for w in ws])


class Scale(nn.Module):
    """A bare parameter used functionally (no supported module owns it)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.s.view(-1, *([1] * (x.dim() - 2)))


class Attn(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention, kv_dims: tuple[int, int] | None = None):
        super().__init__()
        self.mha = mha
        self.pre = nn.Linear(4, mha.embed_dim)
        self.kv = kv_dims
        self.norm = nn.LayerNorm(mha.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pre(x)  # [B, T, E] batch-first input
        q = h if self.mha.batch_first else h.transpose(0, 1)
        if self.kv is None:
            k = v = q
        else:
            k = torch.tanh(q[..., : self.kv[0]] * 2)
            v = torch.cos(q[..., : self.kv[1]])
        out, _ = self.mha(q, k, v, need_weights=False)
        if not self.mha.batch_first:
            out = out.transpose(0, 1)
        return self.norm(out + h)


def _conv2d_zoo() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2, dilation=2, padding=2, padding_mode="circular"),
        nn.Conv2d(4, 4, 3, groups=4, stride=2, padding=1, padding_mode="replicate"),  # depthwise
        nn.GroupNorm(2, 4),
        nn.Conv2d(4, 3, (3, 5), padding="same", bias=False),
    )


ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], Tensor]]] = {
    "linear": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4)),
        lambda: torch.randn(4, 5),
    ),
    "linear_wide_batch": (
        lambda: nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 3)),
        lambda: torch.randn(40, 3),
    ),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(3, 4, 3, padding=2, dilation=2, padding_mode="circular"),
            nn.BatchNorm1d(4),
            nn.Tanh(),
            nn.Conv1d(4, 4, 3, groups=2, stride=2),
            nn.Conv1d(4, 2, 2, padding="same", padding_mode="reflect"),
        ),
        lambda: torch.randn(3, 3, 9),
    ),
    "conv2d": (_conv2d_zoo, lambda: torch.randn(2, 2, 7, 6)),
    "conv3d": (
        lambda: nn.Sequential(
            nn.Conv3d(2, 3, (2, 3, 3), stride=(1, 2, 1), padding=1, padding_mode="reflect"),
            nn.BatchNorm3d(3),
            nn.Tanh(),
            nn.Conv3d(3, 3, 3, groups=3, dilation=(1, 1, 2), padding=(1, 1, 2)),
        ),
        lambda: torch.randn(2, 2, 3, 5, 6),
    ),
    "conv_transpose": (
        lambda: nn.Sequential(
            nn.ConvTranspose1d(3, 4, 3, stride=2, output_padding=1, groups=1),
            nn.Unflatten(2, (1, -1)),
            nn.ConvTranspose2d(4, 4, (1, 3), stride=(1, 2), dilation=(1, 2), groups=2),
            nn.Unflatten(2, (1, 1)),
            nn.ConvTranspose3d(4, 2, (1, 1, 2), padding=(0, 0, 1)),
        ),
        lambda: torch.randn(2, 3, 4),
    ),
    "mha_fused_batch_first": (
        lambda: Attn(nn.MultiheadAttention(6, 2, batch_first=True)),
        lambda: torch.randn(2, 5, 4),
    ),
    "mha_fused_seq_first_bias_kv": (
        lambda: Attn(nn.MultiheadAttention(6, 3, add_bias_kv=True, add_zero_attn=True)),
        lambda: torch.randn(2, 4, 4),
    ),
    "mha_separate_qkv_no_bias": (
        lambda: Attn(
            nn.MultiheadAttention(6, 2, kdim=4, vdim=3, bias=False, batch_first=True), (4, 3)
        ),
        lambda: torch.randn(3, 4, 4),
    ),
    "norms_embedding": (
        lambda: _EmbedNorms(),
        lambda: torch.tensor([[1, 2, 0, 2], [5, 1, 1, 0], [9, 9, 2, 3]]),
    ),
    "bare_parameters": (
        lambda: nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3)),
        lambda: torch.randn(6, 4),
    ),
}


class _EmbedNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)
        self.gn = nn.GroupNorm(2, 4)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.ln(self.emb(idx)).mean(1)
        return self.gn(self.bn(self.lin(h)))


def _setup(name: str, train: bool = True) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    build, data = ZOO[name]
    model = build().to(DT)
    x = data()
    if x.is_floating_point():
        x = x.to(DT)
    if not train:
        with torch.no_grad():  # running statistics away from their initial values
            model(x)
            model(x)
        model.eval()
    return model, x


@pytest.mark.parametrize("policy", ["cover", "cost"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_engine_matches_the_loop(name: str, policy: str) -> None:
    model, x = _setup(name)
    cap = LayerwiseCapture([model])
    losses = heads(model(x))
    shared = list(model.parameters())
    J = loop_jacobian(losses, shared)
    eng = layerwise_per_task_grads(losses, cap.take(), shared, policy=policy, chunk_size=2)
    torch.testing.assert_close(eng.gramian(), J @ J.T, **TOL)
    torch.testing.assert_close(eng.jacobian(), J, **TOL)
    w = torch.tensor([0.5, 1.0, 1.5], dtype=DT)
    eng.apply_weights(w)
    got = torch.cat([p.grad.reshape(-1) for p in shared])  # type: ignore[union-attr]
    torch.testing.assert_close(got, w @ J, **TOL)
    assert {id(p) for p in shared} == set(eng.paths)
    cap.remove()


@pytest.mark.parametrize("name", ["conv1d", "conv2d", "conv3d", "norms_embedding"])
def test_zoo_eval_mode_norms(name: str) -> None:
    model, x = _setup(name, train=False)
    cap = LayerwiseCapture([model])
    losses = heads(model(x))
    shared = list(model.parameters())
    J = loop_jacobian(losses, shared)
    eng = layerwise_per_task_grads(losses, cap.take(), shared, policy="cover")
    torch.testing.assert_close(eng.gramian(), J @ J.T, **TOL)
    torch.testing.assert_close(eng.jacobian(), J, **TOL)
    cap.remove()


@pytest.mark.parametrize("engine", ["auto", "layerwise", "dense"])
@pytest.mark.parametrize(
    "name", ["linear", "conv2d", "conv_transpose", "mha_fused_batch_first", "norms_embedding"]
)
def test_zoo_balancer_final_grad(name: str, engine: str) -> None:
    model, x = _setup(name)
    shared = list(model.parameters())
    ref_losses = heads(model(x))
    J = loop_jacobian(ref_losses, shared)
    gram = J @ J.T
    expected = upgrad_weights(gram) @ J
    bal = mtlbal.Balancer(model, aggregator=UPGrad(), engine=engine)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EngineFallbackWarning)
        info = bal.backward(list(heads(model(x)).unbind()))
    torch.testing.assert_close(info.gramian, gram, **TOL)
    got = torch.cat([p.grad.reshape(-1) for p in shared])  # type: ignore[union-attr]
    torch.testing.assert_close(got, expected, **TOL)
    assert info.engine_paths is not None and len(info.engine_paths) == len(shared)
    bal.remove()


def test_report_paths_describe_and_one_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), Scale(64), nn.Linear(64, 64)).to(DT)
    x = torch.randn(4, 64, dtype=DT)
    bal = mtlbal.Balancer(model, aggregator=UPGrad())
    with pytest.warns(EngineFallbackWarning, match=r"2\.s \(Scale\)"):
        info = bal.backward(list(heads(model(x)).unbind()))
    assert info.engine_paths == {
        "0.weight": "identity",
        "0.bias": "identity",
        "1.weight": "batched",
        "1.bias": "batched",
        "2.s": "batched",
        "3.weight": "identity",
        "3.bias": "identity",
    }
    table = bal.describe()
    assert "2.s" in table and "unsupported module" in table
    assert "norm affine" in table and "rows: identity" in table
    with warnings.catch_warnings():  # once per Balancer
        warnings.simplefilter("error", EngineFallbackWarning)
        bal.backward(list(heads(model(x)).unbind()))
    dense = mtlbal.Balancer(nn.Linear(3, 3), aggregator=UPGrad(), engine="dense")
    assert "no step" in dense.describe()


def test_cost_choice_by_shape() -> None:
    # a convolution on many rows (after im2col) takes the batched backward, a wide Linear on a
    # small batch takes the identity
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1).to(DT)
    lin = nn.Linear(128, 128).to(DT)
    model = nn.ModuleList([conv, lin])
    cap = LayerwiseCapture([model])
    x = torch.randn(2, 32, 16, 16, dtype=DT)
    z = lin(conv(x).mean((2, 3)).repeat(1, 4))
    losses = heads(z)
    shared = list(model.parameters())
    J = loop_jacobian(losses, shared)
    eng = layerwise_per_task_grads(losses, cap.take(), shared, policy="cost")
    assert eng.paths[id(conv.weight)][0] == "batched"
    assert eng.paths[id(lin.weight)][0] == "identity"
    assert eng.paths[id(lin.bias)][0] == "identity"
    # the convolution's backward is large per task: m plain backward passes, same values
    assert eng.per_task_loop
    torch.testing.assert_close(eng.gramian(), J @ J.T, **TOL)
    torch.testing.assert_close(eng.jacobian(), J, **TOL)
    cap.remove()
    # the same through the Balancer: reported, and the final .grad exact
    bal = mtlbal.Balancer(model, aggregator=UPGrad())
    info = bal.backward(list(heads(lin(conv(x).mean((2, 3)).repeat(1, 4))).unbind()))
    assert info.engine_paths is not None
    assert info.engine_paths["0.weight"] == "batched (per-task loop)"
    assert info.engine_paths["1.weight"] == "identity"
    got = torch.cat([p.grad.reshape(-1) for p in shared])  # type: ignore[union-attr]
    torch.testing.assert_close(got, upgrad_weights(J @ J.T) @ J, **TOL)
    bal.remove()
    # a small model keeps the one vmapped backward
    small, x = _setup("linear_wide_batch")
    cap = LayerwiseCapture([small])
    losses = heads(small(x))
    eng = layerwise_per_task_grads(losses, cap.take(), list(small.parameters()), policy="cost")
    assert not eng.per_task_loop
    cap.remove()


def test_unknown_policy_is_refused() -> None:
    lin = nn.Linear(3, 3)
    cap = LayerwiseCapture([lin])
    losses = heads(lin(torch.randn(2, 3)))
    with pytest.raises(ValueError, match="policy"):
        layerwise_per_task_grads(losses, cap.take(), list(lin.parameters()), policy="fast")
    cap.remove()


def test_known_layers_batched_by_design_are_not_warned() -> None:
    model, x = _setup("mha_fused_batch_first")
    bal = mtlbal.Balancer(model, aggregator=UPGrad())
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)
        info = bal.backward(list(heads(model(x)).unbind()))
    assert info.engine_paths is not None
    assert info.engine_paths["mha.in_proj_weight"] == "batched"
    assert info.engine_paths["mha.out_proj.weight"] == "batched"
    assert "multi-head attention" in bal.describe()
