"""A Hugging Face model trained on two tasks with ``BalancedTrainer``.

The model's ``forward`` returns its per-task losses as a dict under ``"losses"``;
``mtlbal.integrations.huggingface.BalancedTrainer`` (a ``transformers.Trainer``) hands them to
the balancer, which fills ``.grad``, and the ``Trainer`` steps as usual. The balancer runs
uncertainty weighting at the loss level and UPGrad on the encoder's output (a cut point:
``at=model.bert, select="last_hidden_state"``, one backward through the encoder per step).

The encoder is a tiny BERT built from a config with random weights (nothing to download). Two
tasks on synthetic token sequences: is token 1 in the sequence (classification), and what
fraction of the tokens are below 10 (regression).

Needs ``pip install transformers accelerate``. Run (a few seconds on a CPU)::

    python examples/hf_trainer.py              # 40 steps
    python examples/hf_trainer.py --steps 5
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel, TrainingArguments

import mtlbal
from mtlbal.integrations.huggingface import BalancedTrainer

VOCAB, LENGTH = 32, 12


class TwoTaskBert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=LENGTH,
        )
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls_head = nn.Linear(32, 2)
        self.reg_head = nn.Linear(32, 1)

    def forward(
        self, input_ids: Tensor, labels: Tensor, target: Tensor
    ) -> dict[str, dict[str, Tensor]]:
        h = self.bert(input_ids=input_ids).last_hidden_state[:, 0]  # the first token's state
        return {
            "losses": {
                "has_one": nn.functional.cross_entropy(self.cls_head(h), labels),
                "fraction": nn.functional.mse_loss(self.reg_head(h).squeeze(-1), target),
            }
        }


def make_data(n: int, generator: torch.Generator) -> list[dict[str, Tensor]]:
    ids = torch.randint(2, VOCAB, (n, LENGTH), generator=generator)
    ids[:, 0] = 0  # position 0 holds a fixed token, as BERT's [CLS]
    ones = torch.rand(n, generator=generator) < 0.5
    where = torch.randint(1, LENGTH, (n,), generator=generator)
    ids[ones, where[ones]] = 1
    target = (ids[:, 1:] < 10).float().mean(1)
    return [{"input_ids": i, "labels": y.long(), "target": t} for i, y, t in zip(ids, ones, target)]


@torch.no_grad()
def evaluate(model: TwoTaskBert, data: list[dict[str, Tensor]]) -> dict[str, float]:
    model.eval()
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    losses = {k: float(v) for k, v in model(**batch)["losses"].items()}
    model.train()
    return losses


def fmt(values: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.3g}" for k, v in values.items())


def main(steps: int = 40, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, val = make_data(512, g), make_data(256, g)
    model = TwoTaskBert()
    balancer = mtlbal.Balancer(
        model.bert,
        weighting=mtlbal.weighting.UncertaintyWeighting(
            2, task_types=["classification", "regression"]
        ),
        aggregator=mtlbal.aggregation.UPGrad(),
        at=model.bert,  # the cut point: BertModel returns a ModelOutput ...
        select="last_hidden_state",  # ... and this is the representation the tasks share
    )
    before = evaluate(model, val)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=32,
            learning_rate=2e-3,
            lr_scheduler_type="linear",
            warmup_steps=min(5, steps // 4),
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=max(1, steps // 4),
            disable_tqdm=True,
            seed=seed,
        )
        trainer = BalancedTrainer(model=model, args=args, train_dataset=train, balancer=balancer)
        trainer.train()
    after = evaluate(model, val)

    info = trainer.last_info  # the last step's StepInfo
    assert trainer.state.global_step == steps == balancer.step_count
    print(f"before  {fmt(before)}")
    print(f"after   {fmt(after)}")
    print(f"last step's task weights: {fmt(dict(zip(info.tasks, info.weights.tolist())))}")
    for task in before:
        assert after[task] < before[task], (task, before[task], after[task])
    print(f"hf_trainer: OK  {trainer.state.global_step} steps")
    return after


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed)
