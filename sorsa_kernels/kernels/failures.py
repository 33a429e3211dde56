"""Which exceptions mean "this kernel cannot run here" (compile or launch failures).

ops/ (the only dispatch seam) falls back to the PyTorch reference on them; kernels/ only
classifies.  A failure is Triton's ``OutOfResources`` (shared memory, threads), a ptxas error,
or the driver refusing the launch for its resources.

The error classes are looked up by name, not imported: the package allows ``triton>=3.0``
and older releases lack ``PTXASError`` (they raise a ``RuntimeError`` naming ptxas or the
PTX codegen instead, matched by its words).  An ``ImportError`` here would replace the
kernel's real error in the fallback's ``except``.
"""
from __future__ import annotations

from typing import Optional

from triton.runtime import errors as _triton_errors
from triton.runtime.jit import KernelInterface

__all__ = ["launch_failure"]

#: Triton's compile / launch failure classes that this Triton has (PTXASError: Triton ≥ 3.2).
FAILURE_TYPES: tuple[type, ...] = tuple(
    t for t in (getattr(_triton_errors, name, None) for name in ("OutOfResources", "PTXASError"))
    if isinstance(t, type))

# The driver's words when a launch asks for more registers or threads than the GPU has, and
# an older Triton's words for a ptxas failure.
_RESOURCE_ERROR_WORDS = ("too many resources requested for launch", "out of resource",
                         "PTX codegen error", "ptxas")


def launch_failure(exc: BaseException) -> Optional[str]:
    """The name of the Triton kernel whose compile or launch raised ``exc``, when ``exc`` is
    a compile / launch failure (else None: a real error, to be raised).

    The kernel is found on the traceback (the innermost ``Autotuner`` / ``JITFunction``
    frame); "a Triton kernel" when none is there.

    Example::

        >>> try:
        ...     y, u = fused_forward(x, Wr, U, S, V, b, 1.0)
        ... except Exception as exc:
        ...     if launch_failure(exc) is None:
        ...         raise
    """
    is_failure = isinstance(exc, FAILURE_TYPES) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in _RESOURCE_ERROR_WORDS))
    if not is_failure:
        return None
    name = "a Triton kernel"
    tb = exc.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, KernelInterface):
            while hasattr(obj, "fn"):
                obj = obj.fn
            name = getattr(obj, "__name__", name)
        tb = tb.tb_next
    return name
