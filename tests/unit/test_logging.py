"""mtlbal.logging: info_to_dict's names and values, one host read, the hooks (a fake writer and
TensorBoard's SummaryWriter read back from its event file)."""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

import pytest
import torch
from torch import nn

import mtlbal
from mtlbal.logging import DictHook, TensorBoardHook, info_to_dict
from mtlbal.step import StepInfo

TASKS = ("seg", "depth", "normal")  # not in string order: cosine names sort the pair


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 5)
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in TASKS)

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.tanh(self.trunk(x))
        return {t: (h(z) - i).pow(2).mean() for i, (t, h) in enumerate(zip(TASKS, self.heads))}


def _batch(seed: int) -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))


class FakeWriter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.calls.append((tag, value, step))


def test_names_and_values_match_an_independent_computation() -> None:
    net = Net()
    b = mtlbal.Balancer(net.trunk, aggregator=mtlbal.aggregation.MGDA())
    x = _batch(1)
    # per-task gradients of the shared part, computed here without the Balancer
    ref = net.losses(x)
    shared = list(net.trunk.parameters())
    grads = []
    for t in TASKS:
        gs = torch.autograd.grad(ref[t], shared, retain_graph=True)
        grads.append(torch.cat([g.reshape(-1) for g in gs]).double())
    info = b.backward(net.losses(x))
    d = info_to_dict(info)

    expected_keys = {"mtlbal/conflict", "mtlbal/skipped"}
    for kind in ("loss", "loss_weight", "weight", "grad_weight", "grad_norm"):
        expected_keys |= {f"mtlbal/{kind}/{t}" for t in TASKS}
    expected_keys |= {f"mtlbal/cosine/{min(a, b)}~{max(a, b)}" for a, b in combinations(TASKS, 2)}
    assert set(d) == expected_keys
    assert all(type(v) is float for v in d.values())

    for i, t in enumerate(TASKS):
        assert d[f"mtlbal/loss/{t}"] == pytest.approx(float(ref[t].detach()), rel=1e-6)
        assert d[f"mtlbal/grad_norm/{t}"] == pytest.approx(float(grads[i].norm()), rel=1e-5)
        assert d[f"mtlbal/weight/{t}"] == float(info.weights[i])
        assert d[f"mtlbal/loss_weight/{t}"] == 1.0
        assert info.grad_weights is not None
        assert d[f"mtlbal/grad_weight/{t}"] == float(info.grad_weights[i])
    negative = 0
    for (i, a), (j, c) in combinations(enumerate(TASKS), 2):
        cos = float(grads[i] @ grads[j] / (grads[i].norm() * grads[j].norm()))
        negative += cos < 0
        assert d[f"mtlbal/cosine/{min(a, c)}~{max(a, c)}"] == pytest.approx(cos, abs=1e-5)
    assert d["mtlbal/conflict"] == pytest.approx(negative / 3)
    assert d["mtlbal/skipped"] == 0.0


def test_without_a_gramian_the_gradient_entries_are_absent_and_prefix_applies() -> None:
    net = Net()
    b = mtlbal.Balancer(net.trunk, weighting=mtlbal.weighting.UncertaintyWeighting(3))
    info = b.backward(net.losses(_batch(2)))
    d = info_to_dict(info, prefix="train/mtl")
    kinds = {k.split("/")[2] for k in d if k.count("/") == 3}
    assert kinds == {"loss", "loss_weight", "weight"}
    assert set(d) - {k for k in d if k.count("/") == 3} == {"train/mtl/skipped"}
    for i, t in enumerate(TASKS):
        assert d[f"train/mtl/loss_weight/{t}"] == pytest.approx(float(info.loss_weights[i]))
    bare = info_to_dict(info, prefix="")
    assert "loss/seg" in bare and "skipped" in bare


def _info(**extras: Any) -> StepInfo:
    losses = torch.tensor([1.0, 2.0])
    return StepInfo(("a", "b"), losses, torch.ones(2), torch.ones(2), step=3, extras=extras)


def test_extras_scalars_and_per_task_tensors() -> None:
    d = info_to_dict(
        _info(
            lr=0.5,
            flag=True,
            scale=torch.tensor(4.0),
            per_task=torch.tensor([0.25, 0.75]),
            matrix=torch.ones(2, 3),
            other_length=torch.ones(3),
            overflow=("a",),
        )
    )
    assert d["mtlbal/lr"] == 0.5
    assert d["mtlbal/flag"] == 1.0
    assert d["mtlbal/scale"] == 4.0
    assert d["mtlbal/per_task/a"] == 0.25 and d["mtlbal/per_task/b"] == 0.75
    assert not any(
        k.startswith(("mtlbal/matrix", "mtlbal/other_length", "mtlbal/overflow")) for k in d
    )


