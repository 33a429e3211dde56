"""Grouped SORSA GEMMs: every expert of a mixture-of-experts layer in one launch per product.

Rows arrive grouped by expert (``counts[e]`` consecutive *grouped rows* for expert e, as
:func:`sorsa_kernels.ops.experts.sorsa_experts` takes them).  Per expert e with rows ``a_e``
(``a_i = w_i·x[src_i]``: the row gather and the routing weight of a routed layer are applied
to the A tile as it is loaded; plain grouped rows have ``src_i = i``, ``w_i = 1``)::

    u_e  = a_e·V_e                                   grouped GEMM, one segment       (N = r)
    y_e  = [a_e | u_e·σ_e]·[Wr_e | U_e]ᵀ (+ w·b_e)   grouped fused GEMM              (σ_e = scale·S_e)
    s_e  = g_e·U_e                                   grouped GEMM, one segment       (g_i = dy[dst_i])
    da_e = [g_e | s_e·σ_e]·[Wr_e ; V_eᵀ]             grouped fused GEMM
    dU_e = (g_eᵀ·u_e)·diag(σ_e)   dV_e = (a_eᵀ·s_e)·diag(σ_e)    grouped weight-gradient kernel
    dS_e = scale·Σ_rows u_e ⊙ s_e                                grouped row-dot kernel

``_grouped_residual_lowrank_gemm_kernel`` serves the four GEMMs: one K loop over the first
segment (K1: the frozen residual, or V / U for the r-wide products) then over the low-rank
factor (K2), the ``σ_e`` column scale applied to the A2 tile on load, so the low-rank term
lands in the same output tile in the same pass (the grouped form of
:mod:`sorsa_kernels.kernels.residual_gemm`).  The A1 rows may be gathered through an index
(permute-x: a routed layer reads token rows, never a gathered copy), scaled by a per-row
weight on load (the routing multiply: ``w·(x·Wᵀ) = (w·x)·Wᵀ``), and the output rows may be
written through an index (permute-y: each row lands in its (token, choice) slot).  Its
programs run over a *tile table* (expert, first row, end row) built on the device from
``counts`` without a host synchronization: the grid is the upper bound ``cdiv(M, BLOCK_M) +
E`` row tiles, programs past the last real tile return at once, and an expert with no rows
has no tile.  The weight-gradient kernel runs one program per (expert, K tile, r tile) and
loops over that expert's rows; an expert with no rows writes zeros.  Nothing of size E×m×n
(or one expert's m×n) is formed.

The math is :func:`sorsa_kernels.ops.reference.experts_forward` / ``experts_backward``.

Configs and their device prunes (shared memory per block, accumulators per thread) sit
beside this file in :mod:`sorsa_kernels.kernels.grouped_sorsa_configs`; the row tile
(``ROW_BLOCK``) is fixed (not tuned) because the tile table is built with it.  No GPU was
available when this was written: measure with ``bench/`` before trusting any of the tiles.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import grouped_sorsa_configs as configs
from ._launch import device_guard, input_precision
from .grouped_sorsa_configs import MAX_BLOCK_R, ROW_BLOCK

__all__ = ["grouped_forward", "grouped_backward", "tile_table", "expert_ranges", "RowMap", "Epilogue", "epilogue",
           "launch_grouped_gemm", "launch_weight_grad", "launch_rowdot", "block_r",
           "grouped_tile", "grouped_lowrank_segment", "grouped_store_rows"]


# =============================================================================== kernels
@triton.jit
def grouped_tile(tiles_ptr, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's tile of a grouped GEMM: ``(e, rm, rn, rk, offs_k, mask_m, mask_n)`` — the
    expert of its tile-table entry (−1 past the last real tile), its rows [row0, row1) and
    output columns (int64 offsets and masks) and the K offsets of one block."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tiles_ptr + tile * 3)
    row0 = tl.load(tiles_ptr + tile * 3 + 1)
    row1 = tl.load(tiles_ptr + tile * 3 + 2)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row1
    mask_n = offs_n < N
    return e, offs_m.to(tl.int64), offs_n.to(tl.int64), offs_k.to(tl.int64), offs_k, mask_m, mask_n


@triton.jit
def grouped_lowrank_segment(acc, a2_ptr, b2_ptr, scale_ptr, e64, rm, rn, rk, offs_k, mask_m, mask_n, K2,
                            stride_a2m, stride_a2k, stride_b2e, stride_b2k, stride_b2n, stride_se, stride_sk,
                            HAS_SCALE: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + (A2·diag(σ_e))·B2_e`` over expert e's rows: the low-rank segment of both grouped
    GEMM kernels (this file's and :mod:`~.grouped_nf4`'s), σ_e applied to the A2 tile on load."""
    cdt = a2_ptr.dtype.element_ty
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
        acc = tl.dot(a.to(cdt), b.to(cdt), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_a2k
        b_ptrs += BLOCK_K * stride_b2k
    return acc


@triton.jit
def grouped_store_rows(acc, c_ptr, bias_ptr, c_idx_ptr, w, e64, rm, rn, mask_m, mask_n,
                       stride_biase, stride_biasn, stride_cm, stride_cn,
                       HAS_BIAS: tl.constexpr, HAS_ROW_W: tl.constexpr, HAS_C_IDX: tl.constexpr):
    """``C[c_idx] = acc (+ w·b_e)``: the bias (times each row's routing weight ``w``, read only
    with ``HAS_ROW_W``) and the permute-y store of both grouped GEMM kernels."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e64 * stride_biase + rn * stride_biasn, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ROW_W:
            acc += w[:, None] * bias[None, :]
        else:
            acc += bias[None, :]
    if HAS_C_IDX:  # permute-y: row i lands in row c_idx[i] of C
        rc = tl.load(c_idx_ptr + rm, mask=mask_m, other=0).to(tl.int64)
    else:
        rc = rm
    c_ptrs = c_ptr + rc[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=configs.gemm_configs(), key=["N", "K1", "K2", "HAS_RESIDUAL", "HAS_SCALE", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": configs.prune_gemm_configs})
@triton.jit
def _grouped_residual_lowrank_gemm_kernel(
    tiles_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr, scale_ptr, bias_ptr, c_ptr, a_idx_ptr, row_w_ptr, c_idx_ptr,
    N, K1, K2,
    stride_a1m, stride_a1k, stride_b1e, stride_b1k, stride_b1n,
    stride_a2m, stride_a2k, stride_b2e, stride_b2k, stride_b2n,
    stride_se, stride_sk, stride_biase, stride_biasn, stride_cm, stride_cn,
    HAS_RESIDUAL: tl.constexpr,    # the first segment A1·B1 (the residual, or the factor of an r-wide product)
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_A_IDX: tl.constexpr,
    HAS_ROW_W: tl.constexpr,
    HAS_C_IDX: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows [row0, row1) of expert e (tile table entry):
    ``C[c_idx] = (w·A1[a_idx])·B1_e + (A2·diag(σ_e))·B2_e (+ w·b_e)``."""
    e, rm, rn, rk, offs_k, mask_m, mask_n = grouped_tile(tiles_ptr, N, BLOCK_M, BLOCK_N, BLOCK_K)
    if e < 0:  # past the last real tile (the grid is an upper bound)
        return
    e64 = e.to(tl.int64)
    cdt = a2_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w = rm  # a placeholder: the routing weights are read only with HAS_ROW_W
    if HAS_ROW_W:  # the routing weight of each row, fp32
        w = tl.load(row_w_ptr + rm, mask=mask_m, other=0.0).to(tl.float32)

    if HAS_RESIDUAL:
        if HAS_A_IDX:  # permute-x: row i of A1 is A1[a_idx[i]]
            ra = tl.load(a_idx_ptr + rm, mask=mask_m, other=0).to(tl.int64)
        else:
            ra = rm
        a_ptrs = a1_ptr + ra[:, None] * stride_a1m + rk[None, :] * stride_a1k
        b_ptrs = b1_ptr + e64 * stride_b1e + rk[:, None] * stride_b1k + rn[None, :] * stride_b1n
        for k in range(0, tl.cdiv(K1, BLOCK_K)):
            k_left = K1 - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            if HAS_ROW_W:  # the routing multiply on load, rounded as the reference's w·x
                a = a.to(tl.float32) * w[:, None]
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            acc = tl.dot(a.to(cdt), b.to(cdt), acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_a1k
            b_ptrs += BLOCK_K * stride_b1k

    acc = grouped_lowrank_segment(acc, a2_ptr, b2_ptr, scale_ptr, e64, rm, rn, rk, offs_k, mask_m, mask_n, K2,
                                  stride_a2m, stride_a2k, stride_b2e, stride_b2k, stride_b2n, stride_se, stride_sk,
                                  HAS_SCALE, INPUT_PRECISION, BLOCK_K)
    grouped_store_rows(acc, c_ptr, bias_ptr, c_idx_ptr, w, e64, rm, rn, mask_m, mask_n,
                       stride_biase, stride_biasn, stride_cm, stride_cn, HAS_BIAS, HAS_ROW_W, HAS_C_IDX)


@triton.autotune(configs=configs.weight_grad_configs(), key=["K", "R", "HAS_A_IDX", "HAS_ROW_W"],
                 prune_configs_by={"early_config_prune": configs.prune_weight_grad_configs})
@triton.jit
def _grouped_weight_grad_kernel(
    ranges_ptr, a_ptr, b_ptr, scale_ptr, out_ptr, a_idx_ptr, row_w_ptr,
    K, R,
    stride_am, stride_ak, stride_bm, stride_br, stride_se, stride_sr,
    stride_oe, stride_ok, stride_or,
    HAS_A_IDX: tl.constexpr,
    HAS_ROW_W: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Expert e, K tile, r tile: ``out_e = ((w·A[a_idx])[rows_e]ᵀ·B[rows_e])·diag(σ_e)`` (K×R), fp32
    accumulation.  r is split over the grid's third axis in tiles of at most
    :data:`~.grouped_sorsa_configs.MAX_BLOCK_R` (as the dense weight-gradient kernel splits it)."""
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_r = tl.program_id(2)
    row0 = tl.load(ranges_ptr + e * 2)
    row1 = tl.load(ranges_ptr + e * 2 + 1)
    e64 = e.to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
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
        if HAS_A_IDX:
            ra = tl.load(a_idx_ptr + rm, mask=mask_m, other=0).to(tl.int64)
        else:
            ra = rm
        a = tl.load(a_ptr + ra[None, :] * stride_am + rk[:, None] * stride_ak,
                    mask=mask_k[:, None] & mask_m[None, :], other=0.0)  # BLOCK_K × BLOCK_M (Aᵀ)
        if HAS_ROW_W:
            w = tl.load(row_w_ptr + rm, mask=mask_m, other=0.0).to(tl.float32)
            a = a.to(tl.float32) * w[None, :]
        b = tl.load(b_ptr + rm[:, None] * stride_bm + rr[None, :] * stride_br,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(a.to(cdt), b.to(cdt), acc, input_precision=INPUT_PRECISION)
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
class RowMap(NamedTuple):
    """How grouped row i meets memory (each entry None: the identity / no weight).

    ``a_idx`` (M,): the row of the A1 operand it reads (permute-x); ``row_w`` (M,) fp32: the
    weight its A1 row is multiplied by on load (the routing multiply); ``c_idx`` (M,): the
    output row it is written to (permute-y, a permutation of the M rows)."""

    a_idx: Optional[Tensor] = None
    row_w: Optional[Tensor] = None
    c_idx: Optional[Tensor] = None


class Epilogue(NamedTuple):
    """What every grouped GEMM launch passes after its operands: the pointers of the scale, bias,
    output and row map (an absent one replaced by a placeholder its constexpr flag never reads),
    their strides, the flags, and the launch grid (one program per row tile × N tile)."""

    pointers: tuple
    strides: tuple
    flags: dict
    grid: object


def epilogue(tiles: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], out: Tensor, rows: RowMap,
             gather: bool = True) -> Epilogue:
    """The :class:`Epilogue` of a grouped launch (``gather`` False: ``rows.a_idx`` is not read)."""
    a_idx, row_w, c_idx = rows
    sc = scale if scale is not None else out
    bi = bias if bias is not None else out
    N = out.shape[1]
    return Epilogue(
        (sc, bi, out, a_idx if a_idx is not None else tiles, row_w if row_w is not None else out,
         c_idx if c_idx is not None else tiles),
        (sc.stride(0) if scale is not None else 0, sc.stride(1) if scale is not None else 0,
         bi.stride(0) if bias is not None else 0, bi.stride(1) if bias is not None else 0,
         out.stride(0), out.stride(1)),
        dict(HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, HAS_A_IDX=gather and a_idx is not None,
             HAS_ROW_W=row_w is not None, HAS_C_IDX=c_idx is not None),
        lambda meta: (tiles.shape[0], triton.cdiv(N, meta["BLOCK_N"])))


def block_r(r: int) -> int:
    """The r tile of the weight-gradient kernel: ``next_pow2(r)`` capped at :data:`MAX_BLOCK_R`."""
    return min(max(16, triton.next_power_of_2(r)), MAX_BLOCK_R)


def expert_ranges(counts: Tensor) -> Tensor:
    """(E, 2) int32 first and end row of each expert's group (on ``counts``' device, no sync)."""
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


def launch_grouped_gemm(tiles: Tensor, a1, b1_ekn, a2, b2_ekn, scale, bias, out: Tensor,
                        rows: RowMap = RowMap()) -> None:
    """``out[c_idx] = (w·a1[a_idx])·B1_e + (a2·diag(scale_e))·B2_e (+ w·bias_e)``; each B given as
    (tensor, stride_e, stride_k, stride_n); ``a1`` or ``a2`` may be None (that segment is skipped)."""
    N = out.shape[1]
    has_res = a1 is not None
    if a2 is None:  # one segment: K2 = 0, the placeholders are never read
        a2, b2_ekn, scale = a1, b1_ekn, None
        K2 = 0
    else:
        K2 = a2.shape[1]
    b2, s2e, s2k, s2n = b2_ekn
    if has_res:
        b1, s1e, s1k, s1n = b1_ekn
        K1 = a1.shape[1]
    else:  # placeholders, never read (HAS_RESIDUAL is a constexpr)
        a1, b1, s1e, s1k, s1n, K1 = a2, b2, 0, 0, 0, 0
    ep = epilogue(tiles, scale, bias, out, rows, gather=has_res)
    _grouped_residual_lowrank_gemm_kernel[ep.grid](
        tiles, a1, b1, a2, b2, *ep.pointers,
        N, K1, K2,
        a1.stride(0), a1.stride(1), s1e, s1k, s1n,
        a2.stride(0), a2.stride(1), s2e, s2k, s2n,
        *ep.strides,
        HAS_RESIDUAL=has_res, **ep.flags,
        INPUT_PRECISION=input_precision(a2.dtype), BLOCK_M=ROW_BLOCK,
    )


def launch_weight_grad(ranges: Tensor, a: Tensor, b: Tensor, sigma: Tensor, dtype: torch.dtype,
                       a_idx: Optional[Tensor] = None, row_w: Optional[Tensor] = None) -> Tensor:
    """``((w·A[a_idx])_eᵀ·B_e)·diag(σ_e)`` for every expert: E×K×r in ``dtype``."""
    E = ranges.shape[0]
    K, r = a.shape[1], b.shape[1]
    out = torch.empty((E, K, r), dtype=dtype, device=a.device)
    br = block_r(r)

    def grid(meta):
        return (E, triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(r, br))

    _grouped_weight_grad_kernel[grid](
        ranges, a, b, sigma, out, a_idx if a_idx is not None else ranges, row_w if row_w is not None else sigma,
        K, r,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), sigma.stride(0), sigma.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        HAS_A_IDX=a_idx is not None, HAS_ROW_W=row_w is not None,
        INPUT_PRECISION=input_precision(a.dtype), BLOCK_M=ROW_BLOCK, BLOCK_R=br,
    )
    return out


def launch_rowdot(ranges: Tensor, u: Tensor, s: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """``scale·Σ_{rows_e} u ⊙ s`` per expert: E×r in ``dtype``."""
    E, r = ranges.shape[0], u.shape[1]
    out = torch.empty((E, r), dtype=dtype, device=u.device)
    _grouped_rowdot_kernel[(E,)](
        ranges, u, s, out, r, float(scale),
        u.stride(0), u.stride(1), s.stride(0), s.stride(1), out.stride(0),
        BLOCK_M=ROW_BLOCK, BLOCK_R=max(16, triton.next_power_of_2(r)),
    )
    return out


def sigma(S: Tensor, scale: float) -> Tensor:
    """``scale·S`` (E×r) in float32: the column scale the kernels load."""
    return (S.float() * scale).contiguous()


def check_inputs(x: Tensor, residual, U: Tensor) -> None:
    """A TypeError / ValueError for a dtype the kernels do not compute in or a device mismatch."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the grouped SORSA kernels compute in float16, bfloat16 or float32, got {x.dtype}")
    for label, t in (("residual", residual), ("U", U)):
        if isinstance(t, Tensor) and t.device != x.device:
            raise ValueError(f"{label} is on {t.device} but the input is on {x.device}")


def grouped_forward(x: Tensor, counts: Tensor, residual, U: Tensor, S: Tensor, V: Tensor, bias,
                    scale: float, rows: RowMap = RowMap(), M: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """``(y, u)`` of :func:`sorsa_kernels.ops.reference.experts_forward`: two grouped launches.

    ``residual``: None, a dense E×m×n stack, or a stored stack that launches its own fused GEMM
    (:class:`sorsa_kernels.kernels.grouped_nf4.NF4Experts`).
    ``rows`` (:class:`RowMap`) gathers and weights the rows of ``x`` and places the rows of
    ``y``; ``M`` is the number of grouped rows (default ``x.shape[0]``); ``u`` is M×r in
    grouped order, ``y`` M×m (row i at ``c_idx[i]``)."""
    check_inputs(x, residual, U)
    M = x.shape[0] if M is None else M
    E, m, r = U.shape
    tiles = tile_table(counts, M)
    u = torch.empty((M, r), dtype=x.dtype, device=x.device)
    y = torch.empty((M, m), dtype=x.dtype, device=x.device)
    gather = RowMap(rows.a_idx, rows.row_w, None)
    with device_guard(x):
        if M:
            launch_grouped_gemm(tiles, x, (V, V.stride(0), V.stride(1), V.stride(2)), None, None, None, None, u,
                                gather)
            lowrank = (u, (U, U.stride(0), U.stride(2), U.stride(1)), sigma(S, scale), bias, y, rows)
            if residual is None or isinstance(residual, Tensor):
                res = None if residual is None else (residual, residual.stride(0), residual.stride(2),
                                                     residual.stride(1))
                launch_grouped_gemm(tiles, None if residual is None else x, res, *lowrank)
            else:  # a stored residual (NF4: kernels/grouped_nf4.py) launches its own fused GEMM
                residual.launch(tiles, x, False, *lowrank)
    return y, u


def grouped_backward(dy: Tensor, x: Tensor, u: Tensor, counts: Tensor, residual, U: Tensor, S: Tensor,
                     V: Tensor, scale: float, needs_dx: bool = True, dy_idx: Optional[Tensor] = None,
                     x_rows: RowMap = RowMap()):
    """``(da, dU, dS, dV)`` of :func:`sorsa_kernels.ops.reference.experts_backward`: five grouped launches.

    Grouped row i reads ``dy[dy_idx[i]]`` and the input row ``x_rows.row_w[i]·x[x_rows.a_idx[i]]``;
    ``da`` (the gradient of that weighted input row) is written to row ``x_rows.c_idx[i]``."""
    check_inputs(dy, residual, U)
    M = u.shape[0]
    E, m, r = U.shape
    sig = sigma(S, scale)
    tiles = tile_table(counts, M)
    ranges = expert_ranges(counts)
    s = torch.empty((M, r), dtype=dy.dtype, device=dy.device)
    dx = torch.empty((M, x.shape[1]), dtype=x.dtype, device=x.device) if needs_dx else None
    g = RowMap(dy_idx, None, None)
    with device_guard(dy):
        if M:
            launch_grouped_gemm(tiles, dy, (U, U.stride(0), U.stride(1), U.stride(2)), None, None, None, None, s, g)
            lowrank = (s, (V, V.stride(0), V.stride(2), V.stride(1)), sig, None, dx,
                       RowMap(dy_idx, None, x_rows.c_idx))
            if needs_dx and (residual is None or isinstance(residual, Tensor)):
                res = None if residual is None else (residual, residual.stride(0), residual.stride(1),
                                                     residual.stride(2))
                launch_grouped_gemm(tiles, None if residual is None else dy, res, *lowrank)
            elif needs_dx:
                residual.launch(tiles, dy, True, *lowrank)
        dU = launch_weight_grad(ranges, dy, u, sig, U.dtype, dy_idx)
        dV = launch_weight_grad(ranges, x, s, sig, V.dtype, x_rows.a_idx, x_rows.row_w)
        dS = launch_rowdot(ranges, u, s, scale, S.dtype)
    return dx, dU, dS, dV
