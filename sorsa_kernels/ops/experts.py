"""The SORSA experts op: every expert of a mixture-of-experts layer in one call.

Rows of ``x`` arrive grouped by expert (``counts[e]`` consecutive rows for expert e); per
expert ``y_e = x_e·Wr_eᵀ + scale·((x_e·V_e)·S_e)·U_eᵀ + b_e``.  Neither the forward nor the
backward forms an expert's dense ``ΔW`` (let alone the E×m×n stack): the math is
:func:`sorsa_kernels.ops.reference.experts_forward` / ``experts_backward``, and on the Triton
path the grouped kernels of :mod:`sorsa_kernels.kernels.grouped_sorsa` (one launch over all
experts per GEMM).  The kernel-or-reference decision is made once per call
(:func:`sorsa_kernels.ops.dispatch.kernel_path`) and used by the forward and the backward; a
kernel that cannot compile or launch on the GPU falls back to the reference for that shape
(:func:`~sorsa_kernels.ops.dispatch.run_with_fallback`).

Only ``x`` and the r-wide ``u = x·V`` are saved for backward.  The residual and the bias
are frozen (a residual that requires grad is rejected).

:func:`qsorsa_experts` is the same op with the residual stored per expert in NF4 (QSORSA):
the *dequant path* dequantizes (bitsandbytes) a chunk of experts that have rows at a time —
never the whole E×m×n stack, never an expert without rows — and runs the dense op's path
(reference or grouped kernels) on that chunk's rows; backward dequantizes again for ``dx``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ..quant.nf4 import NF4Weight, dequantize_nf4_bnb
from . import reference
from .dispatch import fallen_back, kernel_path, pow2_bucket, run_with_fallback

__all__ = ["sorsa_experts", "qsorsa_experts", "dequantize_experts"]

_FORWARD = "sorsa_experts forward"
_BACKWARD = "sorsa_experts backward"


@functools.lru_cache(maxsize=None)
def _kernels():
    """kernels/grouped_sorsa.py, imported on the first kernel call (it needs Triton)."""
    from ..kernels import grouped_sorsa

    return grouped_sorsa


def _key(x: Tensor, residual: Optional[Tensor], U: Tensor, bias: Optional[Tensor]) -> tuple:
    """The fallback key of a call: device, dtype, rows (bucketed), in_features, (E, m, r)."""
    return (x.device, x.dtype, pow2_bucket(x.shape[0]), x.shape[1], *U.shape,
            residual is not None, bias is not None)


def _shape(x: Tensor, U: Tensor) -> str:
    return f"x {tuple(x.shape)} {str(x.dtype)[6:]}, (experts, out, r) = {tuple(U.shape)}"


def _experts_forward(x: Tensor, counts: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor,
                     bias: Optional[Tensor], scale: float, kernel: bool) -> tuple[Tensor, Tensor]:
    """``(y, u)`` by the grouped kernels (``kernel``: the call's decision) or the reference."""
    key = _key(x, residual, U, bias)

    def ref():
        return reference.experts_forward(x, counts, residual, U, S, V, bias, scale)

    if kernel and not fallen_back(_FORWARD, key):
        return run_with_fallback(_FORWARD, key, x.device, _shape(x, U),
                                 lambda: _kernels().grouped_forward(x, counts, residual, U, S, V, bias, scale), ref)
    return ref()


def _experts_backward(dy: Tensor, x: Tensor, u: Tensor, counts: Tensor, residual: Optional[Tensor], U: Tensor,
                      S: Tensor, V: Tensor, scale: float, needs_dx: bool, kernel: bool):
    """``(dx, dU, dS, dV)`` by the grouped kernels (``kernel``: the forward's decision) or the reference."""
    key = _key(x, residual, U, None)
    args = (dy, x, u, counts, residual, U, S, V, scale, needs_dx)

    def ref():
        return reference.experts_backward(*args)

    if kernel and not fallen_back(_BACKWARD, key):
        return run_with_fallback(_BACKWARD, key, dy.device, _shape(x, U), lambda: _kernels().grouped_backward(*args), ref)
    return ref()


class _SORSAExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, residual, U, S, V, bias, scale, kernel):
        y, u = _experts_forward(x, counts, residual, U, S, V, bias, scale, kernel)
        ctx.save_for_backward(x, counts, u, residual, U, S, V)
        ctx.scale = scale
        ctx.kernel = kernel
        return y

    @staticmethod
    def backward(ctx, dy):
        x, counts, u, residual, U, S, V = ctx.saved_tensors
        dx, dU, dS, dV = _experts_backward(dy.contiguous(), x, u, counts, residual, U, S, V, ctx.scale,
                                           ctx.needs_input_grad[0], ctx.kernel)
        return dx, None, None, dU, dS, dV, None, None, None


