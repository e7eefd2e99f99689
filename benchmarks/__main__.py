"""``python -m benchmarks`` (from the repository root): run benchmark suites, save JSON, plots and
the Markdown report, and print the summary tables.

Examples::

    python -m benchmarks                       # the quick suite (what `make bench` runs)
    python -m benchmarks all --seeds 0,1,2,3,4 # every suite, full size, every strategy
    python -m benchmarks multidigits toy --strategies Equal,MGDA,PCGrad --quick
    python -m benchmarks --out docs/choosing-a-balancer --report-only   # rebuild the report

The quick suite runs the registry's quick rows (``Bench(quick=True)``: equal weights and a few
strategies of each family) at small sizes; ``all`` (``make bench-full``) runs every row at the
suites' documented sizes. Seeds: ``--seeds``, else the suite's ``SEEDS_QUICK`` / ``SEEDS_FULL``
(chosen from its power estimate), else 0,1,2 (quick) and 0..4 (full). The command prints a short
summary; the full tables are in the report (``--verbose`` prints them too).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import os
import pathlib
import pkgutil
import sys
import time
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from benchmarks import common, report
from benchmarks import strategies as S
from benchmarks import suites as suites_pkg

__all__ = ["discover", "main", "run_suites"]


def discover() -> list[str]:
    """Every suite module in :mod:`benchmarks.suites`, in the package's preferred order."""
    found = [
        m.name for m in pkgutil.iter_modules(suites_pkg.__path__) if not m.name.startswith("_")
    ]
    ordered = [n for n in suites_pkg.ALL if n in found]
    return ordered + sorted(n for n in found if n not in ordered)


def _import(name: str) -> ModuleType:
    return importlib.import_module(f"benchmarks.suites.{name}")


def expand(requested: Sequence[str]) -> tuple[list[str], bool]:
    """Suite names for the command line's suite arguments, and whether that is the quick run."""
    names: list[str] = []
    quick = False
    known = discover()
    for r in requested or ["quick"]:
        if r == "quick":
            quick = True
            names += [n for n in suites_pkg.QUICK if n in known]
        elif r == "all":
            names += known
        elif r in known:
            names.append(r)
        else:
            raise SystemExit(f"unknown suite {r!r}; known: quick, all, {', '.join(known)}")
    out: list[str] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out, quick


def _call(mod: ModuleType, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(mod.run).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kw = {k: v for k, v in kwargs.items() if k in params or accepts_any}
    result = mod.run(**kw)
    if not isinstance(result, dict) or "name" not in result:
        raise TypeError(f"suite {mod.__name__}.run must return a dict with a 'name'")
    return result


def _seeds(mod: ModuleType, seeds: list[int] | None, quick: bool) -> list[int]:
    if seeds is not None:
        return list(seeds)
    own = getattr(mod, "SEEDS_QUICK" if quick else "SEEDS_FULL", None)
    if own is not None:
        return list(own)
    return [0, 1, 2] if quick else [0, 1, 2, 3, 4]


def attach_stats(res: dict[str, Any]) -> None:
    """``res["stats"]``: the paired statistics of the suite's rows against equal weights (one
    per configuration when the rows carry ``m``/``conflict``: the worst case is kept for the
    summary line), unless the suite gave its own."""
    own = res.get("stats")
    if (own and own.get("key") != "delta_m") or not res.get("rows"):
        return  # a suite's own statistics are kept; ours are recomputed from the rows
    rows = [r for r in res["rows"] if isinstance(r, dict) and "delta_m" in r and "seed" in r]
    by: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r.get("m"), r.get("conflict"), r.get("imbalance")), []).append(r)
    found = []
    for cfg, rs in by.items():
        st = common.compare(rs)
        if not st:
            continue
        found.append(st)
        # results saved before the paired statistics existed: fill their summary rows
        for srow in res.get("summary", []) or []:
            if (srow.get("m"), srow.get("conflict"), srow.get("imbalance")) != cfg:
                continue
            cmp = st["per"].get(srow.get("strategy"))
            if cmp is not None and "verdict" not in srow:
                srow.update(
                    {
                        "vs_ref": cmp["diff"],
                        "vs_ref_low": cmp["low"],
                        "vs_ref_high": cmp["high"],
                        "p_holm": cmp["p_holm"],
                        "verdict": cmp["verdict"],
                        "group": cmp["group"],
                    }
                )
            elif srow.get("strategy") == st["reference"] and "verdict" not in srow:
                srow.update({"vs_ref": 0.0, "verdict": "reference"})
    if found:
        res["stats"] = max(found, key=lambda st: st.get("seeds_for_1pt") or 0)


