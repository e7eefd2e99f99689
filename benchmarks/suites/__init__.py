"""Benchmark suites. Each is a module here exposing

    run(*, strategies: list[str] | None, seeds: list[int], quick: bool, device: str = "cpu",
        out_dir: pathlib.Path | None = None) -> dict

returning a JSON-able dict with ``"name"``, ``"rows"`` (flat dicts), ``"markdown"`` (a table)
and optionally ``"plots"`` (PNG file names in ``out_dir``) and ``"skipped"`` (why it did not run).
The command finds suites by module name, so a new suite needs no registration here.
"""

ACCURACY = ("multidigits", "qm9", "toy", "synthetic")
# the quick suite (`make bench`, ≤ 5 minutes on 2 cores): these when importable, in this order.
# The toy problem is not in it: at a budget that reaches the front (3,000 steps) it alone takes
# about 3.5 minutes; `python -m benchmarks toy --quick` runs it.
QUICK = ("multidigits", "synthetic", "multimodal", "conflict", "cost")
# order of the full run (`python -m benchmarks all`); other modules found here are appended
ALL = ("multidigits", "qm9", "toy", "synthetic", "multimodal", "conflict", "cost")
