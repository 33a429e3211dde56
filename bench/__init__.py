"""Benchmarks of sorsa-kernels (pytest-benchmark suite and the report script).

Run ``pytest bench/ --benchmark-only``; see ``bench/README.md``.
"""
