"""fastmeta benchmarks: ``python -m bench.meta_step``, ``python -m bench.table4``.

Shared timing / memory / report utilities live in :mod:`bench.common`.
Results are written under ``bench/results/``.
"""
