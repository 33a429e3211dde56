"""The QSORSA linear op: ``y = x·deq(Q)ᵀ + scale·((x·V)·S)·Uᵀ + b`` with ``Q = NF4(Wr)``.

Registered as ``torch.library`` custom ops ``sorsa_kernels::qlinear_fwd`` and
``sorsa_kernels::qlinear_bwd`` (fake implementations and an autograd formula, so
``torch.compile`` traces through without a graph break).  Each picks, through
:func:`sorsa_kernels.ops.dispatch.kernel_path` (a kernel that cannot compile or launch
falls back to the reference for that shape, :func:`~sorsa_kernels.ops.dispatch.run_with_fallback`):

* the Triton path: ``x·V`` by cuBLAS, then one fused kernel
  (:mod:`sorsa_kernels.kernels.nf4_gemm`) computing ``[x | t]·[deq(Q) | U]ᵀ + b`` that
  dequantizes NF4 tiles inside its K loop; in backward the same kernel gives
  ``dx = [dy | s]·[deq(Q)ᵀ | V]ᵀ``;
* the reference path: bitsandbytes dequantizes ``Q`` to the compute dtype, then
  :func:`sorsa_kernels.ops.reference.linear_forward` / ``linear_backward``.

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
from .dispatch import autocast_dtype, fallen_back, kernel_path, pow2_bucket, run_with_fallback
from .sorsa_linear import bias_grad

__all__ = ["qsorsa_linear", "qlinear_fwd", "qlinear_bwd"]


def _weight(packed, absmax, nested_absmax, nested_code, offset, code, shape, dtype, blocksize, nested_blocksize):
    return NF4Weight(
        packed=packed, absmax=absmax, nested_absmax=nested_absmax, nested_code=nested_code,
        offset=offset, code=code, shape=torch.Size(shape), dtype=dtype,
        blocksize=blocksize, nested_blocksize=nested_blocksize,
    )


def _kernel_path(op: str, key: tuple, t: Tensor) -> bool:
    # float64 (tests, oracles) always takes the reference: the kernel targets fp32/fp16/bf16
    return kernel_path(t) and not fallen_back(op, key)


def _key(x2: Tensor, out_features: int, U: Tensor, bias: Optional[Tensor], split: bool) -> tuple:
    """Fallback key: device, dtype, M bucket, the layer's shape, bias, dropout split."""
    return (x2.device, x2.dtype, pow2_bucket(x2.shape[0]), x2.shape[1], out_features, U.shape[1],
            bias is not None, split)


def _shape(x2: Tensor, out_features: int, U: Tensor) -> str:
    return f"x {tuple(x2.shape)} {str(x2.dtype)[6:]}, (out, r) = ({out_features}, {U.shape[1]}), NF4 residual"


def _dequantize(nf4, shape, cd, blocksize, nested_blocksize) -> Tensor:
    """deq(Q) in ``cd`` by bitsandbytes (float64 goes through float32, bitsandbytes' widest)."""
    dq = cd if cd in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    return dequantize_nf4_bnb(_weight(*nf4, shape, dq, blocksize, nested_blocksize), dq).to(cd)


def _lowrank_grads(dy: Tensor, xl: Tensor, u: Tensor, U: Tensor, S: Tensor, scale: float):
    """``s·S·scale``, dU, dS, dV of the low-rank branch — the formulas of reference.linear_backward."""
    cd = dy.dtype
    Sc = S.to(cd)
    s = dy @ U.to(cd)
    dS = (u.float() * s.float()).sum(0) * scale
    dU = (dy.T @ (u * Sc)) * scale
    ss = s * (Sc * scale)
    dV = xl.T @ ss
    return ss, dU, dS, dV


@torch.library.custom_op("sorsa_kernels::qlinear_fwd", mutates_args=())
def qlinear_fwd(
    x: Tensor,
    x_lowrank: Optional[Tensor],
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor,
    nested_code: Tensor,
    offset: Tensor,
    code: Tensor,
    out_features: int,
    blocksize: int,
    nested_blocksize: int,
    U: Tensor,
    S: Tensor,
    V: Tensor,
    bias: Optional[Tensor],
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Forward on any leading shape of ``x``; returns ``(y, u)`` with ``u = x_lowrank·V`` 2-D (M×r)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    xl2 = x2 if x_lowrank is None else x_lowrank.reshape(-1, n)
    cd = x.dtype
    nf4 = (packed, absmax, nested_absmax, nested_code, offset, code)

    def kernels():
        from ..kernels.nf4_gemm import nf4_lowrank_forward

        u = xl2 @ V.to(cd)
        t = u * (S.to(cd) * scale)
        return nf4_lowrank_forward(
            x2, nf4, (out_features, n), t, U.to(cd), bias,
            blocksize=blocksize, nested_blocksize=nested_blocksize,
        ), u

    def ref():
        res = _dequantize(nf4, (out_features, n), cd, blocksize, nested_blocksize)
        if x_lowrank is None:
            return reference.linear_forward(x2, res, U, S, V, bias, scale)
        y, u = reference.linear_forward(xl2, None, U, S, V, bias, scale)
        return y + x2 @ res.T, u

    key = _key(x2, out_features, U, bias, x_lowrank is not None)
    if _kernel_path("qsorsa_linear forward", key, x):
        y, u = run_with_fallback("qsorsa_linear forward", key, x.device, _shape(x2, out_features, U), kernels, ref)
    else:
        y, u = ref()
    return reference.rows_to_shape(y, (*x.shape[:-1], out_features)), u


@qlinear_fwd.register_fake
def _(x, x_lowrank, packed, absmax, nested_absmax, nested_code, offset, code,
      out_features, blocksize, nested_blocksize, U, S, V, bias, scale):
    M = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], out_features), x.new_empty(M, U.shape[1])


