"""pytest plugin: give the ``gpu`` marker to the tests that a GPU run must execute.

The test suite marks its CUDA-only tests with ``skipif(not torch.cuda.is_available(),
reason="needs a CUDA GPU")`` (``tests.conftest.requires_cuda``) rather than with the ``gpu``
marker, so ``pytest -m gpu tests`` alone would select nothing.  ``bash bench/run_gpu.sh
--quick`` loads this plugin (``-p bench.gpu_marker``) so that ``-m gpu`` selects:

* tests carrying the ``gpu`` marker;
* tests with a skip-without-CUDA condition (a ``skipif`` whose reason names CUDA or a GPU):
  the bf16 cases and the large shapes;
* the dtype cases of the kernel-numerics files (:data:`KERNEL_NUMERICS_FILES`): those files
  put their tensors on CUDA when there is one, so their float32 and float16 cases are the
  kernels' fp32/fp16 numerics on the GPU (elsewhere they run in the Triton interpreter).
  A case counts when one of its parameters is a ``torch.dtype``.
"""
from __future__ import annotations

import re

import pytest

_CUDA_REASON = re.compile(r"\bCUDA\b|\bGPU\b")

#: Test files whose cases run the kernels against the float64 reference on the test device.
KERNEL_NUMERICS_FILES = (
    "tests/kernels/test_sorsa_linear_kernels.py",
    "tests/kernels/test_grouped_sorsa.py",
    "tests/kernels/test_nf4_gemm.py",
    "tests/kernels/test_ortho_reg.py",
    "tests/ops/test_sorsa_linear_op.py",
    "tests/ops/test_gpu_numerics.py",
    "tests/quant/test_qsorsa_op.py",
)


def is_cuda_only(item: pytest.Item) -> bool:
    """True when ``item`` has a ``skipif`` mark whose reason names CUDA or a GPU."""
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if _CUDA_REASON.search(reason):
            return True
    return False


def is_kernel_dtype_case(item: pytest.Item) -> bool:
    """True when ``item`` is in a kernel-numerics file and one of its parameters is a dtype."""
    path = item.nodeid.split("::", 1)[0]
    if not path.endswith(KERNEL_NUMERICS_FILES):
        return False
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    return any(type(v).__name__ == "dtype" and type(v).__module__ == "torch" for v in callspec.params.values())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: the marker must be there before pytest's own -m deselection runs.
    for item in items:
        if is_cuda_only(item) or is_kernel_dtype_case(item):
            item.add_marker(pytest.mark.gpu)
