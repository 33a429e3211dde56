"""pytest plugin for correctness runs on a GPU: the Triton autotuner times each config briefly.

The autotuner times every config of every new key with ``triton.testing.do_bench``'s
defaults, 25 ms of warm-up and 100 ms of measurement: about 0.13 s per config whatever the
kernel's size.  The GPU tests launch the kernels at dozens of distinct shapes (one key each,
7-11 configs per kernel), which makes that the largest item of ``bash bench/run_gpu.sh
--quick`` after compilation.  A correctness test does not care which config wins (the
kernels' results do not depend on it), so this plugin, loaded with ``-p bench.quick_autotune``,
makes the autotuner's benchmarker ``do_bench(warmup=WARMUP_MS, rep=REP_MS)`` and keeps at
most ``MAX_CONFIGS`` configs of each kernel after its own prune (the first ones, which fit the
device's shared memory): compiles, not timing, are the largest cost of a cold GPU run, and a
kernel compiles once per config it tries.  The benchmarks, which autotune over every config,
check the value of each timed provider against the reference path at the benchmark's shape.

Benchmarks never load it: their autotuning keeps Triton's defaults.  Without CUDA, or with a
Triton that has no ``driver.active.get_benchmarker`` (older than 3.2), it changes nothing.
"""
from __future__ import annotations

import functools
from typing import Any

import pytest

WARMUP_MS = 5
REP_MS = 20
#: Configs each autotuned kernel tries in the tests (after its own prune).
MAX_CONFIGS = 2
_INSTALLED = pytest.StashKey[bool]()


def install(active_driver: Any) -> bool:
    """Make ``active_driver.get_benchmarker()`` return the short ``do_bench``; True when done."""
    if not hasattr(active_driver, "get_benchmarker"):
        return False
    from triton.testing import do_bench

    short = functools.partial(do_bench, warmup=WARMUP_MS, rep=REP_MS)
    active_driver.get_benchmarker = lambda: short
    return True


def cap_configs(autotuner_class: Any, limit: int = MAX_CONFIGS) -> None:
    """Make ``autotuner_class.prune_configs`` keep at most the first ``limit`` configs."""
    prune = autotuner_class.prune_configs
    if getattr(prune, "_capped", None) is not None:
        prune = prune._capped

    def capped(self, kwargs):
        return list(prune(self, kwargs))[:limit]

    capped._capped = prune
    autotuner_class.prune_configs = capped


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch

        if not torch.cuda.is_available():
            return
        from triton.runtime import driver
    except ImportError:
        return
    if install(driver.active):
        from triton.runtime.autotuner import Autotuner

        if hasattr(Autotuner, "prune_configs"):  # every Triton 3.x has it; an older one keeps all configs
            cap_configs(Autotuner)
        config.stash[_INSTALLED] = True


def pytest_report_header(config: pytest.Config) -> str:
    if config.stash.get(_INSTALLED, False):
        return (f"bench.quick_autotune: Triton autotuner tries at most {MAX_CONFIGS} configs per kernel, "
                f"each timed with do_bench(warmup={WARMUP_MS} ms, rep={REP_MS} ms)")
    return "bench.quick_autotune: inactive (no CUDA, or a Triton without driver.active.get_benchmarker)"

