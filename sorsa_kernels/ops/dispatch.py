"""The one place that decides between the Triton kernels and the PyTorch reference.

``SORSA_KERNELS_BACKEND`` = ``auto`` (default) | ``triton`` | ``reference``:

* ``auto``: CUDA tensors use the kernels when Triton imports; everything else the reference.
* ``triton``: always the kernels; with ``TRITON_INTERPRET=1`` they run on CPU tensors
  (this is how CI tests them).
* ``reference``: always plain PyTorch.

:func:`kernel_path` is the one decision per call (backend, dtypes, bf16 on pre-Ampere GPUs,
shapes whose kernels failed); :func:`run_with_fallback` turns a kernel that cannot compile
or launch on this GPU into one warning and the reference path for that shape.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")

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
        import triton  # noqa: F401,F811
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


# --------------------------------------------------------------------------- one decision per call
#: Compute dtypes the Triton kernels cover; anything else (float64) runs the reference.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (op, key) pairs whose kernels failed to compile or launch: they run the reference from then on.
_FALLEN_BACK: set = set()


def _capability(device: torch.device) -> Optional[int]:
    """10·major + minor of a CUDA device, None elsewhere (tests patch this)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def kernel_path(t: torch.Tensor, *params: Optional[torch.Tensor], interpreter_bf16: bool = False) -> bool:
    """The dispatch decision of one call: True for the Triton kernels.

    The kernels when :func:`use_triton` says so and every tensor has a kernel dtype (callers
    then skip shapes that failed before: :func:`fallen_back`).  ``t`` gives the compute
    dtype.  bfloat16 on a GPU without it (compute capability below 8.0: T4, RTX 20xx) is an
    error naming float16.  bfloat16 under ``TRITON_INTERPRET=1`` is an error too (the
    interpreter's bfloat16 ``tl.dot`` returns garbage), unless the op's kernels upcast
    before every dot (``interpreter_bf16``).
    """
    if not use_triton(t) or any(p is not None and p.dtype not in KERNEL_DTYPES for p in (t, *params)):
        return False
    if t.dtype == torch.bfloat16:
        cap = _capability(t.device)
        if cap is not None and cap < 80:
            raise TypeError(
                f"bfloat16 needs a GPU of compute capability 8.0 or newer (Ampere); "
                f"{torch.cuda.get_device_name(t.device)} is sm_{cap}: train in float16 instead "
                "(load the model with torch_dtype=torch.float16)"
            )
        if interpreter_enabled() and not interpreter_bf16:
            raise TypeError(
                "the Triton interpreter (TRITON_INTERPRET=1) computes bfloat16 tl.dot wrongly: run "
                "these kernels there in float32 or float16, or set SORSA_KERNELS_BACKEND=reference"
            )
    return True


def fallen_back(op: str, key: tuple) -> bool:
    """Whether ``(op, key)``'s kernels failed before (it runs the reference now)."""
    return (op, key) in _FALLEN_BACK


def _launch_failure(exc: BaseException) -> Optional[str]:
    """:func:`sorsa_kernels.kernels.failures.launch_failure`, or None (the error is real) when
    that module cannot be imported: the kernel's own error must surface, not an ImportError."""
    try:
        from ..kernels.failures import launch_failure
    except ImportError:  # a Triton whose layout this package does not know
        return None
    return launch_failure(exc)


def run_with_fallback(op: str, key: tuple, device: torch.device, shape: str,
                      kernel_call: Callable[[], T], reference_call: Callable[[], T]) -> T:
    """``kernel_call()``; if a kernel fails to compile or launch there (OutOfResources, a
    ptxas error), warn once naming the kernel, the device and the shape, remember ``(op,
    key)`` so that :func:`fallen_back` sends it to the reference from now on, and return
    ``reference_call()`` — training does not stop for it.  Other errors propagate.
    """
    try:
        return kernel_call()
    except Exception as exc:  # noqa: BLE001 - classified below, re-raised unless a launch failure
        kernel = _launch_failure(exc)
        if kernel is None:
            raise
        _FALLEN_BACK.add((op, key))
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        warnings.warn(
            f"Triton kernel {kernel} failed to compile or launch on {where} ({device}) for {op} "
            f"with {shape}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "this shape runs the PyTorch reference from now on",
            RuntimeWarning, stacklevel=3,
        )
        return reference_call()


def pow2_bucket(M: int) -> int:
    """M rounded up to a power of two (fallback keys, like the autotune keys, bucket M)."""
    return 1 << max(M - 1, 0).bit_length()


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype an op on ``x`` computes in under ``torch.autocast`` (None outside it, or while compiling).

    Mixed precision (``Trainer``/TRL ``bf16=True`` on a float32 model) hands a layer inputs in
    bfloat16 while its adapters stay float32: an op then casts its floating inputs to this dtype
    in the graph, as ``F.linear`` does, so the float32 masters still get the gradients.
    """
    device = x.device.type
    if torch.compiler.is_compiling() or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def rows_to_shape(y: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The 2-D row-major result ``y`` (M×m) given the leading shape of the input, as a non-view.

    Every op computes on 2-D rows and returns ``y`` in the input's leading shape.  A plain
    ``reshape`` would hand out a view of a tensor made inside an autograd Function (or a custom
    op), and autograd forbids in-place ops on those: ``y = layer(x); y += r`` would fail in
    backward.  ``_unsafe_view`` (what ``torch.matmul`` itself returns) is not tracked as a view.
    """
    return torch.ops.aten._unsafe_view(y, tuple(shape))