def test_one_host_read(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net()
    b = mtlbal.Balancer(net.trunk, aggregator=mtlbal.aggregation.UPGrad())
    info = b.backward(net.losses(_batch(3)))
    info.extras["scale"] = torch.tensor(2.0)
    info.extras["per_task"] = torch.arange(3.0)
    reads: list[str] = []
    for name in ("tolist", "item", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *a: Any, _o: Any = original, _n: str = name, **k: Any) -> Any:
            reads.append(_n)
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    d = info_to_dict(info)
    monkeypatch.undo()
    assert reads == ["tolist"]
    assert len(d) == 3 * 5 + 3 + 2 + 1 + 3  # per-task kinds, cosines, conflict/skipped, extras


def test_tensorboard_hook_with_a_fake_writer_every_and_skipped() -> None:
    net = Net()
    b = mtlbal.Balancer(net.trunk, aggregator=mtlbal.aggregation.MGDA(), nonfinite="skip")
    writer = FakeWriter()
    b.register_hook(TensorBoardHook(writer, every=2))
    infos = [b.backward(net.losses(_batch(s))) for s in range(4)]
    steps = sorted({s for _, _, s in writer.calls})
    assert steps == [2, 4]
    for info in (infos[1], infos[3]):
        written = {tag: v for tag, v, s in writer.calls if s == info.step}
        assert written == info_to_dict(info)
        assert written["mtlbal/weight/depth"] == float(info.weights[1])
    # a skipped step is not handed to hooks by the Balancer; called by hand it logs skipped only
    hook = TensorBoardHook(writer, prefix="x", every=100)
    bad = net.losses(_batch(9))
    bad["seg"] = bad["seg"] * float("nan")
    info = b.backward(bad)
    assert info.skipped and writer.calls[-1][2] == 4
    writer.calls.clear()
    hook(b, info)
    assert writer.calls == [("x/skipped", 1.0, 4)]


def test_dict_hook_through_the_wrapper_and_validation() -> None:
    net = Net()
    opt = mtlbal.wrap(
        torch.optim.SGD(net.parameters(), lr=0.1),
        mtlbal.Balancer(net.trunk, weighting=mtlbal.weighting.UncertaintyWeighting(3)),
    )
    rows: list[tuple[int, dict[str, float]]] = []
    handle = opt.balancer.register_hook(DictHook(lambda d, s: rows.append((s, d)), every=3))
    for s in range(6):
        info = opt.backward(net.losses(_batch(s)))
        opt.step()
        opt.zero_grad()
    handle.remove()
    assert [s for s, _ in rows] == [3, 6]
    assert rows[-1][1] == info_to_dict(info)
    with pytest.raises(ValueError, match="every"):
        DictHook(print, every=0)
    with pytest.raises(TypeError, match="callable"):
        DictHook(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="add_scalar"):
        TensorBoardHook(object())  # type: ignore[arg-type]


def test_summary_writer_event_file_reads_back(tmp_path: Any) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    net = Net()
    b = mtlbal.Balancer(net.trunk, aggregator=mtlbal.aggregation.MGDA())
    writer = SummaryWriter(log_dir=str(tmp_path))
    b.register_hook(TensorBoardHook(writer))
    expected: dict[str, list[tuple[int, float]]] = {}
    for s in range(3):
        info = b.backward(net.losses(_batch(s)))
        for tag, value in info_to_dict(info).items():
            expected.setdefault(tag, []).append((info.step, value))
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, rows in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [1, 2, 3]
        for (_, v), (_, want) in zip(got, rows):
            assert math.isclose(v, want, rel_tol=1e-6, abs_tol=1e-7)  # stored as float32


def test_the_concepts_logging_example_runs(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "concepts.md").read_text()
    section = doc.split("\n## Logging\n", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    expected = code.rsplit("# ", 1)[1].strip()
    monkeypatch.chdir(tmp_path)
    printed: list[str] = []
    exec(
        compile(code, "concepts.md", "exec"),
        {"print": lambda *a: printed.append(" ".join(map(str, a)))},
    )
    assert printed == [expected]
    assert list((tmp_path / "runs" / "mtl").iterdir())
