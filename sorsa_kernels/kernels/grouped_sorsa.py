"""Grouped SORSA GEMMs: every expert of a mixture-of-experts layer in one launch per product.

Rows of the input arrive grouped by expert (``counts[e]`` consecutive rows for expert e, as
:func:`sorsa_kernels.ops.experts.sorsa_experts` takes them).  Per expert e with rows ``x_e``::

    u_e  = x_e·V_e                                   grouped GEMM, no residual   (N = r)
    y_e  = [x_e | u_e·σ_e]·[Wr_e | U_e]ᵀ (+ b_e)     grouped fused GEMM          (σ_e = scale·S_e)
    s_e  = dy_e·U_e                                  grouped GEMM, no residual   (N = r)
    dx_e = [dy_e | s_e·σ_e]·[Wr_e ; V_eᵀ]            grouped fused GEMM
    dU_e = (dy_eᵀ·u_e)·diag(σ_e)   dV_e = (x_eᵀ·s_e)·diag(σ_e)    grouped weight-gradient kernel
    dS_e = scale·Σ_rows u_e ⊙ s_e                                 grouped row-dot kernel

``_grouped_residual_lowrank_gemm_kernel`` serves the four GEMMs: one K loop over the
frozen residual (K1) then over the low-rank factor (K2), the ``σ_e`` column scale applied
to the A2 tile on load, so the low-rank term lands in the same output tile in the same pass
(the grouped form of :mod:`sorsa_kernels.kernels.residual_gemm`).  Its programs run over a
*tile table* (expert, first row, end row) built on the device from ``counts`` without a host
synchronization: the grid is the upper bound ``cdiv(M, BLOCK_M) + E`` row tiles, programs
past the last real tile return at once, and an expert with no rows has no tile.  The weight-
gradient kernels run one program per (expert, output tile) and loop over that expert's rows;
an expert with no rows writes zeros.  Nothing of size E×m×n (or one expert's m×n) is formed.

The math is :func:`sorsa_kernels.ops.reference.experts_forward` / ``experts_backward``.

Configs and their device prunes (shared memory per block, accumulators per thread) sit
beside this file in :mod:`sorsa_kernels.kernels.grouped_sorsa_configs`; the row tile
(``ROW_BLOCK``) is fixed (not tuned) because the tile table is built with it.  No GPU was
available when this was written: measure with ``bench/`` before trusting any of the tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import grouped_sorsa_configs as configs
from ._launch import device_guard, input_precision
from .grouped_sorsa_configs import ROW_BLOCK

__all__ = ["grouped_forward", "grouped_backward", "tile_table"]

# =============================================================================== kernels
@triton.autotune(configs=configs.gemm_configs(), key=["N", "K1", "K2", "HAS_RESIDUAL", "HAS_SCALE", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": configs.prune_gemm_configs})
@triton.jit
def _grouped_residual_lowrank_gemm_kernel(
    tiles_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr, scale_ptr, bias_ptr, c_ptr,
    N, K1, K2,
    stride_a1m, stride_a1k, stride_b1e, stride_b1k, stride_b1n,
    stride_a2m, stride_a2k, stride_b2e, stride_b2k, stride_b2n,
    stride_se, stride_sk, stride_biase, stride_cm, stride_cn,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows [row0, row1) of expert e (tile table entry): ``C = A1·B1_e + (A2·diag(σ_e))·B2_e (+ b_e)``."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tiles_ptr + tile * 3)
    if e < 0:  # past the last real tile (the grid is an upper bound)
        return
    row0 = tl.load(tiles_ptr + tile * 3 + 1)
    row1 = tl.load(tiles_ptr + tile * 3 + 2)
    e64 = e.to(tl.int64)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row1
    mask_n = offs_n < N
    rm = offs_m.to(tl.int64)
    rn = offs_n.to(tl.int64)
    rk = offs_k.to(tl.int64)
    cdt = a2_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if HAS_RESIDUAL:
        a_ptrs = a1_ptr + rm[:, None] * stride_a1m + rk[None, :] * stride_a1k
        b_ptrs = b1_ptr + e64 * stride_b1e + rk[:, None] * stride_b1k + rn[None, :] * stride_b1n
        for k in range(0, tl.cdiv(K1, BLOCK_K)):
            k_left = K1 - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            acc = tl.dot(a.to(cdt), b.to(cdt), acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_a1k
            b_ptrs += BLOCK_K * stride_b1k

    a_ptrs = a2_ptr + rm[:, None] * stride_a2m + rk[None, :] * stride_a2k
    b_ptrs = b2_ptr + e64 * stride_b2e + rk[:, None] * stride_b2k + rn[None, :] * stride_b2n
    for k in range(0, tl.cdiv(K2, BLOCK_K)):
        k_left = K2 - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        if HAS_SCALE:  # σ_e on the low-rank columns, in fp32, then back to the compute dtype
            sk = k * BLOCK_K + rk
            sig = tl.load(scale_ptr + e64 * stride_se + sk * stride_sk, mask=offs_k < k_left, other=0.0)
            a = (a.to(tl.float32) * sig[None, :]).to(cdt)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b.to(cdt), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_a2k
        b_ptrs += BLOCK_K * stride_b2k

    if HAS_BIAS:
        bias = tl.load(bias_ptr + e64 * stride_biase + rn, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=configs.weight_grad_configs(), key=["K", "R"],
                 prune_configs_by={"early_config_prune": configs.prune_weight_grad_configs})
@triton.jit
def _grouped_weight_grad_kernel(
    ranges_ptr, a_ptr, b_ptr, scale_ptr, out_ptr,
    K, R,
    stride_am, stride_ak, stride_bm, stride_br, stride_se, stride_sr,
    stride_oe, stride_ok, stride_or,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Expert e, K tile: ``out_e = (A[rows_e]ᵀ·B[rows_e])·diag(σ_e)`` (K×R), fp32 accumulation."""
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    row0 = tl.load(ranges_ptr + e * 2)
    row1 = tl.load(ranges_ptr + e * 2 + 1)
    e64 = e.to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    mask_r = offs_r < R
    rk = offs_k.to(tl.int64)
    rr = offs_r.to(tl.int64)
    cdt = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for start in range(row0, row1, BLOCK_M):
        rows = start + offs_m
        mask_m = rows < row1
        rm = rows.to(tl.int64)
        a = tl.load(a_ptr + rm[None, :] * stride_am + rk[:, None] * stride_ak,
                    mask=mask_k[:, None] & mask_m[None, :], other=0.0)  # BLOCK_K × BLOCK_M (Aᵀ)
        b = tl.load(b_ptr + rm[:, None] * stride_bm + rr[None, :] * stride_br,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(a, b.to(cdt), acc, input_precision=INPUT_PRECISION)
    sig = tl.load(scale_ptr + e64 * stride_se + rr * stride_sr, mask=mask_r, other=0.0)
    acc = acc * sig[None, :]
    o_ptrs = out_ptr + e64 * stride_oe + rk[:, None] * stride_ok + rr[None, :] * stride_or
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_r[None, :])


