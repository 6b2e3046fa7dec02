"""Benchmarks, run as ``python -m ops.bench.<name>`` (``just bench-<name>``).

Timing goals live here, not in tests; tests only check that the benchmarks run and report sane rows.
"""
