"""The mtlbal benchmark: accuracy and cost of every balancer (``mtlbal-bench``).

Suites live in :mod:`mtlbal.bench.suites`; the strategy registry in
:mod:`mtlbal.bench.strategies`; Δm%, Δp and mean rank in :mod:`mtlbal.bench.metrics`.
"""