def refresh_tables(res: dict[str, Any]) -> None:
    """Rebuild the summary tables of a saved suite result from its rows (``--report-only``), so
    that results saved by an older version get the current columns (paired intervals, verdicts,
    groups; no mean rank). The ``n``-th table of the suite's Markdown (a block that starts with
    ``| strategy |``) is replaced by that of the ``n``-th configuration of its rows."""
    rows = [r for r in res.get("rows", []) if isinstance(r, dict) and "seed" in r]
    if not rows or not any(r.get("strategy") == common.STL for r in rows):
        return
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("m"), r.get("conflict"), r.get("imbalance")), []).append(r)
    tables, summaries = [], []
    for rs in groups.values():
        keys = [k for k in rs[0] if "/" in k and k.rsplit("/", 1)[1] in ("acc", "mae", "mse")]
        if not keys:
            return
        tasks = [
            common.TaskSpec(k.rsplit("/", 1)[0], "mse", k.rsplit("/", 1)[1])  # type: ignore[arg-type]
            for k in keys
        ]
        summ = common.summarize(tasks, rs, metric_digits=3 if len(keys) > 2 else 4)
        extra: dict[str, Any] = {k: rs[0][k] for k in ("m", "conflict", "imbalance") if k in rs[0]}
        for srow in summ.rows:
            srow.update(extra)
        tables.append(summ.markdown)
        summaries += summ.rows
    lines = (res.get("markdown") or "").split("\n")
    out: list[str] = []
    i = n = 0
    while i < len(lines):
        if lines[i].startswith("| strategy |") and n < len(tables):
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            # an older power note right after the table is replaced too
            if i + 1 < len(lines) and lines[i + 1].startswith("Against Equal"):
                i += 2
            out.append(tables[n].rstrip("\n"))
            n += 1
            continue
        out.append(lines[i])
        i += 1
    if n == len(tables):
        res["markdown"] = "\n".join(out)
        res["summary"] = summaries


def class_names(rows: list[str] | None) -> list[str] | None:
    """The strategy classes of benchmark rows (the cost suite selects classes: ``UW`` →
    ``UncertaintyWeighting``, ``DB-MTL`` → ``ScaleInvariant`` and ``DBMTL``)."""
    if rows is None:
        return None
    out: list[str] = []
    for row in rows:
        spec = S.get(row)(2, 0)
        objs = [o for o in (spec.weighting, spec.aggregator) if o is not None]
        names = [type(o).__name__ for o in objs] or ["Equal"]
        out += [n for n in names if n not in out]
    return out


def run_suites(
    names: Sequence[str],
    *,
    strategies: list[str] | None,
    seeds: list[int] | None,
    quick: bool,
    device: str,
    out_dir: pathlib.Path,
    show_progress: bool = True,
    tiny: bool = False,
    log: Any = sys.stderr,
) -> list[dict[str, Any]]:
    """Run the suites in order; a suite that fails is recorded with its error, not fatal."""
    results = []
    for name in names:
        t0, c0 = time.perf_counter(), time.process_time()
        print(f"[python -m benchmarks] {name} ...", file=log, flush=True)
        try:
            mod = _import(name)
            res = _call(
                mod,
                {
                    "strategies": class_names(strategies) if name == "cost" else strategies,
                    "seeds": _seeds(mod, seeds, quick),
                    "quick": quick,
                    "device": device,
                    "out_dir": out_dir,
                    "show_progress": show_progress,
                    **({"tiny": True} if tiny else {}),
                },
            )
        except Exception as e:
            traceback.print_exc(file=log)
            res = {
                "name": name,
                "rows": [],
                "markdown": "",
                "error": f"{type(e).__name__}: {e}",
                "skipped": f"failed: {type(e).__name__}: {e}",
            }
        attach_stats(res)
        res["suite_wall_s"] = round(time.perf_counter() - t0, 1)
        # CPU time of this process: the wall time on a machine that nothing else loads
        res["suite_cpu_s"] = round(time.process_time() - c0, 1)
        print(
            f"[python -m benchmarks] {name} done in {res['suite_wall_s']:.1f} s "
            f"({res['suite_cpu_s']:.1f} s CPU)",
            file=log,
            flush=True,
        )
        results.append(res)
    return results


