"""The SORSA linear op: ``y = x·Wrᵀ + scale·((x·V)·S)·Uᵀ + b``.

Registered as ``torch.library`` custom ops (``sorsa_kernels::linear_fwd`` and
``sorsa_kernels::linear_bwd``) with fake implementations and an autograd formula,
so ``torch.compile`` traces through it without a graph break.  Each direction is a
:class:`~sorsa_kernels.ops.kernel_op.KernelOp` (:data:`FORWARD`, :data:`BACKWARD`): the
fused kernels of :mod:`sorsa_kernels.kernels.sorsa_linear` or
:func:`~sorsa_kernels.ops.reference.linear_forward` / ``linear_backward``, decided once per
call and passed down; a kernel that cannot compile or launch on the GPU falls back to the
reference for that shape.

Only ``x`` and the r-wide ``u = x·V`` are saved for backward (the residual and the
adapters are module state, not activations).

Gradients: ``x``, ``U``, ``S``, ``V`` and — when it requires grad — the bias
(``db = Σ_rows dy``, accumulated in at least float32 and returned in the bias dtype).  The
residual is frozen by construction: a residual that requires grad is rejected with an
error instead of silently getting no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from . import reference
from .dispatch import autocast_dtype, pow2_bucket, rows_to_shape
from .kernel_op import KernelOp

__all__ = ["sorsa_linear", "linear_fwd", "linear_bwd", "FORWARD", "BACKWARD"]


def _key(x: Tensor, residual: Optional[Tensor], U: Tensor, bias: Optional[Tensor]) -> tuple:
    """The fallback key of a call: device, dtype and the autotune keys' shapes (M bucketed)."""
    n = x.shape[-1]
    return (x.device, x.dtype, pow2_bucket(x.numel() // max(n, 1)), n, *U.shape,
            residual is not None, bias is not None)


def _shape(x: Tensor, U: Tensor) -> str:
    return f"x {tuple(x.shape)} {str(x.dtype)[6:]}, (out, r) = {tuple(U.shape)}"


def _fused_forward(*args):
    from ..kernels.sorsa_linear import fused_forward

    return fused_forward(*args)


def _fused_backward(*args):
    from ..kernels.sorsa_linear import fused_backward

    return fused_backward(*args)


#: ``(x2, residual, U, S, V, bias, scale) -> (y2, u)`` on 2-D rows.
FORWARD = KernelOp(
    name="sorsa_linear forward",
    key=lambda x, residual, U, S, V, bias, scale: _key(x, residual, U, bias),
    shape=lambda x, residual, U, *_: _shape(x, U),
    kernel=_fused_forward,
    reference=reference.linear_forward,
    tensors=lambda x, residual, U, S, V, *_: (x, residual, U, S, V),
)

#: ``(dy2, x2, u, residual, U, S, V, scale, needs_dx) -> (dx2 | None, dU, dS, dV)``.
BACKWARD = KernelOp(
    name="sorsa_linear backward",
    key=lambda dy, x, u, residual, U, *_: _key(x, residual, U, None),
    shape=lambda dy, x, u, residual, U, *_: _shape(x, U),
    kernel=_fused_backward,
    reference=reference.linear_backward,
    tensors=lambda dy, x, u, residual, U, S, V, *_: (x, residual, U, S, V),
)


def _decide(x: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor,
            bias: Optional[Tensor], scale: float) -> bool:
    """The call's dispatch decision (``x`` of any leading shape)."""
    return FORWARD.decide(x, residual, U, S, V, bias, scale)


def _forward(x: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor,
             bias: Optional[Tensor], scale: float, kernel: bool) -> tuple[Tensor, Tensor]:
    """``(y, u)`` on any leading shape of ``x`` by the kernels (``kernel``) or the reference."""
    y, u = FORWARD(kernel, x.reshape(-1, x.shape[-1]), residual, U, S, V, bias, scale)
    return rows_to_shape(y, (*x.shape[:-1], U.shape[0])), u


def _backward_impl(dy: Tensor, x: Tensor, u: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor,
                   V: Tensor, scale: float, needs_dx: bool, kernel: bool):
    """``(dx, dU, dS, dV)`` by the kernels (``kernel``) or the reference; dx None unless needed."""
    dx, dU, dS, dV = BACKWARD(kernel, dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), u,
                              residual, U, S, V, scale, needs_dx)
    return (dx.reshape(x.shape) if needs_dx else None), dU, dS, dV


@torch.library.custom_op("sorsa_kernels::linear_fwd", mutates_args=())
def linear_fwd(x: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor],
               scale: float, kernel: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """Forward on any leading shape of ``x``; returns ``(y, u)`` with ``u`` 2-D (M×r).

    ``kernel``: the caller's dispatch decision (:func:`~.dispatch.kernel_path`), made here
    when None."""
    if kernel is None:
        kernel = _decide(x, residual, U, S, V, bias, scale)
    return _forward(x, residual, U, S, V, bias, scale, kernel)


@linear_fwd.register_fake
def _(x, residual, U, S, V, bias, scale, kernel=None):
    m, r = U.shape
    M = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], m), x.new_empty(M, r)


