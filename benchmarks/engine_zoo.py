"""Model zoo benchmark of the per-task-gradient engines (issue 11).

Models (trunk shared, ``m`` linear heads, MSE per task): ``mlp`` 256→3×512 (Linear + ReLU);
``cnn`` 4 conv 3×3 + BatchNorm (train mode) + ReLU on 32×32 inputs (3→32→32, max-pool,
32→64→64, global average pool); ``transformer`` a 2-layer encoder (d = 128, 4 heads, FFN 256,
batch-first, no dropout) on 16 tokens, mean-pooled. UPGrad at the shared parameters.

Variants (each on its own copy of the model, same initialisation and batch):

- ``plain``: ``Σ_t L_t`` backward (ratio 1);
- ``auto``: ``mtlbal.Balancer(trunk, aggregator=UPGrad())`` (the default engine);
- ``dense``: the same with ``engine="dense"``;
- ``loop``: the exact-gradient floor: one ``torch.autograd.grad`` per task (trunk + own head),
  the Gramian, UPGrad weights (:func:`mtlbal.functional.upgrad_weights`), ``.grad = Σ w_t g_t``;
- ``jd_autojac``: TorchJD ``mtl_backward(losses, features=z)`` + ``jac_to_grad(trunk, UPGrad())``;
- ``jd_autogram``: TorchJD ``autogram.Engine(trunk, batch_dim=None)`` (the losses are batch
  means, so no per-sample dimension), Gramian, ``UPGradWeighting``, weighted backward.

Timing: process CPU time (``time.process_time``), ``torch.set_num_threads(1)`` by default, the
variants interleaved in a new random order each round, the median per-step time over rounds.
Peak memory: ``torch.profiler.profile(profile_memory=True)`` over one step after warm-up; the
allocator's ``[memory]`` events are summed in time order and the peak of that running total
(bytes allocated during the step above what was live when it began) is reported, per variant.

Run: ``PYTHONPATH=src python benchmarks/engine_zoo.py`` (``--quick`` for a toy size;
``--out benchmarks/results/engine_zoo.md`` writes the table).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

import mtlbal
from mtlbal.aggregation import UPGrad
from mtlbal.functional import upgrad_weights

Step = Callable[[], None]
VARIANTS = ("plain", "auto", "dense", "loop", "jd_autojac", "jd_autogram")


def build(name: str, batch: int, m: int, small: bool = False) -> tuple[nn.Module, int, Tensor]:
    """The trunk, its feature size and an input batch."""
    torch.manual_seed(0)
    if name == "mlp":
        w = 32 if small else 512
        d0 = 16 if small else 256
        trunk: nn.Module = nn.Sequential(
            nn.Linear(d0, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU()
        )
        return trunk, w, torch.randn(batch, d0)
    if name == "cnn":
        c1, c2 = (4, 8) if small else (32, 64)
        s = 8 if small else 32
        trunk = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        return trunk, c2, torch.randn(batch, 3, s, s)
    if name == "transformer":
        d, tokens = (16, 4) if small else (128, 16)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        class Pooled(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.enc = enc

            def forward(self, x: Tensor) -> Tensor:
                return self.enc(x).mean(1)

        return Pooled(), d, torch.randn(batch, tokens, d)
    raise ValueError(f"unknown model {name!r}")


def make_steps(
    model: str, batch: int, m: int, small: bool = False, names: tuple[str, ...] = VARIANTS
) -> tuple[dict[str, Step], dict[str, list[Tensor]]]:
    trunk0, width, x = build(model, batch, m, small)
    heads0 = nn.ModuleList([nn.Linear(width, 8) for _ in range(m)])
    ys = torch.randn(m, batch, 8)
    steps: dict[str, Step] = {}
    shared_of: dict[str, list[Tensor]] = {}

    def copy_model(name: str) -> tuple[nn.Module, nn.ModuleList, Callable[[], None]]:
        trunk, heads = copy.deepcopy(trunk0), copy.deepcopy(heads0)
        params = [*trunk.parameters(), *heads.parameters()]
        shared_of[name] = list(trunk.parameters())

        def zero() -> None:
            for p in params:
                p.grad = None

        return trunk, heads, zero

    def losses(heads: nn.ModuleList, z: Tensor) -> list[Tensor]:
        return [nn.functional.mse_loss(h(z), ys[i]) for i, h in enumerate(heads)]

    for name in names:
        trunk, heads, zero = copy_model(name)
        if name == "plain":

            def step(
                trunk: nn.Module = trunk, heads: nn.ModuleList = heads, zero: Step = zero
            ) -> None:
                zero()
                torch.stack(losses(heads, trunk(x))).sum().backward()

        elif name in ("auto", "dense"):
            eng: Literal["auto", "dense"] = "auto" if name == "auto" else "dense"
            bal = mtlbal.Balancer(trunk, aggregator=UPGrad(), engine=eng, nonfinite="off")

            def step(  # type: ignore[misc]
                trunk: nn.Module = trunk,
                heads: nn.ModuleList = heads,
                zero: Step = zero,
                bal: mtlbal.Balancer = bal,
            ) -> None:
                zero()
                bal.backward(losses(heads, trunk(x)))

        elif name == "loop":
            shared: list[Tensor] = list(trunk.parameters())

            def step(  # type: ignore[misc]
                trunk: nn.Module = trunk,
                heads: nn.ModuleList = heads,
                zero: Step = zero,
                shared: list[Tensor] = shared,
            ) -> None:
                zero()
                ls = losses(heads, trunk(x))
                rows = []
                for t, loss in enumerate(ls):
                    own: list[Tensor] = list(heads[t].parameters())
                    gs = torch.autograd.grad(loss, shared + own, retain_graph=t < m - 1)
                    rows.append(gs[: len(shared)])
                    for q, g in zip(own, gs[len(shared) :]):
                        q.grad = g
                flat = [torch.stack([r[j].reshape(-1) for r in rows]) for j in range(len(shared))]
                gram = flat[0] @ flat[0].T
                for f in flat[1:]:
                    gram = gram + f @ f.T
                w = upgrad_weights(gram)
                for p, f in zip(shared, flat):
                    p.grad = (w.to(f.dtype) @ f).view_as(p)

        elif name == "jd_autojac":
            from torchjd import aggregation as jda
            from torchjd import autojac

            agg = jda.UPGrad()

            def step(  # type: ignore[misc]
                trunk: nn.Module = trunk,
                heads: nn.ModuleList = heads,
                zero: Step = zero,
                agg: object = agg,
            ) -> None:
                zero()
                z = trunk(x)
                autojac.mtl_backward(losses(heads, z), features=z)
                autojac.jac_to_grad(list(trunk.parameters()), agg)  # type: ignore[call-overload]

        elif name == "jd_autogram":
            from torchjd import aggregation as jda
            from torchjd import autogram

            engine = autogram.Engine(trunk, batch_dim=None)
            weighting = jda.UPGradWeighting()

            def step(  # type: ignore[misc]
                trunk: nn.Module = trunk,
                heads: nn.ModuleList = heads,
                zero: Step = zero,
                engine: object = engine,
                weighting: object = weighting,
            ) -> None:
                zero()
                ls = torch.stack(losses(heads, trunk(x)))
                gram = engine.compute_gramian(ls)  # type: ignore[attr-defined]
                ls.backward(weighting(gram))  # type: ignore[operator]

        else:
            raise ValueError(name)
        steps[name] = step
    return steps, shared_of


def peak_bytes(step: Step) -> int:
    """Peak of the running total of the allocator's events during one step (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    assert prof.profiler is not None and prof.profiler.kineto_results is not None
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda te: te[0])
    live = peak = 0
    for _, b in events:
        live += b
        peak = max(peak, live)
    return peak


