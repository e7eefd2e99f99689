"""The whole cost suite on one GPU (under 5 minutes on an H100), ratios from CUDA events.

Runs :func:`benchmarks.suites.cost.run` with a GPU configuration: m = 2, 4, 16, 64 at batch
256 (every family, parameter level included up to m = 64), the parameter-level families again at
batch 32, the Gramian solvers for m = 4 … 256, peak memory from ``torch.cuda.max_memory_allocated``
and host syncs (profiler count and ``torch.cuda.set_sync_debug_mode``). Prints the Markdown
report and writes ``cost.json``, ``cost.md`` and ``cost_scaling.png`` into ``--out``.

    PYTHONPATH=src python benchmarks/gpu_cost.py                # on a CUDA machine
    PYTHONPATH=src python benchmarks/gpu_cost.py --device cpu   # smoke test (quick settings)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.suites.cost import CostConfig, run


def gpu_config() -> CostConfig:
    """Settings sized for < 5 min on one H100 (a plain step there is well under 1 ms)."""
    return CostConfig(
        extra_batches=(32,),
        params_max_m=64,
        rounds=12,
        steps_per_round=10,
        warmup=5,
        rounds_big=6,
        steps_per_round_big=4,
        solver_reps=10,
        mem_repeats=2,
        tries=2,
        autogram=True,
        threads=None,
        max_step_s=5.0,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    p.add_argument("--out", type=Path, default=Path("bench-out/gpu-cost"))
    p.add_argument("--strategies", nargs="*", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--full-cpu", action="store_true", help="with --device cpu, the full CPU settings"
    )
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("CUDA is not available; use --device cpu for a smoke test", file=sys.stderr)
            return 2
        cfg = gpu_config()
        quick = False
    else:
        cfg = CostConfig.full() if args.full_cpu else CostConfig.quick()
        quick = not args.full_cpu
    t0 = time.perf_counter()
    res = run(
        strategies=args.strategies,
        seeds=[args.seed],
        quick=quick,
        device=args.device,
        out_dir=args.out,
        config=cfg,
    )
    elapsed = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    res["meta"]["config"] = dataclasses.asdict(cfg)
    (args.out / "cost.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
    (args.out / "cost.md").write_text(res["markdown"])
    print(res["markdown"])
    print(f"wrote {args.out}/cost.json, cost.md, {', '.join(res['plots'].values()) or 'no plot'}")
    print(f"total {elapsed:.0f} s on {res['meta']['device']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