@torch.library.custom_op("sorsa_kernels::linear_bwd", mutates_args=())
def linear_bwd(dy: Tensor, x: Tensor, u: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor,
               scale: float, needs_dx: bool, kernel: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dU, dS, dV)``; ``dx`` is an empty tensor when ``needs_dx`` is False."""
    dx, dU, dS, dV = _backward_impl(dy, x, u, residual, U, S, V, scale, needs_dx, kernel)
    return (dx if needs_dx else x.new_empty(0)), dU, dS, dV


@linear_bwd.register_fake
def _(dy, x, u, residual, U, S, V, scale, needs_dx, kernel):
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    return dx, torch.empty_like(U), torch.empty_like(S), torch.empty_like(V)


def _check_frozen_residual(residual: Optional[Tensor]) -> None:
    if residual is not None and residual.requires_grad:
        raise ValueError(
            "the SORSA residual is frozen but was given with requires_grad=True; only U, S, V "
            "(and the bias) are trainable: call residual.requires_grad_(False)"
        )


def _setup_context(ctx, inputs, output):
    x, residual, U, S, V, bias, scale, kernel = inputs
    _check_frozen_residual(residual)
    if kernel is None:  # a direct call of the op: its own decision, the same one
        kernel = _decide(x, residual, U, S, V, bias, scale)
    _, u = output
    ctx.save_for_backward(x, u, residual, U, S, V)
    ctx.scale = scale
    ctx.kernel = kernel
    ctx.bias_dtype = None if bias is None else bias.dtype


def bias_grad(dy: Tensor, dtype: torch.dtype) -> Tensor:
    """``Σ_rows dy`` accumulated in at least float32, in the bias dtype."""
    acc = torch.promote_types(dy.dtype, torch.float32)
    return dy.reshape(-1, dy.shape[-1]).sum(0, dtype=acc).to(dtype)


def _gradients(ctx, dy: Tensor, grads) -> tuple:
    """The backward formula of both paths: ``grads`` (the ``linear_bwd`` custom op, or its
    implementation for the eager reference) gives dx, dU, dS, dV; the bias gets ``Σ_rows dy``."""
    x, u, residual, U, S, V = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    dx, dU, dS, dV = grads(dy.contiguous(), x, u, residual, U, S, V, ctx.scale, needs_dx, ctx.kernel)
    db = bias_grad(dy, ctx.bias_dtype) if ctx.needs_input_grad[5] else None
    return (dx if needs_dx else None), None, dU, dS, dV, db, None, None


def _backward(ctx, dy, _du):
    return _gradients(ctx, dy, linear_bwd)


linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerReference(torch.autograd.Function):
    """The reference path in eager mode, without the custom op's dispatch.

    The same forward (:func:`_forward`), saved tensors and backward formula
    (:func:`_gradients`) as ``linear_fwd``'s autograd; it only skips ``torch.library``'s
    per-call dispatch, which costs about 0.3-0.6 ms per forward+backward on a CPU — as much
    as a whole small layer.  Under ``torch.compile`` and on the Triton path the custom op is
    used.
    """

    @staticmethod
    def forward(ctx, x, residual, U, S, V, bias, scale):
        y, u = _forward(x, residual, U, S, V, bias, scale, False)
        _setup_context(ctx, (x, residual, U, S, V, bias, scale, False), (None, u))
        return y

    @staticmethod
    def backward(ctx, dy):
        return _gradients(ctx, dy, _backward_impl)[:7]


def _linear(x: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor,
            bias: Optional[Tensor], scale: float) -> Tensor:
    """``linear_fwd``'s output ``y``: one dispatch decision, passed down; eager reference
    calls skip the custom-op dispatch."""
    kernel = _decide(x, residual, U, S, V, bias, scale)
    if not kernel and not torch.compiler.is_compiling():
        return _EagerReference.apply(x, residual, U, S, V, bias, scale)
    return linear_fwd(x, residual, U, S, V, bias, scale, kernel)[0]


# The dropout path's residual in the compute dtype, per residual tensor: a frozen residual is
# cast once (and again only when it changes: its version counter), not copied every step.
_CAST_RESIDUALS = WeakTensorKeyDictionary()


def _residual_as(residual: Tensor, dtype: torch.dtype) -> Tensor:
    """``residual.to(dtype)``, cached while the residual is unchanged (same values, no copy
    per step).  F.linear saves it for backward anyway, so training holds no more memory."""
    if residual.dtype == dtype or torch.compiler.is_compiling():
        return residual.to(dtype)
    hit = _CAST_RESIDUALS.get(residual)
    if hit is not None and hit[0] == residual._version and hit[1].dtype == dtype:
        return hit[1]
    cast = residual.detach().to(dtype)
    _CAST_RESIDUALS[residual] = (residual._version, cast)
    return cast


def sorsa_linear(x: Tensor, residual: Tensor, U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor] = None,
                 scale: float = 1.0, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """``y = x·Wrᵀ + scale·((drop(x)·V)·S)·Uᵀ + b`` for ``x`` of any leading shape.

    With ``dropout_p == 0`` (the paper's setting) this is one fused op.  With dropout
    active the low-rank branch sees a dropped copy of ``x`` and runs as its own op
    beside a plain frozen ``F.linear`` for the residual.  A bias that requires grad gets
    its gradient; a residual that requires grad is rejected (it is frozen).

    Example::

        >>> y = sorsa_linear(x, layer.residual, layer.U, layer.S, layer.V, layer.bias)
    """
    scale = float(scale)
    _check_frozen_residual(residual)
    dtype = autocast_dtype(x)
    if dtype is not None:  # mixed precision: compute in the autocast dtype, as F.linear does
        with torch.autocast(x.device.type, enabled=False):
            return sorsa_linear(x.to(dtype), _residual_as(residual, dtype), U.to(dtype), S.to(dtype), V.to(dtype),
                                None if bias is None else bias.to(dtype), scale, dropout_p, training)
    if dropout_p > 0.0 and training:
        base = F.linear(x, _residual_as(residual, x.dtype), None if bias is None else bias.to(x.dtype))
        return base + _linear(F.dropout(x, dropout_p, True), None, U, S, V, None, scale)
    return _linear(x, residual, U, S, V, bias, scale)
