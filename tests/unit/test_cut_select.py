"""Cut points on modules that return a container: ``Balancer(..., at=module, select=...)``.

The selected element is replaced by the detached leaf in a copy of the same container type; the
results equal, bitwise, those of a model whose cut module returns the tensor directly.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict, namedtuple
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import mtlbal
from conftest import Problem, make_problem
from mtlbal.aggregation import MGDA, UPGrad


# ------------------------------------------------------------------ ModelOutput look-alikes
class Out(OrderedDict[str, Any]):
    """Items and attributes mirror each other (what HF's ModelOutput guarantees)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


@dataclasses.dataclass
class HFOut(OrderedDict[str, Any]):
    """Closer to transformers.utils.ModelOutput: a dataclass whose fields live both in
    ``__dict__`` and as items, ``__setitem__``/``__setattr__`` keeping them in step, and HF's
    ``__reduce__`` (the dataclass fields as constructor arguments)."""

    last_hidden_state: Tensor | None = None
    pooled: Tensor | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None:
                self[f.name] = v

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __reduce__(self) -> Any:
        fn, _args, *rest = super().__reduce__()  # type: ignore[str-unpack]
        args = tuple(getattr(self, f.name) for f in dataclasses.fields(self))
        return (fn, args, *rest)


Pair = namedtuple("Pair", ["aux", "hidden"])


@dataclasses.dataclass
class Plain:
    hidden: Tensor
    aux: Tensor


# ------------------------------------------------------------------ the models
def _pack(kind: str, z: Tensor, aux: Tensor) -> Any:
    if kind == "tuple":
        return (z, aux)
    if kind == "list":
        return [aux, z]
    if kind == "dict":
        return {"aux": aux, "hidden": z}
    if kind == "out":
        return Out(hidden=z, aux=aux)
    if kind == "hf":
        return HFOut(last_hidden_state=z, pooled=aux)
    if kind == "namedtuple":
        return Pair(aux, z)
    assert kind == "dataclass"
    return Plain(hidden=z, aux=aux)


SELECT: dict[str, str | int] = {
    "tuple": 0,
    "list": -1,
    "dict": "hidden",
    "out": "hidden",
    "hf": "last_hidden_state",
    "namedtuple": "hidden",
    "dataclass": "hidden",
}
KINDS = list(SELECT)


class Wrapped(nn.Module):
    """Returns the trunk's output inside a container, next to another tensor of the trunk."""

    def __init__(self, trunk: nn.Module, kind: str) -> None:
        super().__init__()
        self.trunk, self.kind = trunk, kind

    def forward(self, x: Tensor) -> Any:
        z = self.trunk(x)
        return _pack(self.kind, z, z.pow(2).sum(-1, keepdim=True))


def _get(out: Any, select: str | int) -> Tensor:
    if isinstance(select, int) or isinstance(out, dict):
        return out[select]
    assert isinstance(select, str)
    return getattr(out, select)


def _losses(p: Problem, z: Tensor, extra: Tensor | None = None) -> dict[str, Tensor]:
    out = {}
    for t, (h, y) in enumerate(zip(p.heads, p.ys)):
        pred = h(z) if extra is None else h(z) * extra
        out[f"task{t}"] = (t + 1.0) * (pred - y).pow(2).mean() + 0.1 * (t + 1)
    return out


def _pair(kind: str) -> tuple[Problem, Problem, Wrapped]:
    ref = make_problem(3, dtype=torch.float64)
    sel = copy.deepcopy(ref)
    return ref, sel, Wrapped(sel.trunk, kind)


def _grads(p: Problem) -> list[Tensor]:
    return [q.grad for q in p.params()]  # type: ignore[misc]


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("make_agg", [MGDA, UPGrad], ids=["MGDA", "UPGrad"])
def test_selected_cut_equals_a_tensor_cut(kind: str, make_agg: Callable[[], Any]) -> None:
    ref, sel, wrapped = _pair(kind)
    select = SELECT[kind]
    b_ref = mtlbal.Balancer(ref.trunk, at=ref.trunk, aggregator=make_agg())
    b_sel = mtlbal.Balancer(wrapped, at=wrapped, select=select, aggregator=make_agg())
    for _ in range(2):  # two steps: stateful solvers see the same history
        ref.zero_grad()
        sel.zero_grad()
        info_ref = b_ref.backward(_losses(ref, ref.trunk(ref.x)))
        out = wrapped(sel.x)
        assert type(out) is type(_pack(kind, sel.x, sel.x))
        z = _get(out, select)
        assert z.grad_fn is None and z.requires_grad  # the heads read the leaf
        info_sel = b_sel.backward(_losses(sel, z))
        torch.testing.assert_close(info_sel.weights, info_ref.weights, rtol=0, atol=0)
        for a, b in zip(_grads(ref), _grads(sel)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        with torch.no_grad():
            for q in [*ref.params(), *sel.params()]:
                q.sub_(0.1 * q.grad)  # type: ignore[operator]


@pytest.mark.parametrize("kind", ["out", "hf"])
def test_model_output_item_and_attribute_are_the_leaf(kind: str) -> None:
    _, sel, wrapped = _pair(kind)
    select = str(SELECT[kind])
    b = mtlbal.Balancer(wrapped, at=wrapped, select=select, aggregator=MGDA())
    out = wrapped(sel.x)
    assert type(out) is (Out if kind == "out" else HFOut)
    assert out[select] is getattr(out, select)
    assert out[select].grad_fn is None and out[select].requires_grad
    other = "aux" if kind == "out" else "pooled"
    assert out[other].grad_fn is not None  # the other entries keep their graph
    assert list(out.keys()) == list(_pack(kind, sel.x, sel.x).keys())
    b.remove()


@pytest.mark.parametrize("kind", KINDS)
def test_without_per_task_grads_nothing_is_detached(kind: str) -> None:
    # equal weights: no per-task gradient at the cut, the output passes through unchanged and a
    # head may read any element; bitwise equal to a plain backward
    ref, sel, wrapped = _pair(kind)
    select = SELECT[kind]
    others: dict[str, str | int] = {"tuple": 1, "list": 0, "hf": "pooled"}
    other = others.get(kind, "aux")
    ref.zero_grad()
    z = ref.trunk(ref.x)
    sum(_losses(ref, z, z.pow(2).sum(-1, keepdim=True)).values()).backward()  # type: ignore[union-attr]
    b = mtlbal.Balancer(wrapped, at=wrapped, select=select)
    out = wrapped(sel.x)
    b.backward(_losses(sel, _get(out, select), _get(out, other)))
    for a, c in zip(_grads(ref), _grads(sel)):
        assert torch.equal(a, c)


# ------------------------------------------------------------------ the other elements
@pytest.mark.parametrize("kind", ["tuple", "hf"])
def test_a_head_reading_another_element_is_refused(kind: str) -> None:
    # the other elements keep their graph to the trunk; a loss that reaches the trunk through
    # one of them would escape the per-task gradients taken at the selected element
    _, sel, wrapped = _pair(kind)
    select = SELECT[kind]
    other = 1 if kind == "tuple" else "pooled"
    b = mtlbal.Balancer(wrapped, at=wrapped, select=select, aggregator=MGDA())
    out = wrapped(sel.x)
    with pytest.raises(
        ValueError, match="task 'task0' reaches the shared parameters other than through"
    ):
        b.backward(_losses(sel, _get(out, select), _get(out, other)))
    assert all(q.grad is None for q in sel.params())


def test_another_element_that_does_not_reach_the_trunk_is_fine() -> None:
    # an element built from the input only (no shared parameter behind it) bypasses nothing
    ref, sel, _ = _pair("tuple")

    class WithInput(nn.Module):
        def __init__(self, trunk: nn.Module) -> None:
            super().__init__()
            self.trunk = trunk

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.trunk(x), x.sum(-1, keepdim=True)

    wrapped = WithInput(sel.trunk)
    b_ref = mtlbal.Balancer(ref.trunk, at=ref.trunk, aggregator=UPGrad())
    b_sel = mtlbal.Balancer(wrapped, at=wrapped, select=0, aggregator=UPGrad())
    extra = ref.x.sum(-1, keepdim=True)
    b_ref.backward(_losses(ref, ref.trunk(ref.x), extra))
    z, e = wrapped(sel.x)
    b_sel.backward(_losses(sel, z, e))
    for a, c in zip(_grads(ref), _grads(sel)):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


# ------------------------------------------------------------------ errors
class Returns(nn.Module):
    def __init__(self, make: Callable[[Tensor], Any]) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.make = make

    def forward(self, x: Tensor) -> Any:
        return self.make(self.lin(x))


def _forward(make: Callable[[Tensor], Any], select: str | int | None) -> None:
    m = Returns(make)
    b = mtlbal.Balancer(m, at=m, select=select, aggregator=MGDA())
    try:
        m(torch.randn(5, 3))
    finally:
        b.remove()


def test_a_tuple_without_select_says_how_to_select() -> None:
    with pytest.raises(TypeError, match=r"Returns must return a single tensor.*select="):
        _forward(lambda z: (z, z), None)


@pytest.mark.parametrize(
    ("make", "select", "error", "match"),
    [
        (lambda z: {"a": z}, "b", ValueError, r"Returns: select='b' is not a key.*\['a'\]"),
        (lambda z: (z, z), 2, ValueError, r"Returns: select=2 is out of range.*length 2"),
        (lambda z: [z], -2, ValueError, r"select=-2 is out of range.*list of length 1"),
        (lambda z: (z, 3), 1, TypeError, r"Returns: select=1 names a int, not a tensor"),
        (lambda z: {"a": z, "n": None}, "n", TypeError, r"select='n' names a NoneType"),
        (lambda z: {"a": z}, 0, TypeError, r"select=0 \(a position\) needs a tuple or list"),
        (lambda z: (z, z), "a", TypeError, r"select='a' \(a name\) cannot select from a tuple"),
        (lambda z: Plain(z, z), "nope", ValueError, r"select='nope' is not an attribute"),
        (lambda z: z, 0, TypeError, r"returned a single tensor, but select=0 was given"),
    ],
)
def test_bad_selection_names_module_and_selector(
    make: Callable[[Tensor], Any], select: str | int, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _forward(make, select)


def test_bad_select_arguments() -> None:
    p = make_problem(2)
    with pytest.raises(ValueError, match="needs at=module"):
        mtlbal.Balancer(p.trunk, select=0)
    for bad in (lambda o: o[0], 1.0, True, ("a", 0)):
        with pytest.raises(TypeError, match="select must be a key or attribute name"):
            mtlbal.Balancer(p.trunk, at=p.trunk, select=bad)  # type: ignore[arg-type]
    # nothing was hooked by the refused constructions
    z = p.trunk(p.x)
    assert z.grad_fn is not None


def test_repr_shows_the_selector() -> None:
    _, _, wrapped = _pair("dict")
    b = mtlbal.Balancer(wrapped, at=wrapped, select="hidden", aggregator=MGDA())
    assert "at=Wrapped['hidden']" in repr(b)