def _decide(x: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor]) -> bool:
    """The call's dispatch decision: the kernels, unless this shape's forward failed before."""
    return kernel_path(x, residual, U, S, V) and not fallen_back(_FORWARD, _key(x, residual, U, bias))


def _check(x: Tensor, counts: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor,
           bias: Optional[Tensor]) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows × in_features) with rows grouped by expert, got shape {tuple(x.shape)}")
    if U.dim() != 3 or S.dim() != 2 or V.dim() != 3:
        raise ValueError(
            f"U, S, V must be stacks E×m×r, E×r, E×n×r; got {tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)}"
        )
    E, m, r = U.shape
    n = V.shape[1]
    if tuple(S.shape) != (E, r) or tuple(V.shape) != (E, n, r):
        raise ValueError(
            f"S has shape {tuple(S.shape)} and V {tuple(V.shape)} but U {tuple(U.shape)} needs ({E}, {r}) and ({E}, n, {r})"
        )
    if x.shape[1] != n:
        raise ValueError(f"x has {x.shape[1]} features in its last dimension, expected {n}")
    if residual is not None and tuple(residual.shape) != (E, m, n):
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected ({E}, {m}, {n})")
    if bias is not None and tuple(bias.shape) != (E, m):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({E}, {m})")
    if counts.dim() != 1 or counts.shape[0] != E or counts.dtype.is_floating_point:
        raise ValueError(
            f"counts must be an integer vector of rows per expert with {E} entries, got "
            f"{counts.dtype} of shape {tuple(counts.shape)}"
        )
    for what, t in (("residual", residual), ("bias", bias)):
        if t is not None and t.requires_grad:
            raise ValueError(
                f"the SORSA expert {what} is frozen but was given with requires_grad=True; only U, S, V are "
                f"trainable: call {what}.requires_grad_(False)"
            )


def sorsa_experts(
    x: Tensor,
    counts: Tensor,
    residual: Optional[Tensor],
    U: Tensor,
    S: Tensor,
    V: Tensor,
    bias: Optional[Tensor] = None,
    scale: float = 1.0,
) -> Tensor:
    """Every expert's SORSA linear on rows grouped by expert; returns ``y`` (M×m).

    Args:
        x: M×n rows, the ``counts[0]`` rows of expert 0 first, then expert 1's, ….
        counts: (E,) integer rows per expert (zeros allowed), summing to M.
        residual: the frozen stack Wr E×m×n (None: only the low-rank branch).
        U, S, V: the trainable stacks E×m×r, E×r, E×n×r.
        bias: an optional frozen E×m bias.
        scale: ``alpha / rank`` (1 without alpha).

    Example::

        >>> counts = torch.bincount(expert_of_row, minlength=E)      # rows sorted by expert
        >>> y = sorsa_experts(x, counts, layer.residual, layer.U, layer.S, layer.V)
    """
    _check(x, counts, residual, U, S, V, bias)
    return _SORSAExperts.apply(x, counts, residual, U, S, V, bias, float(scale), _decide(x, residual, U, S, V, bias))


# --------------------------------------------------------------------------- NF4 experts
def dequantize_experts(nf4: tuple[Tensor, ...], shape: tuple[int, int], experts, dtype: torch.dtype,
                       blocksize: int = 64, nested_blocksize: int = 256) -> Tensor:
    """``deq(Q_e)`` of each expert in ``experts`` (indices), stacked len×m×n in ``dtype``.

    ``nf4`` is ``(packed E×P, absmax E×B, nested_absmax E×N float32, nested_code, offset (E,),
    code)``: each expert's matrix quantized on its own, in the bitsandbytes layout.
    Dequantization is bitsandbytes' (float64 goes through float32, bitsandbytes' widest).
    """
    packed, absmax, nested_absmax, nested_code, offset, code = nf4
    dq = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    out = torch.empty((len(experts), *shape), dtype=dtype, device=packed.device)
    for i, e in enumerate(experts):
        q = NF4Weight(packed=packed[e].reshape(-1, 1), absmax=absmax[e], nested_absmax=nested_absmax[e],
                      nested_code=nested_code, offset=offset[e], code=code, shape=torch.Size(shape), dtype=dq,
                      blocksize=blocksize, nested_blocksize=nested_blocksize)
        out[i] = dequantize_nf4_bnb(q, dq)
    return out


