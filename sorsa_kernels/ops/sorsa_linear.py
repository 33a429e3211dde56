"""The SORSA linear op: ``y = x·Wrᵀ + scale·((x·V)·S)·Uᵀ + b``.

Registered as ``torch.library`` custom ops (``sorsa_kernels::linear_fwd`` and
``sorsa_kernels::linear_bwd``) with fake implementations and an autograd formula,
so ``torch.compile`` traces through it without a graph break.  Each op picks the
Triton kernel or the reference through :func:`sorsa_kernels.ops.dispatch.use_triton`.

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

from . import reference
from .dispatch import use_triton

__all__ = ["sorsa_linear", "linear_fwd", "linear_bwd"]


# Compute dtypes the Triton kernels cover; anything else (float64) runs the reference.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _impls(t: Tensor, *params: Optional[Tensor]):
    if use_triton(t) and all(p is None or p.dtype in _KERNEL_DTYPES for p in (t, *params)):
        from ..kernels import sorsa_linear as kernels

        return kernels.fused_forward, kernels.fused_backward
    return reference.linear_forward, reference.linear_backward


@torch.library.custom_op("sorsa_kernels::linear_fwd", mutates_args=())
def linear_fwd(
    x: Tensor,
    residual: Optional[Tensor],
    U: Tensor,
    S: Tensor,
    V: Tensor,
    bias: Optional[Tensor],
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Forward on any leading shape of ``x``; returns ``(y, u)`` with ``u`` 2-D (M×r)."""
    forward, _ = _impls(x, residual, U, S, V)
    x2 = x.reshape(-1, x.shape[-1])
    y, u = forward(x2, residual, U, S, V, bias, scale)
    return reference.rows_to_shape(y, (*x.shape[:-1], U.shape[0])), u


@linear_fwd.register_fake
def _(x, residual, U, S, V, bias, scale):
    m, r = U.shape
    M = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], m), x.new_empty(M, r)


@torch.library.custom_op("sorsa_kernels::linear_bwd", mutates_args=())
def linear_bwd(
    dy: Tensor,
    x: Tensor,
    u: Tensor,
    residual: Optional[Tensor],
    U: Tensor,
    S: Tensor,
    V: Tensor,
    scale: float,
    needs_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dU, dS, dV)``; ``dx`` is an empty tensor when ``needs_dx`` is False."""
    _, backward = _impls(dy, residual, U, S, V)
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dx, dU, dS, dV = backward(dy2, x2, u, residual, U, S, V, scale, needs_dx)
    dx = dx.reshape(x.shape) if needs_dx else x.new_empty(0)
    return dx, dU, dS, dV


@linear_bwd.register_fake
def _(dy, x, u, residual, U, S, V, scale, needs_dx):
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    return dx, torch.empty_like(U), torch.empty_like(S), torch.empty_like(V)


def _check_frozen_residual(residual: Optional[Tensor]) -> None:
    if residual is not None and residual.requires_grad:
        raise ValueError(
            "the SORSA residual is frozen but was given with requires_grad=True; only U, S, V "
            "(and the bias) are trainable: call residual.requires_grad_(False)"
        )


def _setup_context(ctx, inputs, output):
    x, residual, U, S, V, bias, scale = inputs
    _check_frozen_residual(residual)
    _, u = output
    ctx.save_for_backward(x, u, residual, U, S, V)
    ctx.scale = scale
    ctx.bias_dtype = None if bias is None else bias.dtype


def bias_grad(dy: Tensor, dtype: torch.dtype) -> Tensor:
    """``Σ_rows dy`` accumulated in at least float32, in the bias dtype."""
    acc = torch.promote_types(dy.dtype, torch.float32)
    return dy.reshape(-1, dy.shape[-1]).sum(0, dtype=acc).to(dtype)


def _backward(ctx, dy, _du):
    x, u, residual, U, S, V = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    dx, dU, dS, dV = linear_bwd(dy.contiguous(), x, u, residual, U, S, V, ctx.scale, needs_dx)
    db = bias_grad(dy, ctx.bias_dtype) if ctx.needs_input_grad[5] else None
    return (dx if needs_dx else None), None, dU, dS, dV, db, None


linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerReference(torch.autograd.Function):
    """The reference path in eager mode, without the custom op's dispatch.

    Same math (``reference.linear_forward`` / ``linear_backward``), same saved tensors
    (``x`` and ``u`` plus module state) and the same gradients as ``linear_fwd``'s autograd
    formula; it only skips ``torch.library``'s per-call dispatch, which costs about 0.3 ms
    per forward+backward on a CPU — as much as a whole small layer.  Under
    ``torch.compile`` and on the Triton path the custom op is used.
    """

    @staticmethod
    def forward(ctx, x, residual, U, S, V, bias, scale):
        y, u = reference.linear_forward(x.reshape(-1, x.shape[-1]), residual, U, S, V, bias, scale)
        _setup_context(ctx, (x, residual, U, S, V, bias, scale), (None, u))
        return reference.rows_to_shape(y, (*x.shape[:-1], U.shape[0]))

    @staticmethod
    def backward(ctx, dy):
        x, u, residual, U, S, V = ctx.saved_tensors
        needs_dx = ctx.needs_input_grad[0]
        dx, dU, dS, dV = reference.linear_backward(
            dy.reshape(-1, dy.shape[-1]).contiguous(), x.reshape(-1, x.shape[-1]), u, residual, U, S, V,
            ctx.scale, needs_dx,
        )
        db = bias_grad(dy, ctx.bias_dtype) if ctx.needs_input_grad[5] else None
        return (dx.reshape(x.shape) if needs_dx else None), None, dU, dS, dV, db, None


def _linear(x: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor,
            bias: Optional[Tensor], scale: float) -> Tensor:
    """``linear_fwd``'s output ``y``; eager reference calls skip the custom-op dispatch."""
    if not torch.compiler.is_compiling() and _impls(x, residual, U, S, V)[0] is reference.linear_forward:
        return _EagerReference.apply(x, residual, U, S, V, bias, scale)
    return linear_fwd(x, residual, U, S, V, bias, scale)[0]


def sorsa_linear(
    x: Tensor,
    residual: Tensor,
    U: Tensor,
    S: Tensor,
    V: Tensor,
    bias: Optional[Tensor] = None,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
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
    if dropout_p > 0.0 and training:
        base = F.linear(x, residual.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return base + _linear(F.dropout(x, dropout_p, True), None, U, S, V, None, scale)
    return _linear(x, residual, U, S, V, bias, scale)
