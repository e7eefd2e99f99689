"""BalancedTrainer (Hugging Face) on a tiny randomly initialised BERT: no download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import BertConfig, BertModel, TrainingArguments

import mtlbal
from mtlbal.integrations.huggingface import BalancedTrainer, losses_from_outputs

N, L, V = 16, 6, 50


class TwoTask(nn.Module):
    """A tiny BERT with a classification head and a regression head; forward returns losses."""

    def __init__(self) -> None:
        super().__init__()
        cfg = BertConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=V,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.cls = nn.Linear(16, 3)
        self.reg = nn.Linear(16, 1)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, target: torch.Tensor
    ) -> dict[str, object]:
        h = self.bert(input_ids=input_ids).last_hidden_state[:, 0]
        return {
            "losses": {
                "cls": nn.functional.cross_entropy(self.cls(h), labels),
                "reg": nn.functional.mse_loss(self.reg(h).squeeze(-1), target),
            }
        }


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, V, (N, L), generator=g)
        self.label = torch.randint(0, 3, (N,), generator=g)
        self.target = torch.randn(N, generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.label[i], "target": self.target[i]}


def _args(out: Path, **kw: object) -> TrainingArguments:
    base: dict[str, object] = dict(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_drop_last=True,
        seed=0,
        data_seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)  # type: ignore[arg-type]


def _balancer(model: TwoTask, kind: str) -> mtlbal.Balancer:
    if kind == "mgda":
        return mtlbal.Balancer(
            model.bert,
            at=model.bert,
            select="last_hidden_state",
            aggregator=mtlbal.aggregation.MGDA(),
        )
    return mtlbal.Balancer(model.bert, weighting=mtlbal.weighting.UncertaintyWeighting(2))


def _hand_loop(
    kind: str, batches: list[dict[str, torch.Tensor]], optim: str = "adamw"
) -> tuple[TwoTask, object]:
    torch.manual_seed(0)
    model = TwoTask()
    bal = _balancer(model, kind)
    groups: list[dict[str, object]] = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    extra = list(bal.parameters())
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0, "lr": 1e-2})
    inner = (
        torch.optim.SGD(groups, lr=1e-2)
        if optim == "sgd"
        else torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.0)
    )
    opt = mtlbal.wrap(inner, bal)
    for batch in batches:
        opt.zero_grad()
        opt.backward(model(**batch)["losses"])
        opt.step()
    return model, bal


def _trainer(kind: str, out: Path, **kw: object) -> tuple[BalancedTrainer, TwoTask]:
    torch.manual_seed(0)
    model = TwoTask()
    trainer = BalancedTrainer(
        model=model,
        args=_args(out, **kw),
        train_dataset=Data(),
        balancer_factory=lambda m: _balancer(m, kind),  # type: ignore[arg-type]
    )
    return trainer, model


def _record(trainer: BalancedTrainer) -> list[dict[str, torch.Tensor]]:
    """Record the batches the Trainer trains on, in order."""
    seen: list[dict[str, torch.Tensor]] = []
    step = trainer.training_step

    def recording(model: nn.Module, inputs: dict[str, torch.Tensor], *a: object) -> torch.Tensor:
        seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return step(model, inputs, *a)  # type: ignore[arg-type]

    trainer.training_step = recording  # type: ignore[method-assign,assignment]
    return seen


@pytest.mark.parametrize("kind", ["mgda", "uncertainty"])
def test_trainer_matches_a_hand_written_loop(kind: str, tmp_path: Path) -> None:
    trainer, model = _trainer(kind, tmp_path)
    before = [p.detach().clone() for p in trainer.balancer.parameters()]
    batches = _record(trainer)
    trainer.train()
    assert len(batches) == 3
    ref, ref_bal = _hand_loop(kind, batches)
    assert trainer.balancer.step_count == 3
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    for p, q, b in zip(trainer.balancer.parameters(), ref_bal.parameters(), before):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, b), "the strategy parameters were not optimised"
    assert trainer.last_info is not None and trainer.last_info.weights.shape == (2,)


def test_resume_restores_the_balancer_state(tmp_path: Path) -> None:
    trainer, _ = _trainer("uncertainty", tmp_path, save_strategy="steps", save_steps=2)
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "optimizer.pt").is_file()
    # a fresh trainer resumed at step 2 ends where the uninterrupted run ended
    resumed, _ = _trainer("uncertainty", tmp_path / "r", save_strategy="no")
    seen: dict[str, object] = {}
    orig = resumed._load_optimizer_and_scheduler

    def spy(checkpoint: str | None) -> None:
        orig(checkpoint)
        seen["step"] = resumed.balancer.step_count
        seen["params"] = [p.detach().clone() for p in resumed.balancer.parameters()]

    resumed._load_optimizer_and_scheduler = spy  # type: ignore[method-assign]
    resumed.train(resume_from_checkpoint=str(ckpt))
    # HF's optimizer.pt carries the balancer's state (the wrapper's state_dict), loaded on resume
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)["mtlbal"]["balancer"]
    assert saved["step"] == seen["step"] == 2
    torch.testing.assert_close(seen["params"][0], saved["weighting"]["log_vars"])  # type: ignore[index]
    assert not torch.equal(saved["weighting"]["log_vars"], torch.zeros(2))
    assert resumed.balancer.step_count == trainer.balancer.step_count == 3
    for p, q in zip(resumed.balancer.parameters(), trainer.balancer.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bf16_on_cpu_runs(tmp_path: Path) -> None:
    trainer, _ = _trainer("mgda", tmp_path, bf16=True)
    assert getattr(trainer.accelerator, "scaler", None) is None  # bf16: no GradScaler
    trainer.train()
    assert trainer.balancer.step_count == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("kind", ["mgda", "uncertainty"])
def test_gradient_accumulation_is_the_large_batch_step(kind: str, tmp_path: Path) -> None:
    # 2 micro-batches of 4 per optimizer step == one batch of 8 (mean losses, equal sizes).
    # SGD: Adam would normalise the float32 rounding noise of near-zero gradients (attention
    # biases), which differs between one batch and two micro-batches
    trainer, model = _trainer(
        kind,
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=2,
        optim="sgd",
    )
    batches = _record(trainer)
    trainer.train()
    assert len(batches) == 4 and trainer.balancer.step_count == 2
    assert trainer.last_info is not None and trainer.last_info.micro_batches == 2
    large = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(batches[0::2], batches[1::2])]
    ref, ref_bal = _hand_loop(kind, large, optim="sgd")
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    for p, q in zip(trainer.balancer.parameters(), ref_bal.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_losses_from_outputs() -> None:
    a = torch.tensor(1.0)
    assert losses_from_outputs({"losses": {"a": a}}) == {"a": a}
    assert losses_from_outputs({"a": a}) == {"a": a}
    with pytest.raises(ValueError, match="per-task losses"):
        losses_from_outputs({"logits": a, "x": 1})


def test_accelerate_recipe_runs() -> None:
    """The recipe of docs/integrations.md ("Accelerate"), on the tiny model."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = TwoTask()
    balancer = mtlbal.Balancer(model.bert, weighting=mtlbal.weighting.UncertaintyWeighting(2))
    opt = mtlbal.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), balancer)
    loader = torch.utils.data.DataLoader(Data(), batch_size=8)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    before = [p.detach().clone() for p in balancer.parameters()]
    for batch in loader:
        opt.zero_grad()
        balancer.backward(model(**batch)["losses"], scaler=accelerator.scaler)
        opt.step()
    assert balancer.step_count == 2
    assert not all(torch.equal(p, b) for p, b in zip(balancer.parameters(), before))


