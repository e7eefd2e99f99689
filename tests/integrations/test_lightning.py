"""The Lightning integration: automatic optimization with BalancingMixin, checked against a
plain PyTorch loop with mtlbal.wrap; mixed precision; checkpoint and resume; manual optimization.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning")

import lightning.pytorch as pl
from lightning.pytorch.plugins import MixedPrecision

import mtlbal
from mtlbal.integrations.lightning import (
    BalancedLightningModule,
    BalancingMixin,
    scaler_of,
)

STEPS = 4
LR = 0.05


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g)
    return TensorDataset(x, torch.randn(32, 1, generator=g), torch.randn(32, 1, generator=g))


def _loader(repeat: bool = False) -> DataLoader[Any]:
    data = _data()
    if repeat:  # every batch the same: the order Lightning replays batches in after a resume
        # (it restarts the interrupted epoch's iteration) cannot matter
        data = TensorDataset(*(t[:8].repeat(4, 1) for t in data.tensors))
    return DataLoader(data, batch_size=8, shuffle=False)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])

    def losses(self, x: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor) -> dict[str, Any]:
        z = self.trunk(x)
        return {
            "a": nn.functional.mse_loss(self.heads[0](z), ya),
            "b": nn.functional.l1_loss(self.heads[1](z), yb),
        }


def _balancer(net: Net, method: str) -> mtlbal.Balancer:
    if method == "mgda":
        return mtlbal.Balancer(net.trunk, aggregator=mtlbal.aggregation.MGDA())
    return mtlbal.Balancer(net.trunk, weighting=mtlbal.weighting.UncertaintyWeighting(2))


class Module(BalancedLightningModule):
    def __init__(self, method: str = "mgda", output: str = "dict") -> None:
        super().__init__()
        self.net = Net()
        self.method = method
        self.output = output
        self.balancer = _balancer(self.net, method)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        losses = self.net.losses(*batch)
        if self.output == "nested":
            return {"loss": sum(v.detach() for v in losses.values()), "losses": losses}
        return losses

    def configure_optimizers(self) -> Any:
        return mtlbal.wrap(torch.optim.SGD(self.net.parameters(), lr=LR), self.balancer)


def _trainer(**kw: Any) -> pl.Trainer:
    args: dict[str, Any] = dict(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    args.update(kw)
    return pl.Trainer(**args)


def _fp16_on_cpu() -> dict[str, Any]:
    """Lightning turns ``precision="16-mixed"`` into bf16 on CPU (with a warning); an explicit
    plugin keeps fp16 autocast and its GradScaler, the path a GPU takes. The scale starts at
    2**10, not 2**16, so that the first step does not overflow fp16 and get skipped."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}


def _fit(
    module: pl.LightningModule, ckpt_path: str | None = None, repeat: bool = False, **kw: Any
) -> pl.Trainer:
    trainer = _trainer(**kw)
    with warnings.catch_warnings():
        # Lightning's advice on dataloader workers, irrelevant for a 32-row tensor dataset
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        trainer.fit(module, _loader(repeat), ckpt_path=ckpt_path)
    return trainer


def _plain(method: str, steps: int = STEPS) -> tuple[Net, mtlbal.BalancedOptimizer]:
    net = Net()
    opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=LR), _balancer(net, method))
    batches = iter(_loader())
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(net.losses(*next(batches)))
        opt.step()
    return net, opt


def _assert_params_close(a: nn.Module, b: nn.Module, **tol: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), msg=name, **tol)  # type: ignore[arg-type]