@triton.jit
def _grouped_rowdot_kernel(
    ranges_ptr, u_ptr, s_ptr, out_ptr, R, scale,
    stride_um, stride_ur, stride_sm, stride_sr, stride_oe,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Expert e: ``out_e = scale·Σ_{rows_e} u ⊙ s`` (R), fp32 accumulation."""
    e = tl.program_id(0)
    row0 = tl.load(ranges_ptr + e * 2)
    row1 = tl.load(ranges_ptr + e * 2 + 1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    mask_r = offs_r < R
    rr = offs_r.to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(row0, row1, BLOCK_M):
        rows = start + offs_m
        mask = (rows < row1)[:, None] & mask_r[None, :]
        rm = rows.to(tl.int64)
        u = tl.load(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur, mask=mask, other=0.0)
        s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr, mask=mask, other=0.0)
        acc += tl.sum(u.to(tl.float32) * s.to(tl.float32), axis=0)
    acc = acc * scale
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + rr, acc.to(out_ptr.dtype.element_ty), mask=mask_r)


# =============================================================================== launchers
def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _ranges(counts: Tensor) -> Tensor:
    """(E, 2) int32 first and end row of each expert's group."""
    ends = counts.to(torch.int64).cumsum(0)
    return torch.stack([ends - counts, ends], 1).to(torch.int32).contiguous()


def tile_table(counts: Tensor, M: int, block_m: int = ROW_BLOCK) -> Tensor:
    """(T, 3) int32 ``(expert, first row, end row)`` of every row tile, T = ``cdiv(M, block_m) + E``.

    Built on ``counts``' device without synchronizing; entries past the last real tile have
    expert −1.  An expert with ``c`` rows owns ``cdiv(c, block_m)`` consecutive tiles.
    """
    counts = counts.to(torch.int64)
    E = counts.numel()
    ends = counts.cumsum(0)
    starts = ends - counts
    tiles = (counts + block_m - 1) // block_m
    cum = tiles.cumsum(0)
    t = torch.arange(triton.cdiv(M, block_m) + E, device=counts.device)
    e = torch.searchsorted(cum, t, right=True)
    ec = e.clamp(max=E - 1)
    row0 = starts[ec] + (t - (cum[ec] - tiles[ec])) * block_m
    e = torch.where(e < E, e, torch.full_like(e, -1))
    return torch.stack([e, row0, ends[ec]], 1).to(torch.int32).contiguous()


def _launch_gemm(tiles: Tensor, a1, b1_ekn, a2: Tensor, b2_ekn, scale, bias, out: Tensor) -> None:
    """``out[rows_e] = a1·B1_e + (a2·diag(scale_e))·B2_e (+ bias_e)``; each B given as
    (tensor, stride_e, stride_k, stride_n)."""
    N = out.shape[1]
    has_res = a1 is not None
    b2, s2e, s2k, s2n = b2_ekn
    if has_res:
        b1, s1e, s1k, s1n = b1_ekn
        K1 = a1.shape[1]
    else:  # placeholders, never read (HAS_RESIDUAL is a constexpr)
        a1, b1, s1e, s1k, s1n, K1 = a2, b2, 0, 0, 0, 0
    sc = scale if scale is not None else out
    bi = bias if bias is not None else out

    def grid(meta):
        return (tiles.shape[0], triton.cdiv(N, meta["BLOCK_N"]))

    _grouped_residual_lowrank_gemm_kernel[grid](
        tiles, a1, b1, a2, b2, sc, bi, out,
        N, K1, a2.shape[1],
        a1.stride(0), a1.stride(1), s1e, s1k, s1n,
        a2.stride(0), a2.stride(1), s2e, s2k, s2n,
        sc.stride(0) if scale is not None else 0, sc.stride(1) if scale is not None else 0,
        bi.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
        HAS_RESIDUAL=has_res, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        INPUT_PRECISION=input_precision(a2.dtype), BLOCK_M=ROW_BLOCK,
    )


def _launch_weight_grad(ranges: Tensor, a: Tensor, b: Tensor, sigma: Tensor, dtype: torch.dtype) -> Tensor:
    """``(A_eᵀ·B_e)·diag(σ_e)`` for every expert: E×K×r in ``dtype``."""
    E = ranges.shape[0]
    K, r = a.shape[1], b.shape[1]
    out = torch.empty((E, K, r), dtype=dtype, device=a.device)

    def grid(meta):
        return (E, triton.cdiv(K, meta["BLOCK_K"]))

    _grouped_weight_grad_kernel[grid](
        ranges, a, b, sigma, out, K, r,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), sigma.stride(0), sigma.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        INPUT_PRECISION=input_precision(a.dtype), BLOCK_M=ROW_BLOCK, BLOCK_R=_block_r(r),
    )
    return out