def test_import_mtlbal_does_not_import_transformers() -> None:
    import subprocess
    import sys

    code = "import sys, mtlbal; assert 'transformers' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(Path(mtlbal.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_a_second_train_and_a_given_optimizer(tmp_path: Path) -> None:
    trainer, _ = _trainer("uncertainty", tmp_path)
    trainer.train()
    trainer.train()  # the optimizer is not wrapped twice
    assert trainer.balancer.step_count == 6
    torch.manual_seed(0)
    model = TwoTask()
    given = torch.optim.SGD(model.parameters(), lr=1e-2)
    trainer = BalancedTrainer(
        model=model,
        args=_args(tmp_path / "given"),
        train_dataset=Data(),
        optimizers=(given, None),
        balancer=_balancer(model, "uncertainty"),
    )
    before = [p.detach().clone() for p in trainer.balancer.parameters()]
    trainer.train()
    assert isinstance(trainer._balanced, mtlbal.BalancedOptimizer)
    assert trainer._balanced.optimizer is given
    # the strategy parameters are stepped by the wrapper's own optimizer
    assert trainer._balanced.balancer_optimizer is not None
    assert not torch.equal(next(iter(trainer.balancer.parameters())), before[0])


def test_evaluate_feeds_the_per_task_means(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TwoTask()
    bal = mtlbal.Balancer(model.bert, weighting=mtlbal.weighting.CoBa(2, warmup_steps=1000))
    trainer = BalancedTrainer(
        model=model,
        args=_args(tmp_path, per_device_eval_batch_size=8),
        train_dataset=Data(),
        eval_dataset=Data(),
        balancer=bal,
    )
    trainer.train()
    metrics = trainer.evaluate()
    coba = bal.weighting
    assert coba.observations == 1 and coba.v0 is not None
    model.eval()
    data = Data()
    with torch.no_grad():
        halves = [
            model(
                input_ids=data.ids[i : i + 8],
                labels=data.label[i : i + 8],
                target=data.target[i : i + 8],
            )["losses"]
            for i in (0, 8)
        ]
    expected = torch.tensor(
        [sum(float(h[t]) for h in halves) / 2 for t in ("cls", "reg")], dtype=torch.float64
    )
    torch.testing.assert_close(coba.v0, expected, rtol=1e-5, atol=1e-6)
    assert metrics["eval_loss_cls"] == pytest.approx(float(expected[0]), rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(float(expected.sum()), rel=1e-5)
