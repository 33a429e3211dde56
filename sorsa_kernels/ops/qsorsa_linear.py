"""The QSORSA linear op: ``y = x·deq(Q)ᵀ + scale·((x·V)·S)·Uᵀ + b`` with ``Q = NF4(Wr)``.

Registered as ``torch.library`` custom ops ``sorsa_kernels::qlinear_fwd`` and
``sorsa_kernels::qlinear_bwd`` (fake implementations and an autograd formula, so
``torch.compile`` traces through without a graph break).  Each direction is a
:class:`~sorsa_kernels.ops.kernel_op.KernelOp` (:data:`FORWARD`, :data:`BACKWARD`; a kernel
that cannot compile or launch falls back to the reference for that shape) and picks:

* the Triton path: ``x·V`` by cuBLAS, then one fused kernel
  (:mod:`sorsa_kernels.kernels.nf4_gemm`) computing ``[x | t]·[deq(Q) | U]ᵀ + b`` that
  dequantizes NF4 tiles inside its K loop; in backward the same kernel gives
  ``dx = [dy | s]·[deq(Q)ᵀ | V]ᵀ``;
* the reference path: bitsandbytes dequantizes ``Q`` to the compute dtype, then
  :func:`sorsa_kernels.ops.reference.linear_forward` / ``linear_backward``.

Both backward paths take the adapters' gradients from
:func:`sorsa_kernels.ops.reference.lowrank_backward` (the formula is written once).

Only ``x`` and the r-wide ``u = x·V`` are saved for backward; the NF4 storage is module
state.  With dropout the low-rank branch reads a dropped copy of ``x`` (``x_lowrank``),
the residual product the undropped one, and autograd returns a gradient for each.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quant.nf4 import NF4Weight, dequantize_nf4_bnb
from . import reference
from .dispatch import autocast_dtype, pow2_bucket, rows_to_shape
from .kernel_op import KernelOp
from .sorsa_linear import bias_grad

__all__ = ["qsorsa_linear", "qlinear_fwd", "qlinear_bwd", "FORWARD", "BACKWARD"]


def _weight(packed, absmax, nested_absmax, nested_code, offset, code, shape, dtype, blocksize, nested_blocksize):
    return NF4Weight(
        packed=packed, absmax=absmax, nested_absmax=nested_absmax, nested_code=nested_code,
        offset=offset, code=code, shape=torch.Size(shape), dtype=dtype,
        blocksize=blocksize, nested_blocksize=nested_blocksize,
    )


def _dequantize(nf4, shape, cd, blocksize, nested_blocksize) -> Tensor:
    """deq(Q) in ``cd`` by bitsandbytes (float64 goes through float32, bitsandbytes' widest)."""
    dq = cd if cd in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    return dequantize_nf4_bnb(_weight(*nf4, shape, dq, blocksize, nested_blocksize), dq).to(cd)


def _key(x: Tensor, out_features: int, U: Tensor, bias: Optional[Tensor], split: bool) -> tuple:
    """Fallback key (``x`` of any leading shape): device, dtype, M bucket, the layer's shape,
    bias, dropout split."""
    n = x.shape[-1]
    return (x.device, x.dtype, pow2_bucket(x.numel() // max(n, 1)), n, out_features, U.shape[1],
            bias is not None, split)


def _shape(x2: Tensor, out_features: int, U: Tensor) -> str:
    return f"x {tuple(x2.shape)} {str(x2.dtype)[6:]}, (out, r) = ({out_features}, {U.shape[1]}), NF4 residual"


# --------------------------------------------------------------------------- forward
# Arguments of both paths: (x2, xl2, nf4, blocks, out_features, U, S, V, bias, scale) on 2-D
# rows; ``xl2`` is the dropped copy the low-rank branch reads (None without dropout) and
# ``blocks`` is (blocksize, nested_blocksize).  Both return (y2, u).
def _forward_kernels(x2, xl2, nf4, blocks, out_features, U, S, V, bias, scale):
    from ..kernels.nf4_gemm import nf4_lowrank_forward

    cd = x2.dtype
    u = (x2 if xl2 is None else xl2) @ V.to(cd)
    t = u * (S.to(cd) * scale)
    y = nf4_lowrank_forward(x2, nf4, (out_features, x2.shape[1]), t, U.to(cd), bias,
                            blocksize=blocks[0], nested_blocksize=blocks[1])
    return y, u


def _forward_reference(x2, xl2, nf4, blocks, out_features, U, S, V, bias, scale):
    res = _dequantize(nf4, (out_features, x2.shape[1]), x2.dtype, *blocks)
    if xl2 is None:
        return reference.linear_forward(x2, res, U, S, V, bias, scale)
    y, u = reference.linear_forward(xl2, None, U, S, V, bias, scale)
    return y.addmm_(x2, res.T), u


FORWARD = KernelOp(
    name="qsorsa_linear forward",
    key=lambda x2, xl2, nf4, blocks, m, U, S, V, bias, scale: _key(x2, m, U, bias, xl2 is not None),
    shape=lambda x2, xl2, nf4, blocks, m, U, *_: _shape(x2, m, U),
    kernel=_forward_kernels,
    reference=_forward_reference,
    # float64 (tests, oracles) always takes the reference: the kernel targets fp32/fp16/bf16
    tensors=lambda x2, *_: (x2,),
)


# --------------------------------------------------------------------------- backward
# Arguments of both paths: (dy2, xl2, u, nf4, blocks, U, S, V, scale, needs_dx, split_dx,
# needs_dx_lowrank) on 2-D rows.  Both return (dx2, dxl2, dU, dS, dV), a gradient that is not
# needed as None.  ``split_dx=False``: dx = dy·deq(Q) + ss·Vᵀ; True (dropout): dx = dy·deq(Q)
# and dxl = ss·Vᵀ.
def _backward_kernels(dy2, xl2, u, nf4, blocks, U, S, V, scale, needs_dx, split_dx, needs_dxl):
    from ..kernels.nf4_gemm import nf4_lowrank_dx

    ss, dU, dS, dV = reference.lowrank_backward(dy2, xl2, u, U, S, V, scale)
    Vc = V.to(dy2.dtype)
    dx = dxl = None
    if needs_dx:
        lowrank = (None, None) if split_dx else (ss, Vc)
        dx = nf4_lowrank_dx(dy2, nf4, (dy2.shape[1], xl2.shape[1]), *lowrank,
                            blocksize=blocks[0], nested_blocksize=blocks[1])
    if split_dx and needs_dxl:
        dxl = ss @ Vc.T
    return dx, dxl, dU, dS, dV


def _backward_reference(dy2, xl2, u, nf4, blocks, U, S, V, scale, needs_dx, split_dx, needs_dxl):
    res = _dequantize(nf4, (dy2.shape[1], xl2.shape[1]), dy2.dtype, *blocks) if needs_dx else None
    if not split_dx:
        dx, dU, dS, dV = reference.linear_backward(dy2, xl2, u, res, U, S, V, scale, needs_dx)
        return dx, None, dU, dS, dV
    dxl, dU, dS, dV = reference.linear_backward(dy2, xl2, u, None, U, S, V, scale, needs_dxl)
    return (dy2 @ res if needs_dx else None), dxl, dU, dS, dV


BACKWARD = KernelOp(
    name="qsorsa_linear backward",
    key=lambda dy2, xl2, u, nf4, blocks, U, S, V, scale, needs_dx, split_dx, needs_dxl:
        _key(xl2, dy2.shape[1], U, None, split_dx),
    shape=lambda dy2, xl2, u, nf4, blocks, U, *_: _shape(xl2, dy2.shape[1], U),
    kernel=_backward_kernels,
    reference=_backward_reference,
    tensors=lambda dy2, *_: (dy2,),
)


@torch.library.custom_op("sorsa_kernels::qlinear_fwd", mutates_args=())
def qlinear_fwd(x: Tensor, x_lowrank: Optional[Tensor], nf4: list[Tensor], out_features: int, blocksize: int,
                nested_blocksize: int, U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor], scale: float,
                kernel: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """Forward on any leading shape of ``x``; returns ``(y, u)`` with ``u = x_lowrank·V`` 2-D (M×r).

    ``nf4`` is the residual's storage, :meth:`NF4Weight.tensors`.  ``kernel``: the caller's dispatch decision (``FORWARD.decide``), made here when None."""
    n = x.shape[-1]
    args = (x.reshape(-1, n), None if x_lowrank is None else x_lowrank.reshape(-1, n),
            nf4, (blocksize, nested_blocksize), out_features, U, S, V, bias, scale)
    y, u = FORWARD(FORWARD.decide(*args) if kernel is None else kernel, *args)
    return rows_to_shape(y, (*x.shape[:-1], out_features)), u


@qlinear_fwd.register_fake
def _(x, x_lowrank, nf4, out_features, blocksize, nested_blocksize, U, S, V, bias, scale, kernel=None):
    M = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], out_features), x.new_empty(M, U.shape[1])


