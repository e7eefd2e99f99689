"""Need.VALIDATION: Balancer.observe_validation — matching by name, refusals that change
nothing, the wrapper's delegate, strategies without the need untouched."""

from __future__ import annotations

import pytest
import torch

import mtlbal
from mtlbal.step import Need
from mtlbal.weighting import CoBa, LossContext, LossWeighting, WeightedLosses


class Recorder(LossWeighting):
    """Keeps every validation vector it is given (declared state)."""

    needs = frozenset({Need.VALIDATION})

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.add_state("seen", None, per_task=False)

    def objectives(self, losses: torch.Tensor, ctx: LossContext) -> WeightedLosses:
        w = torch.ones_like(losses)
        return WeightedLosses(w * losses, w)

    def current_weights(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(losses)

    def observe_validation(self, losses: torch.Tensor) -> None:
        row = losses.unsqueeze(0)
        self.seen = row if self.seen is None else torch.cat([self.seen, row])
        if self.fail:
            raise RuntimeError("boom")


def _setup(weighting: LossWeighting, tasks: tuple[str, ...] | None = None):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(3, 4)
    heads = torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in range(2))
    bal = mtlbal.Balancer(trunk, weighting=weighting, tasks=tasks)
    z = trunk(torch.randn(4, 3))
    return bal, {"a": heads[0](z).pow(2).mean(), "b": heads[1](z).pow(2).mean()}


def test_matched_by_name_in_the_canonical_order() -> None:
    rec = Recorder()
    bal, losses = _setup(rec)
    with pytest.raises(ValueError, match="needs the task names"):
        bal.observe_validation({"a": 1.0, "b": 2.0})
    bal.backward(losses)
    bal.observe_validation({"b": torch.tensor(2.0), "a": 1.0})
    bal.observe_validation(torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(
        rec.seen, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    )
    # declared tasks: accepted before the first step
    rec2 = Recorder()
    bal2, _ = _setup(rec2, tasks=("a", "b"))
    bal2.observe_validation([0.5, 0.25])
    assert rec2.seen is not None and rec2.seen.shape == (1, 2)


def test_refusals_change_nothing() -> None:
    rec = Recorder()
    bal, losses = _setup(rec)
    bal.backward(losses)
    bal.observe_validation({"a": 1.0, "b": 2.0})
    before = rec.seen.clone()
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        bal.observe_validation({"a": 1.0})
    with pytest.raises(ValueError, match=r"unknown \['c'\]"):
        bal.observe_validation({"a": 1.0, "b": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match=r"non-finite validation loss for task\(s\) \['b'\]"):
        bal.observe_validation({"a": 1.0, "b": float("nan")})
    with pytest.raises(ValueError, match="must be a scalar"):
        bal.observe_validation({"a": torch.ones(2), "b": 1.0})
    assert torch.equal(rec.seen, before)
    rec.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        bal.observe_validation({"a": 5.0, "b": 6.0})
    assert torch.equal(rec.seen, before)  # the strategy's state was put back


def test_wrapper_delegates_and_others_ignore() -> None:
    bal, losses = _setup(mtlbal.weighting.Equal())
    opt = mtlbal.wrap(torch.optim.SGD(bal.shared_params, lr=0.1), bal)
    opt.backward(losses)
    opt.observe_validation({"a": 1.0, "b": 2.0})  # checked, no strategy needs it
    coba = CoBa(2)
    bal2, losses2 = _setup(coba)
    opt2 = mtlbal.wrap(torch.optim.SGD(bal2.shared_params, lr=0.1), bal2)
    opt2.backward(losses2)
    opt2.observe_validation({"a": 1.0, "b": 2.0})
    assert coba.observations == 1
    assert coba.v0 is not None and coba.v0.tolist() == [1.0, 2.0]


def test_declared_need_without_method_is_named() -> None:
    class NoMethod(Recorder):
        observe_validation = None  # type: ignore[assignment]

    bal, losses = _setup(NoMethod())
    bal.backward(losses)
    with pytest.raises(TypeError, match=r"NoMethod declares Need\.VALIDATION"):
        bal.observe_validation({"a": 1.0, "b": 2.0})