def _merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Saved suites replaced by the new ones of the same name; suite order of ``discover``."""
    by = {r["name"]: r for r in old}
    by.update({r["name"]: r for r in new})
    order = discover()
    return sorted(by.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else 99)


def _csv(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Compare multi-task balancers for accuracy and cost; write JSON, plots and "
        "a Markdown report.",
    )
    p.add_argument(
        "suites",
        nargs="*",
        default=["quick"],
        help="'quick' (default: the quick suite), 'all', or suite names",
    )
    p.add_argument("--strategies", help="comma-separated strategy names (default: all available)")
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds (default: each suite's own, else 0,1,2 quick / 0..4 full)",
    )
    p.add_argument(
        "--heads",
        choices=("raw", "reference"),
        default="raw",
        help="task heads' gradients: 'raw' (mtlbal: ∇L_t) or 'reference' (as each method's "
        "reference code: w_t ∇L_t for the rows that declare it, e.g. Nash-MTL, MGDA)",
    )
    p.add_argument("--verbose", action="store_true", help="print every suite's full tables")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results/)")
    p.add_argument(
        "--report-only", action="store_true", help="rebuild the report from the saved JSON"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="small sizes for named suites too",
    )
    mode.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="full sizes even for the quick suite",
    )
    mode.add_argument(
        "--tiny",
        dest="mode",
        action="store_const",
        const="tiny",
        help="smoke-test sizes (1 epoch, a few steps): checks the wiring only",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list suites and strategies, then exit")
    return p


RESULTS = pathlib.Path(__file__).parent / "results"


def _write_targets(res: dict[str, Any]) -> None:
    """The issues' cost targets go to benchmarks/results/cost_targets.md (an internal note for
    the maintainers, kept off the user's report)."""
    from benchmarks.suites import cost

    RESULTS.mkdir(exist_ok=True)
    env = res.get("env", {})
    (RESULTS / "cost_targets.md").write_text(
        "# Cost targets of the issues (written by `python -m benchmarks`)\n\n"
        f"Run: `{env.get('command')}` on {env.get('date')} ({env.get('device')}).\n\n"
        + cost.targets_markdown(res["rows"])
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out_dir = pathlib.Path(args.out)
    if args.list:
        have, missing = S.available()
        print("suites:", ", ".join(discover()))
        print("quick suite:", ", ".join(n for n in suites_pkg.QUICK if n in discover()))
        print("strategies:", ", ".join(have))
        if missing:
            print("not available:", ", ".join(f"{k} ({v})" for k, v in missing.items()))
        return 0
    if args.report_only:
        try:
            results, env = report.load(out_dir)
        except FileNotFoundError as e:
            print(f"python -m benchmarks: {e}", file=sys.stderr)
            return 2
        for r in results:
            refresh_tables(r)
            attach_stats(r)
            # the Δm% figure is redrawn from the saved summary (the current style)
            fig = f"{r['name']}_delta_m.png"
            if r.get("summary") and fig in (r.get("plots") or []):
                common.plot_delta_m(r["summary"], out_dir / fig, r.get("title", r["name"]))
            if r["name"] == "cost" and r.get("rows") and (out_dir / "cost_scaling.png").exists():
                from benchmarks.suites import cost

                steps = [x for x in r["rows"] if x.get("section") == "step" and "batch" in x]
                if steps:
                    batch = int(steps[0]["batch"])
                    cost.scaling_plot(r["rows"], out_dir / "cost_scaling.png", batch=batch)
        path = report.save(results, env, out_dir)
        print(f"report: {path}")
        return 0

    # deterministic cuBLAS needs this before CUDA initialises
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    # one thread by default: the models are small, and on a shared machine several OpenMP threads
    # spinning against other processes cost far more than they gain (measured: up to 50× slower)
    threads = args.threads or 1
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    names, quick = expand(args.suites)
    tiny = args.mode == "tiny"
    if args.mode is not None:
        quick = args.mode in ("quick", "tiny")
    strategies = _csv(args.strategies)
    if strategies is not None:
        strategies = [S.resolve(s) for s in strategies]
        S.available(strategies)  # raises naming a strategy this mtlbal cannot build
    elif quick:
        strategies = list(S.QUICK)  # `make bench`: the registry's quick rows
    seeds = None if args.seeds is None else [int(s) for s in _csv(args.seeds) or ["0"]]
    common.OPTIONS["heads"] = args.heads
    t0 = time.perf_counter()
    results = run_suites(
        names,
        strategies=strategies,
        seeds=seeds,
        quick=quick,
        device=args.device,
        out_dir=out_dir,
        show_progress=not args.no_progress,
        tiny=tiny,
    )
    wall = time.perf_counter() - t0
    import mtlbal

    env = {
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": args.device,
        "torch": torch.__version__,
        "mtlbal": mtlbal.__version__,
        "threads": threads,
        "seeds": seeds if seeds is not None else "per suite",
        "heads": args.heads,
        "quick": quick,
        "wall_s": round(wall, 1),
    }
    for r in results:
        r["env"] = {k: env[k] for k in ("command", "date", "device", "torch", "threads")}
    old: list[dict[str, Any]] = []
    if (out_dir / "results.json").exists():
        try:
            old, _ = report.load(out_dir)
        except Exception:
            old = []
    merged = _merge(old, results)
    path = report.save(merged, env, out_dir)
    for r in results:
        if r["name"] == "cost" and r.get("rows"):
            _write_targets(r)
        if args.verbose:
            print()
            print(r.get("markdown") or f"### {r['name']}\n\nSkipped: {r.get('skipped')}")
    print()
    print(report.summary(results, path, wall))
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
