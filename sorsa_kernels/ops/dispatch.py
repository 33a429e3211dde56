"""The one place that decides between the Triton kernels and the PyTorch reference.

``SORSA_KERNELS_BACKEND`` = ``auto`` (default) | ``triton`` | ``reference``:

* ``auto``: CUDA tensors use the kernels when Triton imports; everything else the reference.
* ``triton``: always the kernels; with ``TRITON_INTERPRET=1`` they run on CPU tensors
  (this is how CI tests them).
* ``reference``: always plain PyTorch.
"""
from __future__ import annotations

import functools
import os

import torch

_CHOICES = ("auto", "triton", "reference")


def backend() -> str:
    """The backend requested through ``SORSA_KERNELS_BACKEND`` (validated)."""
    value = os.environ.get("SORSA_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"SORSA_KERNELS_BACKEND must be one of {_CHOICES}, got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``import triton`` works here."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor ``t`` should run the Triton kernel."""
    choice = backend()
    if choice == "reference":
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("SORSA_KERNELS_BACKEND=triton but triton is not installed")
        if t.device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                "SORSA_KERNELS_BACKEND=triton on a non-CUDA tensor needs TRITON_INTERPRET=1"
            )
        return True
    return t.device.type == "cuda" and triton_available()