def _active_chunks(counts: list[int], chunk: int):
    """``(experts, rows)``: up to ``chunk`` experts that have rows, and the slice of their rows
    (consecutive: the experts between them have none)."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    active = [e for e, c in enumerate(counts) if c > 0]
    for i in range(0, len(active), chunk):
        idx = active[i:i + chunk]
        yield idx, slice(starts[idx[0]], starts[idx[-1] + 1])


class _QSORSAExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, U, S, V, bias, scale, kernel, meta, *nf4):
        shape, blocksize, nested_blocksize, chunk = meta
        groups = reference.counts_list(counts)
        M, (m, r) = x.shape[0], (U.shape[1], U.shape[2])
        y, u = x.new_empty(M, m), x.new_empty(M, r)
        for idx, rows in _active_chunks(groups, chunk):
            res = dequantize_experts(nf4, shape, idx, x.dtype, blocksize, nested_blocksize)
            sub = torch.tensor([groups[e] for e in idx], device=x.device)
            y[rows], u[rows] = _experts_forward(x[rows], sub, res, U[idx], S[idx], V[idx],
                                                None if bias is None else bias[idx], scale, kernel)
            del res
        ctx.save_for_backward(x, u, U, S, V, *nf4)
        ctx.groups, ctx.scale, ctx.meta, ctx.kernel = groups, scale, meta, kernel
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, U, S, V, *nf4 = ctx.saved_tensors
        shape, blocksize, nested_blocksize, chunk = ctx.meta
        needs_dx = ctx.needs_input_grad[0]
        dy = dy.contiguous()
        dx = torch.zeros_like(x) if needs_dx else None
        dU, dS, dV = torch.zeros_like(U), torch.zeros_like(S), torch.zeros_like(V)
        for idx, rows in _active_chunks(ctx.groups, chunk):
            res = dequantize_experts(nf4, shape, idx, dy.dtype, blocksize, nested_blocksize) if needs_dx else None
            sub = torch.tensor([ctx.groups[e] for e in idx], device=dy.device)
            d, dU[idx], dS[idx], dV[idx] = _experts_backward(dy[rows], x[rows], u[rows], sub, res, U[idx], S[idx],
                                                            V[idx], ctx.scale, needs_dx, ctx.kernel)
            if needs_dx:
                dx[rows] = d
            del res
        return (dx, None, dU, dS, dV, None, None, None, None) + (None,) * len(nf4)


def qsorsa_experts(
    x: Tensor,
    counts: Tensor,
    nf4: tuple[Tensor, ...],
    U: Tensor,
    S: Tensor,
    V: Tensor,
    bias: Optional[Tensor] = None,
    scale: float = 1.0,
    *,
    blocksize: int = 64,
    nested_blocksize: int = 256,
    expert_chunk: int = 8,
) -> Tensor:
    """:func:`sorsa_experts` with each expert's residual in NF4; returns ``y`` (M×m).

    ``nf4`` is ``(packed E×P uint8, absmax E×B uint8, nested_absmax E×N float32,
    nested_code (256,), offset (E,), code (16,))`` (see :func:`dequantize_experts`).  At most
    ``expert_chunk`` experts are dequantized (in ``x.dtype``) at a time, only experts with rows.

    Example::

        >>> y = qsorsa_experts(x, counts, layer.nf4_tensors(), layer.U, layer.S, layer.V)
    """
    _check(x, counts, None, U, S, V, bias)
    E, m, _ = U.shape
    n = V.shape[1]
    packed = nf4[0]
    if packed.dim() != 2 or packed.shape[0] != E or packed.shape[1] != (m * n + 1) // 2:
        raise ValueError(f"packed NF4 experts have shape {tuple(packed.shape)}, expected ({E}, {(m * n + 1) // 2})")
    if isinstance(expert_chunk, bool) or not isinstance(expert_chunk, int) or expert_chunk < 1:
        raise ValueError(f"expert_chunk must be a positive int (experts dequantized at a time), got {expert_chunk!r}")
    meta = ((m, n), int(blocksize), int(nested_blocksize), expert_chunk)
    # One decision per call (the dequantized residual chunks have x's dtype).
    kernel = kernel_path(x, U, S, V)
    return _QSORSAExperts.apply(x, counts, U, S, V, bias, float(scale), kernel, meta, *nf4)