@pytest.mark.parametrize("output", ["dict", "nested"])
@pytest.mark.parametrize("method", ["mgda", "uw"])
def test_automatic_optimization_equals_a_plain_loop(method: str, output: str) -> None:
    module = Module(method, output)
    before = copy.deepcopy(module.net)
    _fit(module)
    net, opt = _plain(method)
    assert not all(
        torch.equal(p, q) for p, q in zip(before.parameters(), module.net.parameters())
    ), "the Trainer did not step"
    _assert_params_close(module.net, net, rtol=1e-6, atol=1e-7)
    assert module.balancing_info is not None
    assert module.balancing_info.tasks == ("a", "b")
    if method == "uw":  # the strategy's learnable log-variances were stepped as in the loop
        for p, q in zip(module.balancer.parameters(), opt.balancer.parameters(), strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        assert any(bool((p != 0).any()) for p in module.balancer.parameters())


def test_mixin_with_a_lightning_module_base() -> None:
    class Mixed(BalancingMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()
            self.balancer = _balancer(self.net, "mgda")

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.net.losses(*batch)

        def configure_optimizers(self) -> Any:
            return mtlbal.wrap(torch.optim.SGD(self.net.parameters(), lr=LR), self.balancer)

    module = Mixed()
    _fit(module)
    _assert_params_close(module.net, _plain("mgda")[0], rtol=1e-6, atol=1e-7)


def test_a_tensor_from_training_step_is_refused() -> None:
    class Bad(Module):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return sum(self.net.losses(*batch).values())

    with pytest.raises(TypeError, match="per-task losses"):
        _fit(Bad())


def test_a_plain_optimizer_is_refused() -> None:
    class Plain(Module):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.net.parameters(), lr=LR)

    with pytest.raises(TypeError, match=r"mtlbal\.wrap"):
        _fit(Plain())


@pytest.mark.parametrize("method", ["mgda", "uw"])
def test_accumulate_grad_batches_is_the_large_batch_step(method: str) -> None:
    # accumulate_grad_batches=2 over batches of 8 == a plain loop over batches of 16
    module = Module(method)
    _fit(module, accumulate_grad_batches=2, max_steps=2)
    assert module.balancer.step_count == 2
    assert module.balancing_info is not None and module.balancing_info.micro_batches == 2
    net = Net()
    opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=LR), _balancer(net, method))
    data = _data().tensors
    for k in range(2):
        opt.zero_grad()
        opt.backward(net.losses(*(t[16 * k : 16 * (k + 1)] for t in data)))
        opt.step()
    _assert_params_close(module.net, net, rtol=1e-6, atol=1e-7)
    for p, q in zip(module.balancer.parameters(), opt.balancer.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_logging() -> None:
    module = Module("uw")
    module.log_balancing = True
    trainer = _fit(module, log_every_n_steps=1)
    assert any(k.startswith("mtlbal/") for k in trainer.callback_metrics), trainer.callback_metrics


@pytest.mark.parametrize("method", ["mgda", "uw"])
def test_16_mixed_gradients_are_not_divided_by_the_scale(method: str) -> None:
    ref = Module(method)
    _fit(ref, max_steps=1)
    module = Module(method)
    trainer = _fit(module, max_steps=1, **_fp16_on_cpu())
    scaler = scaler_of(trainer)
    assert scaler is not None and scaler.is_enabled()
    assert scaler.get_scale() == 2.0**10  # no overflow; a scale that would show were it left in
    # one SGD step from the same init: the displacement is lr * grad in both runs
    init = Net()
    for p0, p32, p16 in zip(
        init.parameters(), ref.net.parameters(), module.net.parameters(), strict=True
    ):
        d32, d16 = (p32 - p0).detach(), (p16 - p0).detach()
        torch.testing.assert_close(d16, d32, rtol=2e-2, atol=2e-4)


def test_bf16_mixed() -> None:
    ref = Module("uw")
    _fit(ref)
    module = Module("uw")
    trainer = _fit(module, precision="bf16-mixed")
    assert scaler_of(trainer) is None
    _assert_params_close(module.net, ref.net, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("method", ["mgda", "uw"])
def test_checkpoint_resume_equals_uninterrupted(method: str, tmp_path: Path) -> None:
    whole = Module(method)
    _fit(whole, max_steps=2 * STEPS, repeat=True)

    first = Module(method)
    trainer = _fit(first, max_steps=STEPS, repeat=True)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert "mtlbal" in saved["optimizer_states"][0]  # the balancer's state travels with it

    second = Module(method)  # fresh: weights, strategy state and optimizer come from the file
    _fit(second, max_steps=2 * STEPS, ckpt_path=str(ckpt), repeat=True)
    _assert_params_close(second.net, whole.net, rtol=1e-6, atol=1e-7)
    assert second.balancer.step_count == whole.balancer.step_count
    for p, q in zip(second.balancer.parameters(), whole.balancer.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


class Manual(pl.LightningModule):
    """The manual-optimization recipe of docs/integrations.md (no mixin)."""

    def __init__(self, method: str = "uw") -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = Net()
        self.balancer = _balancer(self.net, method)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        opt.backward(self.net.losses(*batch), scaler=scaler_of(self.trainer))
        opt.step()

    def configure_optimizers(self) -> Any:
        return mtlbal.wrap(torch.optim.SGD(self.net.parameters(), lr=LR), self.balancer)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_manual_optimization_recipe(precision: str) -> None:
    module = Manual()
    if precision == "16-mixed":
        trainer = _fit(module, max_steps=1, **_fp16_on_cpu())
        assert scaler_of(trainer) is not None
    else:
        _fit(module)
    net, _ = _plain("uw", 1 if precision == "16-mixed" else STEPS)
    tol = dict(rtol=1e-6, atol=1e-7) if precision == "32-true" else dict(rtol=2e-2, atol=2e-4)
    _assert_params_close(module.net, net, **tol)


def test_resume_without_the_balancer_state_differs(tmp_path: Path) -> None:
    """The control of the resume test: drop the balancer's state from the checkpoint and the
    resumed run no longer equals the uninterrupted one (the state is what made them equal)."""
    whole = Module("uw")
    _fit(whole, max_steps=2 * STEPS, repeat=True)
    trainer = _fit(Module("uw"), max_steps=STEPS, repeat=True)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    del saved["optimizer_states"][0]["mtlbal"]
    torch.save(saved, ckpt)
    second = Module("uw")
    _fit(second, max_steps=2 * STEPS, ckpt_path=str(ckpt), repeat=True)
    assert not all(
        torch.allclose(p, q, rtol=1e-6, atol=1e-7)
        for p, q in zip(second.net.parameters(), whole.net.parameters())
    )


def test_import_mtlbal_does_not_import_lightning() -> None:
    import subprocess
    import sys

    code = (
        "import sys, mtlbal, mtlbal.integrations; "
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class ValidatedModule(BalancedLightningModule):
    """validation_step returns the per-task losses: the mixin feeds their loop means to CoBa."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()
        self.balancer = mtlbal.Balancer(
            self.net.trunk, weighting=mtlbal.weighting.CoBa(2, warmup_steps=1000)
        )
        self.user_hook_calls = 0

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self.net.losses(*batch)

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        return self.net.losses(*batch)

    def on_validation_epoch_end(self) -> None:  # the user's own hook: wrapped, still fed
        self.user_hook_calls += 1

    def configure_optimizers(self) -> Any:
        return mtlbal.wrap(torch.optim.SGD(self.net.parameters(), lr=LR), self.balancer)


def test_validation_loop_feeds_the_per_task_means() -> None:
    module = ValidatedModule()
    trainer = _trainer(max_steps=STEPS, num_sanity_val_steps=2)
    val = DataLoader(TensorDataset(*(t[:24] for t in _data().tensors)), batch_size=8)
    trainer.fit(module, _loader(), val)
    coba = module.balancer.weighting
    # one validation loop at the end of the (4-step) epoch; the sanity check is not fed
    assert coba.observations == 1 and module.user_hook_calls == 2
    with torch.no_grad():
        per_batch = [module.net.losses(*b) for b in val]
    expected = torch.tensor(
        [sum(float(b[t]) for b in per_batch) / len(per_batch) for t in ("a", "b")],
        dtype=torch.float64,
    )
    assert coba.v0 is not None
    torch.testing.assert_close(coba.v0, expected, rtol=1e-6, atol=1e-7)
