"""Every aggregator of the package refuses what is not a Jacobian / Gramian, with a message
that says what is wrong (issue 8, item 1)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mtlbal import aggregation as A
from mtlbal.step import Need

CLASSES = sorted(
    (
        c
        for c in vars(A).values()
        if inspect.isclass(c)
        and issubclass(c, A.Aggregator)
        and c not in (A.Aggregator, A.GramianAggregator)
    ),
    key=lambda c: c.__name__,
)
GRAMIAN_CLASSES = [c for c in CLASSES if issubclass(c, A.GramianAggregator)]


# the arguments a constructor cannot do without (for 3 tasks)
REQUIRED: dict[str, Callable[[], dict[str, Any]]] = {
    "Constant": lambda: {"weights": [1.0, 2.0, 0.5]},
    "Krum": lambda: {"n_byzantine": 0},
    "TrimmedMean": lambda: {"trim_number": 1},
    "CRMOGM": lambda: {"aggregator": A.UPGrad()},
}


def _make(cls: type[A.Aggregator]) -> A.Aggregator:
    return cls(**REQUIRED.get(cls.__name__, dict)())


def _jac() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, generator=gen, dtype=torch.float64)


def test_every_aggregator_is_covered() -> None:
    names = {c.__name__ for c in CLASSES}
    assert {"MGDA", "PCGrad", "IMTLG", "CAGrad", "UPGrad", "DualProj", "GradVac"} <= names
    assert {"NashMTL", "AlignedMTL"} <= names


@pytest.mark.parametrize("cls", GRAMIAN_CLASSES, ids=lambda c: c.__name__)
def test_gramian_refusals(cls: type[A.GramianAggregator]) -> None:
    j = _jac()
    g = j @ j.T
    _make(cls).weights(g)  # a valid Gramian is accepted
    with pytest.raises(TypeError, match="floating"):
        _make(cls).weights(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="square"):
        _make(cls).weights(g[:, :2])
    with pytest.raises(ValueError, match="square"):
        _make(cls).weights(g.reshape(-1))
    with pytest.raises(ValueError, match="square"):
        _make(cls).weights(g[None])
    bad = g.clone()
    bad[0, 1] += 1e-3 * float(g.abs().max())
    with pytest.raises(ValueError, match="not symmetric"):
        _make(cls).weights(bad)
    for v in (float("nan"), float("inf")):
        bad = g.clone()
        bad[1, 1] = v
        with pytest.raises(ValueError, match="non-finite"):
            _make(cls).weights(bad)


@pytest.mark.parametrize("cls", GRAMIAN_CLASSES, ids=lambda c: c.__name__)
def test_symmetry_is_relative_to_scale(cls: type[A.GramianAggregator]) -> None:
    j = _jac() * 1e-6
    g = j @ j.T
    ok = g.clone()
    ok[0, 1] += 1e-9 * float(g.abs().max())  # rounding-level asymmetry is accepted
    _make(cls).weights(ok)
    bad = g.clone()
    bad[0, 1] += 1e-3 * float(g.abs().max())  # tiny in absolute terms, large relatively
    with pytest.raises(ValueError, match="not symmetric"):
        _make(cls).weights(bad)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_jacobian_refusals(cls: type[A.Aggregator]) -> None:
    j = _jac()
    # a method that needs the losses (MoCo's loss normalisation) gets them
    kw: dict[str, Any] = (
        {"losses": torch.ones(3, dtype=j.dtype)} if Need.LOSSES in cls.needs else {}
    )
    if Need.CLOSURE in cls.needs:  # F-MTL: standalone, the flatness directions are an input
        kw["flat"] = j.flip(0)
    _make(cls)(j, **kw)
    kw.pop("losses", None)
    with pytest.raises(TypeError, match="floating"):
        _make(cls)(torch.ones(3, 5, dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match=r"\[m, n\]"):
        _make(cls)(j.reshape(-1), **kw)
    with pytest.raises(ValueError, match=r"\[m, n\]"):
        _make(cls)(j[None], **kw)
    for v in (float("nan"), float("-inf")):
        bad = j.clone()
        bad[2, 3] = v
        with pytest.raises(ValueError, match="non-finite"):
            _make(cls)(bad, **kw)
