"""Which exceptions mean "this kernel cannot run here" (compile or launch failures).

ops/ (the only dispatch seam) falls back to the PyTorch reference on them; kernels/ only
classifies.  A failure is Triton's ``OutOfResources`` (shared memory, threads), a ptxas error,
or the driver refusing the launch for its resources.
"""
from __future__ import annotations

from typing import Optional

from triton.runtime.errors import OutOfResources, PTXASError
from triton.runtime.jit import KernelInterface

__all__ = ["launch_failure"]

# The driver's words when a launch asks for more registers or threads than the GPU has.
_DRIVER_RESOURCE_ERRORS = ("too many resources requested for launch", "out of resource")


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
    is_failure = isinstance(exc, (OutOfResources, PTXASError)) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in _DRIVER_RESOURCE_ERRORS))
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