@torch.library.custom_op("sorsa_kernels::qlinear_bwd", mutates_args=())
def qlinear_bwd(
    dy: Tensor,
    x_lowrank: Tensor,
    u: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor,
    nested_code: Tensor,
    offset: Tensor,
    code: Tensor,
    blocksize: int,
    nested_blocksize: int,
    U: Tensor,
    S: Tensor,
    V: Tensor,
    scale: float,
    needs_dx: bool,
    split_dx: bool,
    needs_dx_lowrank: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dx_lowrank, dU, dS, dV)``.

    ``x_lowrank`` is what the low-rank branch read (``x`` itself without dropout).
    ``split_dx=False``: ``dx = dy·deq(Q) + s·Vᵀ`` in one fused product, ``dx_lowrank`` empty.
    ``split_dx=True`` (dropout): ``dx = dy·deq(Q)`` and ``dx_lowrank = s·Vᵀ``.
    A gradient that is not needed comes back as an empty tensor.
    """
    m = dy.shape[-1]
    n = x_lowrank.shape[-1]
    dy2 = dy.reshape(-1, m)
    xl2 = x_lowrank.reshape(-1, n)
    cd = dy.dtype
    nf4 = (packed, absmax, nested_absmax, nested_code, offset, code)
    empty = (x_lowrank.new_empty(0), x_lowrank.new_empty(0))  # distinct: outputs may not alias

    def kernels():
        from ..kernels.nf4_gemm import nf4_lowrank_dx

        dx, dxl = empty
        ss, dU, dS, dV = _lowrank_grads(dy2, xl2, u, U, S, scale)
        Vc = V.to(cd)
        if needs_dx:
            lr = (None, None) if split_dx else (ss, Vc)
            dx = nf4_lowrank_dx(
                dy2, nf4, (m, n), *lr, blocksize=blocksize, nested_blocksize=nested_blocksize
            ).reshape(x_lowrank.shape)
        if split_dx and needs_dx_lowrank:
            dxl = (ss @ Vc.T).reshape(x_lowrank.shape)
        return dx, dxl, dU.to(U.dtype), dS.to(S.dtype), dV.to(V.dtype)

    def ref():
        dx, dxl = empty
        res = None
        if needs_dx:
            res = _dequantize(nf4, (m, n), cd, blocksize, nested_blocksize)
        if not split_dx:
            d, dU, dS, dV = reference.linear_backward(dy2, xl2, u, res, U, S, V, scale, needs_dx)
            if needs_dx:
                dx = d.reshape(x_lowrank.shape)
        else:
            d, dU, dS, dV = reference.linear_backward(dy2, xl2, u, None, U, S, V, scale, needs_dx_lowrank)
            if needs_dx_lowrank:
                dxl = d.reshape(x_lowrank.shape)
            if needs_dx:
                dx = (dy2 @ res).reshape(x_lowrank.shape)
        return dx, dxl, dU, dS, dV

    key = _key(xl2, m, U, None, split_dx)
    if _kernel_path("qsorsa_linear backward", key, dy):
        dx, dxl, dU, dS, dV = run_with_fallback("qsorsa_linear backward", key, dy.device,
                                                _shape(xl2, m, U), kernels, ref)
    else:
        dx, dxl, dU, dS, dV = ref()
    return dx, dxl, dU, dS, dV


@qlinear_bwd.register_fake
def _(dy, x_lowrank, u, packed, absmax, nested_absmax, nested_code, offset, code,
      blocksize, nested_blocksize, U, S, V, scale, needs_dx, split_dx, needs_dx_lowrank):
    dx = x_lowrank.new_empty(x_lowrank.shape if needs_dx else (0,))
    dxl = x_lowrank.new_empty(x_lowrank.shape if split_dx and needs_dx_lowrank else (0,))
    return dx, dxl, torch.empty_like(U), torch.empty_like(S), torch.empty_like(V)


def _setup_context(ctx, inputs, output):
    (x, x_lowrank, packed, absmax, nested_absmax, nested_code, offset, code,
     out_features, blocksize, nested_blocksize, U, S, V, bias, scale) = inputs
    _, u = output
    split = x_lowrank is not None
    ctx.save_for_backward(x_lowrank if split else x, u, packed, absmax, nested_absmax,
                          nested_code, offset, code, U, S, V)
    ctx.split = split
    ctx.blocksize = blocksize
    ctx.nested_blocksize = nested_blocksize
    ctx.scale = scale
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _du):
    xl, u, packed, absmax, nested_absmax, nested_code, offset, code, U, S, V = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    needs_dxl = ctx.split and ctx.needs_input_grad[1]
    dx, dxl, dU, dS, dV = qlinear_bwd(
        dy.contiguous(), xl, u, packed, absmax, nested_absmax, nested_code, offset, code,
        ctx.blocksize, ctx.nested_blocksize, U, S, V, ctx.scale, needs_dx, ctx.split, needs_dxl,
    )
    return (
        dx if needs_dx else None, dxl if needs_dxl else None,
        None, None, None, None, None, None, None, None, None,
        dU, dS, dV, bias_grad(dy, ctx.bias_dtype) if ctx.needs_input_grad[14] else None, None,
    )


qlinear_fwd.register_autograd(_backward, setup_context=_setup_context)


def qsorsa_linear(
    x: Tensor,
    q: NF4Weight,
    U: Tensor,
    S: Tensor,
    V: Tensor,
    bias: Optional[Tensor] = None,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
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
    y, _ = qlinear_fwd(
        x, x_lowrank, *q.tensors(), q.shape[0], q.blocksize, q.nested_blocksize,
        U, S, V, bias, float(scale),
    )
    return y
