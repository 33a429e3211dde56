import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any
# kernel module is imported.  Without a GPU the kernels can only run in the interpreter;
# the default backend ("auto") still sends CPU tensors to the reference path.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ computed in float64."""
    a = a.detach().double()
    b = b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture
def backend(monkeypatch):
    """Set SORSA_KERNELS_BACKEND for one test: ``backend("triton")``."""

    def _set(name: str) -> None:
        monkeypatch.setenv("SORSA_KERNELS_BACKEND", name)
        if name == "triton" and not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")

    return _set


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
