"""The mtlbal benchmark: accuracy and cost of every balancer (``python -m benchmarks``).

Suites live in :mod:`benchmarks.suites`; the strategy registry in
:mod:`benchmarks.strategies`; Δm%, Δp and mean rank in :mod:`benchmarks.metrics`.
"""
