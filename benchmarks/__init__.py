"""Benchmark suite for MetaOptimize (issue 5): tasks, contenders, runner and report.

Run everything with ``make bench`` (or ``python -m benchmarks.run --suite full``); ``make bench-quick`` is the
smoke version. See docs/benchmarks.md for the protocol and the results.
"""
