"""The Attributes suite (many tasks, CelebA-like): its data (uneven label rates, the kinds of
attribute, determinism), the conflict and cost measurements, and a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from benchmarks.suites import attributes


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_problem_has_uneven_tasks_and_is_fixed_by_its_seed() -> None:
    prob, info = attributes.make_problem(24, n_train=2000, n_test=1000)
    assert prob.m == 24 and prob.x_train.shape == (2000, 64) and prob.y_test.shape == (1000, 24)
    assert set(prob.y_train.unique().tolist()) == {0.0, 1.0}
    rates = prob.y_test.mean(0).numpy()
    # positive rates spread over CelebA's range: a few % to about half (noisy ones shifted
    # towards ½ by their flips)
    assert rates.min() < 0.15 and rates.max() > 0.4 and rates.max() < 0.6
    assert [i["kind"] for i in info[:4]] == list(attributes.KINDS)
    assert all((i["flip"] > 0) == (i["kind"] == "noisy") for i in info)
    again, _ = attributes.make_problem.__wrapped__(24, n_train=2000, n_test=1000)
    assert torch.equal(again.x_train, prob.x_train) and torch.equal(again.y_test, prob.y_test)
    other, _ = attributes.make_problem.__wrapped__(24, n_train=2000, n_test=1000, data_seed=1)
    assert not torch.equal(other.y_train, prob.y_train)
    with pytest.raises(ValueError, match="m must be positive"):
        attributes.make_problem.__wrapped__(0)


def test_linear_attributes_are_easier_than_products() -> None:
    # a least-squares linear probe on the inputs: far better on linear than on product tasks
    prob, info = attributes.make_problem(24, n_train=2000, n_test=1000)
    x = torch.cat([prob.x_train, torch.ones(2000, 1)], 1).double()
    xt = torch.cat([prob.x_test, torch.ones(1000, 1)], 1).double()
    w = torch.linalg.lstsq(x, prob.y_train.double() - 0.5).solution
    pred = (xt @ w > 0).double()
    gain = []  # accuracy above the majority class
    for t, i in enumerate(info):
        y = prob.y_test[:, t].double()
        base = max(float(y.mean()), 1 - float(y.mean()))
        gain.append((i["kind"], float((pred[:, t] == y).double().mean()) - base))
    lin = np.mean([g for k, g in gain if k == "linear"])
    prod = np.mean([g for k, g in gain if k == "product"])
    assert lin > 0.05 and prod < 0.02 and lin > prod + 0.05


def test_conflict_and_cost_measurements() -> None:
    prob, _ = attributes.make_problem(6, n_train=512, n_test=512)
    c = attributes.conflict(prob, 0, train_steps=2, batches=1)
    assert 0.0 <= c["negative_pairs"] <= 1.0 and -1.0 <= c["mean_cos"] <= 1.0
    # 24 attributes sharing 12 latents with random signs: conflicting pairs are frequent
    prob24, _ = attributes.make_problem(24, n_train=512, n_test=512)
    assert attributes.conflict(prob24, 0, train_steps=0, batches=1)["negative_pairs"] > 0.25
    rows = attributes.step_cost(["Equal", "MGDA"], (2, 3), rounds=1, steps=1)
    assert [(r["m"], r["strategy"]) for r in rows] == [
        (2, "Equal"),
        (2, "MGDA"),
        (3, "Equal"),
        (3, "MGDA"),
    ]
    assert all(r["ms_per_step"] > 0 for r in rows)
    assert [r["vs_equal"] for r in rows if r["strategy"] == "Equal"] == [1.0, 1.0]


def test_tiny_run() -> None:
    strategies = ["Equal", "UPGrad", "FAMO"]
    a = attributes.run(strategies=strategies, seeds=[0], quick=True, tiny=True, show_progress=False)
    b = attributes.run(
        strategies=strategies, seeds=[0], quick=True, tiny=True, show_progress=False, cost=False
    )
    assert [r["strategy"] for r in a["rows"]] == ["STL", *strategies]
    keys = a["tasks"]
    assert len(keys) == 4
    assert [[r[k] for k in keys] for r in a["rows"]] == [[r[k] for k in keys] for r in b["rows"]]
    for r in a["rows"]:
        assert all(0.0 <= r[k] <= 1.0 for k in keys)
        assert r["worst_acc"] <= r["mean_acc"]
    assert "Δm%" in a["markdown"] and "Conflict" in a["markdown"]
    # the cost table: every strategy at m = 2 and 4 (Equal added as the reference)
    assert {(r["m"], r["strategy"]) for r in a["cost"]} == {
        (m, s) for m in (2, 4) for s in strategies
    }
    assert "m = 4" in a["markdown"]
    json.dumps(a)


def test_the_command_finds_the_suite() -> None:
    from benchmarks import __main__ as cli

    assert "attributes" in cli.discover()
    assert cli.expand(["attributes"]) == (["attributes"], False)
