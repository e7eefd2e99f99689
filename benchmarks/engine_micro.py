"""Micro-benchmark of the per-task-gradient engines against a plain step and TorchJD.

Trunk MLP 256→3×512 (Linear+ReLU), ``m`` linear heads 512→8, MSE. One step = zero_grad +
forward + backward (+ aggregation, written to ``.grad``); no optimizer step. Variants:

- ``plain``: ``Σ_t L_t`` backward (the reference, ratio 1);
- ``loop``: a per-task loop of ``torch.autograd.grad`` (trunk + own head), Gramian, MGDA
  weights, ``.grad`` = ``Σ_t w_t g_t``;
- ``dense`` / ``layerwise``: ``mtlbal.Balancer(trunk, aggregator=MGDA(), engine=...)``;
- ``jd_autojac_upgrad`` / ``jd_autojac_mean``: TorchJD ``mtl_backward`` + ``jac_to_grad``;
- ``jd_autogram_upgrad``: TorchJD ``autogram.Engine(trunk, batch_dim=None)``, Gramian, UPGrad
  weights, then the weighted backward.

Timing: variants interleaved in a random order per round, several steps per round, the median
per-step time over rounds (CUDA events on a GPU). ``--mem``: peak memory of each variant in a fresh
subprocess (CPU: growth of the peak RSS over the steps, coarse; CUDA: ``max_memory_allocated``
above the model's footprint).

Run: ``PYTHONPATH=src python benchmarks/engine_micro.py --threads 2`` (``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import mtlbal
from mtlbal.aggregation import MGDA
from mtlbal.functional import mgda_weights

Step = Callable[[], None]


def build(
    m: int, batch: int, device: str, seed: int = 0
) -> tuple[nn.Module, nn.ModuleList, Tensor, Tensor]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = 256
    for _ in range(3):
        layers += [nn.Linear(d, 512), nn.ReLU()]
        d = 512
    trunk = nn.Sequential(*layers).to(device)
    heads = nn.ModuleList([nn.Linear(512, 8) for _ in range(m)]).to(device)
    x = torch.randn(batch, 256, device=device)
    ys = torch.randn(m, batch, 8, device=device)
    return trunk, heads, x, ys


def make_steps(
    m: int, batch: int, device: str, names: list[str] | None = None
) -> tuple[dict[str, Step], dict[str, list[Tensor]]]:
    """One step function per variant, each on its own copy of the model (same init), so that
    one library's forward hooks never see another variant's forward."""
    steps: dict[str, Step] = {}
    shared_of: dict[str, list[Tensor]] = {}

    def want(name: str) -> bool:
        return names is None or name in names

    def model(name: str) -> tuple[nn.Module, nn.ModuleList, Tensor, Tensor, Callable[[], None]]:
        trunk, heads, x, ys = build(m, batch, device)
        params = [*trunk.parameters(), *heads.parameters()]
        shared_of[name] = list(trunk.parameters())

        def zero() -> None:
            for p in params:
                p.grad = None

        return trunk, heads, x, ys, zero

    def losses(heads: nn.ModuleList, z: Tensor, ys: Tensor) -> list[Tensor]:
        return [nn.functional.mse_loss(h(z), ys[i]) for i, h in enumerate(heads)]

    if want("plain"):
        trunk0, heads0, x0, ys0, zero0 = model("plain")

        def plain() -> None:
            zero0()
            torch.stack(losses(heads0, trunk0(x0), ys0)).sum().backward()

        steps["plain"] = plain

    if want("loop"):
        trunk1, heads1, x1, ys1, zero1 = model("loop")
        shared1 = list(trunk1.parameters())

        def loop() -> None:
            zero1()
            ls = losses(heads1, trunk1(x1), ys1)
            per_task = []
            for t, loss in enumerate(ls):
                own = list(heads1[t].parameters())
                gs = torch.autograd.grad(loss, shared1 + own, retain_graph=True)
                per_task.append(gs[: len(shared1)])
                for p, g in zip(own, gs[len(shared1) :]):
                    p.grad = g
            flat = [torch.stack([g[j].reshape(-1) for g in per_task]) for j in range(len(shared1))]
            gram = sum(f @ f.T for f in flat)
            assert isinstance(gram, Tensor)
            w = mgda_weights(gram)
            for p, f in zip(shared1, flat):
                p.grad = (w.to(f.dtype) @ f).view_as(p)

        steps["loop"] = loop

    for eng in ("dense", "layerwise"):
        if not want(eng):
            continue
        trunk2, heads2, x2, ys2, zero2 = model(eng)
        bal = mtlbal.Balancer(trunk2, aggregator=MGDA(), engine=eng, nonfinite="off")

        def step(
            bal: mtlbal.Balancer = bal,
            trunk: nn.Module = trunk2,
            heads: nn.ModuleList = heads2,
            x: Tensor = x2,
            ys: Tensor = ys2,
            zero: Callable[[], None] = zero2,
        ) -> None:
            zero()
            bal.backward(losses(heads, trunk(x), ys))

        steps[eng] = step

    if want("layerwise_nosolver"):
        trunk5, heads5, x5, ys5, zero5 = model("layerwise_nosolver")
        bal5 = mtlbal.Balancer(trunk5, diagnostics=True, engine="layerwise", nonfinite="off")

        def lw_only() -> None:
            zero5()
            bal5.backward(losses(heads5, trunk5(x5), ys5))

        steps["layerwise_nosolver"] = lw_only

    try:
        from torchjd import aggregation as jda
        from torchjd import autogram, autojac
    except ImportError:  # pragma: no cover
        return steps, shared_of

    for agg_name, agg in (("upgrad", jda.UPGrad()), ("mean", jda.Mean())):
        name = f"jd_autojac_{agg_name}"
        if not want(name):
            continue
        trunk3, heads3, x3, ys3, zero3 = model(name)

        def jd_step(
            agg: object = agg,
            trunk: nn.Module = trunk3,
            heads: nn.ModuleList = heads3,
            x: Tensor = x3,
            ys: Tensor = ys3,
            zero: Callable[[], None] = zero3,
        ) -> None:
            zero()
            z = trunk(x)
            autojac.mtl_backward(losses(heads, z, ys), features=z)
            autojac.jac_to_grad(list(trunk.parameters()), agg)  # type: ignore[call-overload]

        steps[name] = jd_step

    if want("jd_autogram_upgrad"):
        trunk4, heads4, x4, ys4, zero4 = model("jd_autogram_upgrad")
        engine = autogram.Engine(trunk4, batch_dim=None)
        weighting = jda.UPGradWeighting()

        def jd_gram() -> None:
            zero4()
            ls = torch.stack(losses(heads4, trunk4(x4), ys4))
            gram = engine.compute_gramian(ls)
            ls.backward(weighting(gram))

        steps["jd_autogram_upgrad"] = jd_gram

    return steps, shared_of


def timed(step: Step, n: int, device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) * 1e3 / n


def bench(
    m: int, batch: int, device: str, rounds: int, per_round: int, names: list[str] | None = None
) -> dict[str, float]:
    if names is not None:
        names = sorted({*names, "plain", "dense", "layerwise"})
    steps, shared_of = make_steps(m, batch, device, names)
    # equivalence: layerwise and dense give the same trunk gradient (same init, same batch)
    steps["dense"]()
    steps["layerwise"]()
    g_dense = [p.grad for p in shared_of["dense"]]
    g_lw = [p.grad for p in shared_of["layerwise"]]
    diff = max(float((a - b).abs().max()) for a, b in zip(g_dense, g_lw))  # type: ignore[operator]
    scale = max(float(a.abs().max()) for a in g_dense)  # type: ignore[union-attr]
    print(f"  check m={m} B={batch}: max|layerwise - dense| = {diff:.2e} (max|g| {scale:.2e})")
    for s in steps.values():  # warm-up
        for _ in range(2):
            s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            times[k].append(timed(steps[k], per_round, device))
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(variant: str, m: int, batch: int, device: str, steps_n: int = 3) -> float:
    """Peak memory (MiB) of ``variant`` above the model's footprint (fresh process)."""
    steps, _ = make_steps(m, batch, device, names=[variant])
    step = steps[variant]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps_n):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # one-time initialisation (vmap machinery, first-use kernels) is not charged to a variant
    w = torch.randn(8, 8, requires_grad=True)
    torch.autograd.grad((w @ w).sum(1), w, torch.eye(8), is_grads_batched=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps_n):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--mem", action="store_true", help="also measure peak memory per variant")
    ap.add_argument("--mem-only", action="store_true", help="only the peak-memory table")
    ap.add_argument("--variants", nargs="+", default=None, help="time only these (+ plain)")
    ap.add_argument("--_mem-one", nargs=3, metavar=("VARIANT", "M", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args._mem_one:
        v, m, b = args._mem_one
        print(json.dumps(peak_memory(v, int(m), int(b), args.device)))
        return
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}")
    if args.mem_only:
        variants = [
            "plain",
            "loop",
            "dense",
            "layerwise",
            "layerwise_nosolver",
            "jd_autojac_upgrad",
            "jd_autojac_mean",
            "jd_autogram_upgrad",
        ]
        print("peak memory above the model, MiB (fresh process per variant, 3 steps)")
        print("| batch | m | " + " | ".join(variants) + " |")
        print("|---|---|" + "---|" * len(variants))
        for batch in args.batch:
            for m in args.tasks:
                cells = []
                for v in variants:
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--threads",
                            str(args.threads),
                            "--device",
                            args.device,
                            "--_mem-one",
                            v,
                            str(m),
                            str(batch),
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    cells.append(f"{json.loads(out.stdout.strip().splitlines()[-1]):.1f}")
                print(f"| {batch} | {m} | " + " | ".join(cells) + " |", flush=True)
        return
    results = []
    for batch in args.batch:
        for m in args.tasks:
            med = bench(m, batch, args.device, args.rounds, args.per_round, args.variants)
            mem: dict[str, float] = {}
            if args.mem:
                for v in med:
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--threads",
                            str(args.threads),
                            "--device",
                            args.device,
                            "--_mem-one",
                            v,
                            str(m),
                            str(batch),
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    mem[v] = json.loads(out.stdout.strip().splitlines()[-1])
            results.append((batch, m, med, mem))
            base = med["plain"]
            print(f"\nbatch {batch}, m={m}: plain step {base:.2f} ms")
            print(f"  {'variant':22s} {'ms':>8s} {'ratio':>6s}" + ("  peak MiB" if mem else ""))
            for k, v in sorted(med.items(), key=lambda kv: kv[1]):
                line = f"  {k:22s} {v:8.2f} {v / base:6.2f}"
                if mem:
                    line += f"  {mem[k]:8.1f}"
                print(line)
            jds = [v for k, v in med.items() if k.startswith("jd_")]
            if jds:
                print(f"  fastest TorchJD / layerwise = {min(jds) / med['layerwise']:.2f}x")
    if args.variants is not None:
        return
    print(
        "\n| batch | m | plain ms | layerwise | layerwise (no solver) | dense | loop "
        "| jd autojac upgrad | jd autojac mean | jd autogram | fastest-JD / layerwise |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for batch, m, med, _ in results:
        b = med["plain"]
        jd = min(v for k, v in med.items() if k.startswith("jd_"))
        cells = [
            f"{med[k] / b:.2f}"
            for k in (
                "layerwise",
                "layerwise_nosolver",
                "dense",
                "loop",
                "jd_autojac_upgrad",
                "jd_autojac_mean",
                "jd_autogram_upgrad",
            )
        ]
        print(
            f"| {batch} | {m} | {b:.2f} | "
            + " | ".join(cells)
            + f" | {jd / med['layerwise']:.2f} |"
        )


if __name__ == "__main__":
    main()
