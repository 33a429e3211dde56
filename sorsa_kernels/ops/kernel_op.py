"""The kernel-op seam: each fused op describes its kernel-or-reference dispatch once.

A :class:`KernelOp` is the declarative description of one direction (forward or backward)
of a fused op: its name, its dispatch (fallback) key, its shapes for messages, the Triton
path, the reference path (:mod:`sorsa_kernels.ops.reference`), and which tensors the decision
reads.  It replaces the ``_kernels`` / ``_key`` / ``_shape`` / ``_decide`` /
``run_with_fallback`` scaffolding each op file used to copy.  The op file keeps only what
is its own: the ``torch.library`` custom op (schema, fake kernel, registered autograd) and
argument checks.

Every fused op adopts it: the linear, QSORSA linear and regularizer ops, and the experts ops
(dense and NF4, grouped and routed: :mod:`sorsa_kernels.ops.experts_paths`).

Adopting it (the linear op, :mod:`sorsa_kernels.ops.sorsa_linear`, as the example)::

    FORWARD = KernelOp(
        name="sorsa_linear forward",                       # in the warning and the fallback set
        key=lambda x, residual, U, S, V, bias, scale: (...),   # device, dtype, pow2_bucket(M), shapes
        shape=lambda x, residual, U, *_: f"x {tuple(x.shape)}, (out, r) = {tuple(U.shape)}",
        kernel=_fused_forward,          # def _fused_forward(*args): from ..kernels.sorsa_linear
                                        #     import fused_forward (Triton imported on first use)
        reference=reference.linear_forward,                # the same arguments, the same result
        tensors=lambda x, residual, U, S, V, *_: (x, residual, U, S, V),  # x first: compute dtype
    )
    BACKWARD = KernelOp(name="sorsa_linear backward", ...)

    kernel = FORWARD.decide(*args)    # once per call, in the op's Python wrapper (before the
                                      # custom op, so torch.compile sees a constant)
    y, u = FORWARD(kernel, *args)     # inside the custom op: kernel, or reference when this key
                                      # fell back; a compile/launch failure warns once and falls back
    ...                               # autograd saves ``kernel``; the backward runs
    grads = BACKWARD(ctx.kernel, *bwd_args)   # the forward's decision, its own fallback key

Every callable receives the op's positional arguments exactly as passed to ``decide`` / call.
``interpreter_bf16=True`` declares that the kernels upcast every tile before a ``tl.dot``
(so bfloat16 may run under ``TRITON_INTERPRET=1``); otherwise the decision refuses it in one
line (the interpreter's bfloat16 dot is wrong).  Rules the seam keeps for every op: one
decision per call, passed down; no host synchronization in ``key`` / ``shape`` / ``tensors``
(they read only shapes, dtypes and devices).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .dispatch import fallen_back, kernel_path, run_with_fallback

__all__ = ["KernelOp"]


@dataclass(frozen=True)
class KernelOp:
    """One direction of a fused op: where its kernel and its reference are, and how to key it.

    Attributes:
        name: the op and direction, e.g. ``"sorsa_linear forward"`` (warnings, fallback set).
        key: ``key(*args)`` the fallback key — device, dtype and the shapes the autotune keys
            read, M through :func:`~sorsa_kernels.ops.dispatch.pow2_bucket`.
        shape: ``shape(*args)`` the shapes, as the fallback warning prints them.
        kernel: ``kernel(*args)`` the Triton path (a function that imports its kernels module
            when first called: importing the op must not need Triton).
        reference: ``reference(*args)`` the plain PyTorch path, the same result.
        tensors: ``tensors(*args)`` the tensors whose device and dtypes decide (None allowed);
            the first gives the compute dtype.
        interpreter_bf16: the kernels upcast before every dot, so bfloat16 may run under
            ``TRITON_INTERPRET=1``.
    """

    name: str
    key: Callable[..., tuple]
    shape: Callable[..., str]
    kernel: Callable[..., Any]
    reference: Callable[..., Any]
    tensors: Callable[..., tuple[Optional[torch.Tensor], ...]]
    interpreter_bf16: bool = False

    def decide(self, *args) -> bool:
        """The call's dispatch decision: the kernels, unless this key's kernels failed before."""
        return (kernel_path(*self.tensors(*args), interpreter_bf16=self.interpreter_bf16)
                and not fallen_back(self.name, self.key(*args)))

    def __call__(self, kernel: bool, *args):
        """The kernels when ``kernel`` (the call's decision) and this key has not fallen back —
        a compile or launch failure warns once and runs the reference — else the reference."""
        if not kernel:
            return self.reference(*args)
        key = self.key(*args)
        if fallen_back(self.name, key):
            return self.reference(*args)
        device = self.tensors(*args)[0].device
        return run_with_fallback(self.name, key, device, self.shape(*args),
                                 lambda: self.kernel(*args), lambda: self.reference(*args))