def _sigma(S: Tensor, scale: float) -> Tensor:
    """``scale·S`` (E×r) in float32: the column scale the kernels load."""
    return (S.float() * scale).contiguous()


def _check(x: Tensor, residual, U: Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the grouped SORSA kernels compute in float16, bfloat16 or float32, got {x.dtype}")
    for label, t in (("residual", residual), ("U", U)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{label} is on {t.device} but the input is on {x.device}")


def grouped_forward(x: Tensor, counts: Tensor, residual, U: Tensor, S: Tensor, V: Tensor, bias,
                    scale: float) -> tuple[Tensor, Tensor]:
    """``(y, u)`` of :func:`sorsa_kernels.ops.reference.experts_forward`: two grouped launches."""
    _check(x, residual, U)
    x = x.contiguous()
    M = x.shape[0]
    E, m, r = U.shape
    tiles = tile_table(counts, M)
    u = torch.empty((M, r), dtype=x.dtype, device=x.device)
    y = torch.empty((M, m), dtype=x.dtype, device=x.device)
    with device_guard(x):
        if M:
            _launch_gemm(tiles, None, None, x, (V, V.stride(0), V.stride(1), V.stride(2)), None, None, u)
            res = None if residual is None else (residual, residual.stride(0), residual.stride(2), residual.stride(1))
            _launch_gemm(tiles, None if residual is None else x, res, u,
                         (U, U.stride(0), U.stride(2), U.stride(1)), _sigma(S, scale), bias, y)
    return y, u


def grouped_backward(dy: Tensor, x: Tensor, u: Tensor, counts: Tensor, residual, U: Tensor, S: Tensor,
                     V: Tensor, scale: float, needs_dx: bool = True):
    """``(dx, dU, dS, dV)`` of :func:`sorsa_kernels.ops.reference.experts_backward`: five grouped launches."""
    _check(dy, residual, U)
    dy, x = dy.contiguous(), x.contiguous()
    M = dy.shape[0]
    E, m, r = U.shape
    sigma = _sigma(S, scale)
    tiles = tile_table(counts, M)
    ranges = _ranges(counts)
    s = torch.empty((M, r), dtype=dy.dtype, device=dy.device)
    dx = torch.empty_like(x) if needs_dx else None
    dS = torch.empty((E, r), dtype=S.dtype, device=S.device)
    with device_guard(dy):
        if M:
            _launch_gemm(tiles, None, None, dy, (U, U.stride(0), U.stride(1), U.stride(2)), None, None, s)
            if needs_dx:
                res = None if residual is None else (residual, residual.stride(0), residual.stride(1),
                                                     residual.stride(2))
                _launch_gemm(tiles, None if residual is None else dy, res, s,
                             (V, V.stride(0), V.stride(2), V.stride(1)), sigma, None, dx)
        dU = _launch_weight_grad(ranges, dy, u, sigma, U.dtype)
        dV = _launch_weight_grad(ranges, x, s, sigma, V.dtype)
        _grouped_rowdot_kernel[(E,)](
            ranges, u, s, dS, r, float(scale),
            u.stride(0), u.stride(1), s.stride(0), s.stride(1), dS.stride(0),
            BLOCK_M=ROW_BLOCK, BLOCK_R=_block_r(r),
        )
    return dx, dU, dS, dV
