"""Fused GEMM over an NF4 residual plus the SORSA low-rank branch (QSORSA).

One kernel family, two uses (``W`` is the m×n residual stored in NF4, flattened
row-major in 64-value blocks with double-quantized absmax, the bitsandbytes layout):

* forward:  ``y  = [x | t]·[deq(W) | U]ᵀ + b``   (t = scale·(x·V)·diag(S), M×r)
* input grad: ``dx = [dy | s]·[deq(W)ᵀ | V]ᵀ``     (s = scale·(dy·U)·diag(S), M×r)

The K loop first walks the residual's reduction dimension, dequantizing each
BLOCK_K×BLOCK_N tile of ``W`` in registers (unpack the nibble, look up the NF4 code,
decode the 8-bit absmax of the element's 64-block through the nested code and scale,
add the offset, multiply), then walks the r columns of the low-rank operands in the same
accumulator.  No dequantized copy of ``W`` is ever written to memory.

Because bitsandbytes flattens the whole matrix, a 64-block can straddle row ends (any
n not divisible by 64), so every element computes its own flat index ``row·n + col``
(int64) and gathers its byte and absmax code; the gathers hit L1/L2 since neighbouring
elements share bytes and blocks.

The thin r-wide products ``x·V`` and ``dy·U`` are left to cuBLAS by the caller
(``sorsa_kernels.ops.qsorsa_linear``).

Two paths, chosen by M (rows of ``x`` / ``dy``):

* M < configs.DEQUANT_MIN_M (decode, short batches): the fused kernel above; ``W`` is read once per
  row tile, so with few row tiles dequantizing in the K loop beats writing a copy.
* M ≥ configs.DEQUANT_MIN_M (training): the per-element gathers of the fused kernel (5 loads per
  weight) cost more than one pass writing ``deq(W)`` to a scratch matrix in the compute dtype
  (``_nf4_dequant_kernel``: contiguous 16-byte loads of the packed bytes, two values per
  byte), then the bf16/fp16 fused GEMM of :mod:`sorsa_kernels.kernels.residual_gemm` (the
  same code path as dense SORSA, wgmma on Hopper) — what bitsandbytes' dequantize + cuBLAS
  does, with the low-rank branch and the bias still fused.  The scratch lives for one call.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import nf4_gemm_configs as configs
from ._launch import device_guard
from .residual_gemm import launch_gemm

__all__ = ["nf4_lowrank_forward", "nf4_lowrank_dx", "nf4_dequantize", "nf4_dequant_tile"]

@triton.jit
def nf4_dequant_tile(
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset,
    flat, mask, QBLOCK: tl.constexpr, NESTED_QBLOCK: tl.constexpr,
):
    """float32 values of the NF4 elements at flat (row-major) indices ``flat`` (int64).

    Also the grouped NF4 experts kernel's (kernels/grouped_nf4.py), with the pointers already
    at one expert's row of the stacked storage."""
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 0xF)
    level = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = flat // QBLOCK
    qabs = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
    scale2 = tl.load(nested_absmax_ptr + block // NESTED_QBLOCK, mask=mask, other=0.0)
    absmax = tl.load(nested_code_ptr + qabs, mask=mask, other=0.0) * scale2 + offset
    return level * absmax


# M is bucketed to the next power of two in the key so that every new sequence length
# does not re-tune.
@triton.autotune(configs=configs.CONFIGS, key=["M_BUCKET", "N", "K", "R", "TRANS_W"],
                 prune_configs_by={"early_config_prune": configs.prune_nf4_configs})
@triton.jit
def _fused_nf4_lowrank_gemm_kernel(
    a_ptr, t_ptr, p_ptr, bias_ptr, c_ptr,
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
    M, N, K, R, W_COLS, M_BUCKET,
    stride_am, stride_ak, stride_tm, stride_tr, stride_pn, stride_pr, stride_cm, stride_cn,
    TRANS_W: tl.constexpr,          # False: B[k, j] = W[j, k] (forward); True: B[k, j] = W[k, j] (dx)
    HAS_LOWRANK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    QBLOCK: tl.constexpr,
    NESTED_QBLOCK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``C[M, N] = A[M, K]·B[K, N] + T[M, R]·Pᵀ[R, N] (+ bias)`` with ``B`` dequantized from NF4."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering (Triton matmul tutorial): GROUP_M row tiles share B tiles in L2
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offset = tl.load(offset_ptr).to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        if TRANS_W:
            flat = offs_k[:, None] * W_COLS + offs_n[None, :]
        else:
            flat = offs_n[None, :] * W_COLS + offs_k[:, None]
        b_mask = mask_k[:, None] & mask_n[None, :]
        b = nf4_dequant_tile(
            packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset,
            flat, b_mask, QBLOCK, NESTED_QBLOCK,
        )
        # cast like bitsandbytes does (float32 value → compute dtype), then an fp32-accumulated dot
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=INPUT_PRECISION)

    if HAS_LOWRANK:
        for r0 in range(0, R, BLOCK_K):
            offs_r = (r0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_r = offs_r < R
            t = tl.load(
                t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0,
            )
            p = tl.load(
                p_ptr + offs_n[None, :] * stride_pn + offs_r[:, None] * stride_pr,
                mask=mask_r[:, None] & mask_n[None, :], other=0.0,
            )
            acc = tl.dot(t, p, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]

    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
        acc.to(c_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr,
    numel, QBLOCK: tl.constexpr, NESTED_QBLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    """``out[2i], out[2i+1] = deq(high nibble of byte i), deq(low nibble)`` for BLOCK bytes.

    Bytes are read contiguously (vector loads); both values of a byte share one 64-block
    (QBLOCK is even), so one absmax decode serves both.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # byte index (int64)
    n_bytes = (numel + 1) // 2
    mask = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
    block = (offs * 2) // QBLOCK
    qabs = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
    scale2 = tl.load(nested_absmax_ptr + block // NESTED_QBLOCK, mask=mask, other=0.0)
    offset = tl.load(offset_ptr).to(tl.float32)
    absmax = tl.load(nested_code_ptr + qabs, mask=mask, other=0.0) * scale2 + offset
    hi = tl.load(code_ptr + (byte >> 4), mask=mask, other=0.0) * absmax
    lo = tl.load(code_ptr + (byte & 0xF), mask=mask, other=0.0) * absmax
    vals = tl.reshape(tl.join(hi, lo), (2 * BLOCK,))
    idx = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + idx, vals.to(out_ptr.dtype.element_ty), mask=idx < numel)


# --------------------------------------------------------------------------- launchers
def _input_precision(dtype: torch.dtype) -> str:
    # fp32 operands follow torch's own matmul setting, so kernel and reference agree:
    # exact ("ieee") unless the user enabled TF32 for CUDA matmuls.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def nf4_dequantize(
    nf4: tuple[torch.Tensor, ...],
    w_shape: tuple[int, int],
    dtype: torch.dtype,
    *,
    blocksize: int = 64,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """``deq(W)`` as a contiguous ``w_shape`` matrix in ``dtype`` (one pass, vector loads).

    Same values as :func:`sorsa_kernels.quant.nf4.dequantize_nf4` (float32 math, then cast).

    Example::

        >>> W = nf4_dequantize(q.tensors(), q.shape, torch.bfloat16)
    """
    packed, absmax, nested_absmax, nested_code, offset, code = nf4
    rows, cols = w_shape
    if blocksize % 2:
        raise ValueError(f"NF4 blocksize must be even (two values per byte), got {blocksize}")
    with device_guard(packed):
        out = torch.empty((rows, cols), device=packed.device, dtype=dtype)
        numel = rows * cols
        if numel:
            grid = (triton.cdiv(triton.cdiv(numel, 2), configs.DEQUANT_BLOCK),)
            _nf4_dequant_kernel[grid](
                packed, absmax, nested_absmax, nested_code, offset, code, out, numel,
                QBLOCK=blocksize, NESTED_QBLOCK=nested_blocksize, BLOCK=configs.DEQUANT_BLOCK,
                num_warps=4,
            )
    return out


def _launch_dequant_gemm(
    a: torch.Tensor, nf4: tuple[torch.Tensor, ...], w_shape: tuple[int, int], blocksize: int,
    nested_blocksize: int, trans_w: bool, t: Optional[torch.Tensor], p: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """Large-M path: ``deq(W)`` into a scratch matrix, then the dense fused SORSA GEMM."""
    rows, cols = w_shape
    M = a.shape[0]
    N = cols if trans_w else rows
    with device_guard(a):
        W = nf4_dequantize(nf4, w_shape, a.dtype, blocksize=blocksize, nested_blocksize=nested_blocksize)
        c = torch.empty((M, N), device=a.device, dtype=a.dtype)
        # forward: B1 = Wᵀ (k = column of W); dx: B1 = W (k = row of W).
        b1 = (W, W.stride(0), W.stride(1)) if trans_w else (W, W.stride(1), W.stride(0))
        if t is None:  # no low-rank branch: an empty second segment (K2 = 0, never read)
            t, p = a[:, :0], W
        launch_gemm(a, b1, t, (p, p.stride(1), p.stride(0)), bias, c,
                     precision=_input_precision(a.dtype))
    return c


def _launch(
    a: torch.Tensor,
    nf4: tuple[torch.Tensor, ...],
    w_shape: tuple[int, int],
    blocksize: int,
    nested_blocksize: int,
    trans_w: bool,
    t: Optional[torch.Tensor],
    p: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    packed, absmax, nested_absmax, nested_code, offset, code = nf4
    rows, cols = w_shape
    M, K = a.shape
    N = cols if trans_w else rows
    if K != (rows if trans_w else cols):
        raise ValueError(f"operand has {K} columns but the NF4 matrix is {rows}×{cols}")
    has_lowrank = t is not None and p is not None and t.shape[1] > 0
    R = t.shape[1] if has_lowrank else 0
    if has_lowrank:
        if t.shape[0] != M or p.shape != (N, R):
            raise ValueError(f"low-rank operands have shapes {tuple(t.shape)} and {tuple(p.shape)}; expected ({M}, r) and ({N}, r)")
        t = t.to(a.dtype)
        p = p.to(a.dtype)
    if M >= configs.DEQUANT_MIN_M and N > 0:
        return _launch_dequant_gemm(a, nf4, (rows, cols), blocksize, nested_blocksize, trans_w,
                                    t if has_lowrank else None, p if has_lowrank else None, bias)
    with device_guard(a):
        c = torch.empty((M, N), device=a.device, dtype=a.dtype)
        if M == 0 or N == 0:
            return c
        dummy = c  # never read: the matching constexpr flag is False
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _fused_nf4_lowrank_gemm_kernel[grid](
            a, t if has_lowrank else dummy, p if has_lowrank else dummy,
            bias if bias is not None else dummy, c,
            packed, absmax, nested_absmax, nested_code, offset, code,
            M, N, K, R, cols, triton.next_power_of_2(max(M, 1)),
            a.stride(0), a.stride(1),
            t.stride(0) if has_lowrank else 0, t.stride(1) if has_lowrank else 0,
            p.stride(0) if has_lowrank else 0, p.stride(1) if has_lowrank else 0,
            c.stride(0), c.stride(1),
            TRANS_W=trans_w, HAS_LOWRANK=has_lowrank, HAS_BIAS=bias is not None,
            QBLOCK=blocksize, NESTED_QBLOCK=nested_blocksize,
            INPUT_PRECISION=_input_precision(a.dtype),
        )
    return c


def nf4_lowrank_forward(
    x: torch.Tensor,
    nf4: tuple[torch.Tensor, ...],
    w_shape: tuple[int, int],
    t: Optional[torch.Tensor] = None,
    U: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    blocksize: int = 64,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """``y = x·deq(W)ᵀ + t·Uᵀ + bias`` for 2-D ``x`` (M×n), W m×n in NF4; y in ``x.dtype``.

    ``nf4`` is ``(packed, absmax, nested_absmax, nested_code, offset, code)`` in the
    bitsandbytes layout (``NF4Weight.tensors()``).  Without ``t``/``U`` only the
    residual product is computed.

    Example::

        >>> y = nf4_lowrank_forward(x, q.tensors(), q.shape, t, U, bias)
    """
    return _launch(x, nf4, tuple(w_shape), blocksize, nested_blocksize, False, t, U, bias)


def nf4_lowrank_dx(
    dy: torch.Tensor,
    nf4: tuple[torch.Tensor, ...],
    w_shape: tuple[int, int],
    s: Optional[torch.Tensor] = None,
    V: Optional[torch.Tensor] = None,
    *,
    blocksize: int = 64,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """``dx = dy·deq(W) + s·Vᵀ`` for 2-D ``dy`` (M×m), W m×n in NF4; dx in ``dy.dtype``.

    Example::

        >>> dx = nf4_lowrank_dx(dy, q.tensors(), q.shape, s, V)
    """
    return _launch(dy, nf4, tuple(w_shape), blocksize, nested_blocksize, True, s, V, None)
