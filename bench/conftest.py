"""pytest configuration of the benchmark suite (``pytest bench/ --benchmark-only``).

* Collects ``bench/bench_*.py`` (the repository's ``python_files`` only names
  ``test_*.py``), without collecting a file twice if ``python_files`` ever lists them.
* Registers the ``issue3`` marker (``pytest bench/ -m issue3 --benchmark-only``), the
  ``quick`` marker (the subset of ``bash bench/run_gpu.sh --quick``) and the
  ``compiled_loop`` marker (the torch.compile regularizer baseline, slow to compile).
* Writes the device, driver and versions into the JSON's ``machine_info["sorsa_bench"]``.
* Sets ``TRITON_INTERPRET=1`` on machines without CUDA before any kernel module is
  imported, as ``tests/conftest.py`` does, so that benchmark modules may exercise the
  kernels' code paths on CPU (no timing of the interpreter is ever reported as a result).

Fixtures here stay generic so that every ``bench_*.py`` module can use them.
"""
from __future__ import annotations

import fnmatch
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "issue3: issue 3's benchmark (forward and fwd+bwd of frozen, sorsa fused/reference, "
        "PEFT LoRA and the authors' dense formulation at Llama-7B shapes)",
    )
    config.addinivalue_line(
        "markers",
        "quick: the subset of `bash bench/run_gpu.sh --quick` (fused-layer targets, regularizer "
        "at the 7B adapter set, QSORSA vs QLoRA at one shape)",
    )
    config.addinivalue_line(
        "markers", "compiled_loop: the torch.compile regularizer baseline (minutes of compilation)"
    )


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the device, GPU driver and package versions once per JSON file."""
    from . import harness

    machine_info["sorsa_bench"] = {
        "device": harness.DEVICE.type,
        "device_name": harness.device_name(),
        "driver": harness.driver_version(),
        "versions": dict(harness.versions()),
    }


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".py" or not fnmatch.fnmatch(file_path.name, "bench_*.py"):
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest collects it itself
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None  # python_files already collects it
    return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    """The device benchmarks run on: CUDA when present, else CPU."""
    from . import harness

    return harness.DEVICE


@pytest.fixture(scope="session")
def matmul_peak():
    """``matmul_peak(dtype) -> TFLOP/s`` of a plain matmul, measured once per session and dtype."""
    from . import harness

    return harness.matmul_peak_tflops