@torch.library.custom_op("sorsa_kernels::qlinear_bwd", mutates_args=())
def qlinear_bwd(dy: Tensor, x_lowrank: Tensor, u: Tensor, nf4: list[Tensor], blocksize: int,
                nested_blocksize: int, U: Tensor, S: Tensor, V: Tensor, scale: float, needs_dx: bool,
                split_dx: bool, needs_dx_lowrank: bool, kernel: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dx_lowrank, dU, dS, dV)``.

    ``x_lowrank`` is what the low-rank branch read (``x`` itself without dropout).
    ``split_dx=False``: ``dx = dy·deq(Q) + s·Vᵀ`` in one fused product, ``dx_lowrank`` empty.
    ``split_dx=True`` (dropout): ``dx = dy·deq(Q)`` and ``dx_lowrank = s·Vᵀ``.
    A gradient that is not needed comes back as an empty tensor.  ``kernel``: the forward's
    dispatch decision.
    """
    args = (dy.reshape(-1, dy.shape[-1]), x_lowrank.reshape(-1, x_lowrank.shape[-1]), u,
            nf4, (blocksize, nested_blocksize), U, S, V, scale, needs_dx, split_dx, needs_dx_lowrank)
    dx, dxl, dU, dS, dV = BACKWARD(kernel, *args)
    # distinct empties: the outputs of a custom op may not alias each other
    dx, dxl = (x_lowrank.new_empty(0) if d is None else d.reshape(x_lowrank.shape) for d in (dx, dxl))
    return dx, dxl, dU, dS, dV


@qlinear_bwd.register_fake
def _(dy, x_lowrank, u, nf4, blocksize, nested_blocksize, U, S, V, scale, needs_dx, split_dx, needs_dx_lowrank,
      kernel):
    dx = x_lowrank.new_empty(x_lowrank.shape if needs_dx else (0,))
    dxl = x_lowrank.new_empty(x_lowrank.shape if split_dx and needs_dx_lowrank else (0,))
    return dx, dxl, torch.empty_like(U), torch.empty_like(S), torch.empty_like(V)


def _setup_context(ctx, inputs, output):
    x, x_lowrank, nf4, out_features, blocksize, nested_blocksize, U, S, V, bias, scale, kernel = inputs
    if kernel is None:  # a direct call of the op: its own decision, the same one
        kernel = FORWARD.decide(x, x_lowrank, nf4, (blocksize, nested_blocksize), out_features, U, S, V, bias, scale)
    _, u = output
    split = x_lowrank is not None
    ctx.save_for_backward(x_lowrank if split else x, u, U, S, V, *nf4)
    ctx.split = split
    ctx.blocksize = blocksize
    ctx.nested_blocksize = nested_blocksize
    ctx.scale = scale
    ctx.kernel = kernel
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _du):
    xl, u, U, S, V, *nf4 = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    needs_dxl = ctx.split and ctx.needs_input_grad[1]
    dx, dxl, dU, dS, dV = qlinear_bwd(dy.contiguous(), xl, u, nf4, ctx.blocksize, ctx.nested_blocksize, U, S, V,
                                      ctx.scale, needs_dx, ctx.split, needs_dxl, ctx.kernel)
    db = bias_grad(dy, ctx.bias_dtype) if ctx.needs_input_grad[9] else None
    return (dx if needs_dx else None, dxl if needs_dxl else None, [None] * len(nf4), None, None, None,
            dU, dS, dV, db, None, None)


qlinear_fwd.register_autograd(_backward, setup_context=_setup_context)


def qsorsa_linear(x: Tensor, q: NF4Weight, U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor] = None,
                  scale: float = 1.0, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """``y = x·deq(Q)ᵀ + scale·((drop(x)·V)·S)·Uᵀ + b`` for ``x`` of any leading shape.

    ``q`` is the NF4 residual (``x.shape[-1]`` must equal ``q.shape[1]``); the product
    runs in ``x.dtype``.  Dropout (training only) affects the low-rank branch alone.

    Example::

        >>> q = quantize_nf4(Wr)
        >>> y = qsorsa_linear(x, q, U, S, V, bias, scale=1.0)
    """
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension, expected {q.shape[1]}")
    dtype = autocast_dtype(x)
    if dtype is not None:  # mixed precision: compute in the autocast dtype, as F.linear does
        with torch.autocast(x.device.type, enabled=False):
            return qsorsa_linear(x.to(dtype), q, U.to(dtype), S.to(dtype), V.to(dtype),
                                 None if bias is None else bias.to(dtype), scale, dropout_p, training)
    x_lowrank = F.dropout(x, dropout_p, True) if dropout_p > 0.0 and training else None
    nf4, blocks, scale = list(q.tensors()), (q.blocksize, q.nested_blocksize), float(scale)
    kernel = FORWARD.decide(x, x_lowrank, nf4, blocks, q.shape[0], U, S, V, bias, scale)  # once per call
    y, _ = qlinear_fwd(x, x_lowrank, nf4, q.shape[0], *blocks, U, S, V, bias, scale, kernel)
    return y
