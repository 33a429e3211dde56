"""pytest plugin: give the ``gpu`` marker to every test that is skipped without CUDA.

The test suite marks its CUDA-only tests with ``skipif(not torch.cuda.is_available(),
reason="needs a CUDA GPU")`` (``tests.conftest.requires_cuda``) rather than with the ``gpu``
marker, so ``pytest -m gpu tests`` alone would select nothing.  ``bash bench/run_gpu.sh
--quick`` loads this plugin (``-p bench.gpu_marker``) so that ``-m gpu`` selects tests
carrying the ``gpu`` marker *and* tests with a skip-without-CUDA condition.  A test counts
as CUDA-only when one of its ``skipif`` marks gives a reason that mentions CUDA or a GPU.
"""
from __future__ import annotations

import re

import pytest

_CUDA_REASON = re.compile(r"\bCUDA\b|\bGPU\b")


def is_cuda_only(item: pytest.Item) -> bool:
    """True when ``item`` has a ``skipif`` mark whose reason names CUDA or a GPU."""
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if _CUDA_REASON.search(reason):
            return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: the marker must be there before pytest's own -m deselection runs.
    for item in items:
        if is_cuda_only(item):
            item.add_marker(pytest.mark.gpu)