def bench_row(
    model: str, batch: int, m: int, rounds: int, small: bool = False, memory: bool = True
) -> tuple[dict[str, float], dict[str, float], float]:
    steps, shared_of = make_steps(model, batch, m, small)
    for s in steps.values():  # warm-up (and the first step's checks)
        s()
        s()
    # the engines agree on the update (same init, same batch)
    ref = shared_of["loop"]
    diff = 0.0
    for name in ("auto", "dense"):
        for a, b in zip(shared_of[name], ref):
            assert a.grad is not None and b.grad is not None
            diff = max(diff, float((a.grad - b.grad).abs().max() / (b.grad.abs().max() + 1e-12)))
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            t0 = time.process_time()
            steps[k]()
            times[k].append(time.process_time() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    mem = {k: peak_bytes(s) / 2**20 for k, s in steps.items()} if memory else {}
    return med, mem, diff


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--tasks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="toy sizes (a smoke run)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    head = (
        "| model | batch | m | plain ms | auto | dense | loop (floor) | jd autojac | jd autogram "
        "| auto / floor | auto / best other | peak MiB: plain · auto · dense · loop · autojac "
        "· autogram | max rel. diff vs loop |"
    )
    lines = [head, "|" + "---|" * 13]
    for model in args.models:
        for batch in args.batch:
            for m in args.tasks:
                med, mem, diff = bench_row(
                    model, batch, m, args.rounds, small=args.quick, memory=not args.no_memory
                )
                base = med["plain"]
                others = min(v for k, v in med.items() if k not in ("plain", "auto", "loop"))
                cells = [f"{med[k] / base:.2f}×" for k in VARIANTS[1:]]
                mems = " · ".join(f"{mem[k]:.0f}" for k in VARIANTS) if mem else "-"
                line = (
                    f"| {model} | {batch} | {m} | {base:.1f} | "
                    + " | ".join(cells)
                    + f" | {med['auto'] / med['loop']:.2f} | {med['auto'] / others:.2f} | {mems}"
                    + f" | {diff:.1e} |"
                )
                lines.append(line)
                print(line, flush=True)
    table = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                f"# Engine zoo (torch {torch.__version__}, {args.threads} thread(s), process CPU "
                f"time, median of {args.rounds} interleaved rounds; ratios to the plain step)\n\n"
                + table
                + "\n"
            )
    return table


if __name__ == "__main__":
    main()
