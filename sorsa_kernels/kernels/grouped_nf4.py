"""Grouped QSORSA GEMM: every expert's NF4 residual, dequantized inside the K loop, one launch.

The experts of a QSORSA MoE layer store each residual ``Wr_e`` (m×n) in NF4 on its own (the
bitsandbytes layout, row e of the stacked storage: packed bytes, 8-bit absmax codes, nested
absmax, offset; code tables shared).  Per expert e with grouped rows (the tile table of
:mod:`sorsa_kernels.kernels.grouped_sorsa`, built on the device from ``counts``: no host
sync, no per-expert launch, an expert with no rows has no tile)::

    y_e  = [a_e | u_e·σ_e]·[deq(Wr_e) | U_e]ᵀ (+ w·b_e)      forward          (TRANS_W False)
    da_e = [g_e | s_e·σ_e]·[deq(Wr_e) ; V_eᵀ]                 input gradient   (TRANS_W True)

Each program dequantizes only the BLOCK_K × BLOCK_N tile of its own expert's residual that
its K step needs, in registers (unpack the nibble, look up the NF4 level, decode the 64-block's
absmax through the nested code and scale, add the expert's offset): no dequantized copy of a
residual — not a tile of it — is written to memory.  A bitsandbytes 64-block can straddle a
row end, so every element computes its own flat index ``row·n + col`` (int64), as
:mod:`sorsa_kernels.kernels.nf4_gemm` does for one matrix.  Row gather (``a_idx``), routing
weight (``row_w``) and output permutation (``c_idx``) are those of the grouped SORSA GEMM.

The r-wide products (``u = a·V``, ``s = g·U``) and the adapter gradients are the grouped SORSA
kernels' (no residual there).  The math is :func:`sorsa_kernels.ops.reference.experts_forward`
/ ``experts_backward`` on the dequantized residual.
"""
from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl
from torch import Tensor

from . import grouped_nf4_configs as configs
from ._launch import input_precision
from .grouped_sorsa import RowMap, epilogue, grouped_lowrank_segment, grouped_store_rows, grouped_tile
from .grouped_sorsa_configs import ROW_BLOCK
from .nf4_gemm import nf4_dequant_tile

__all__ = ["NF4Experts", "launch_grouped_nf4_gemm"]


@triton.autotune(configs=configs.gemm_configs(), key=["N", "K1", "K2", "TRANS_W", "HAS_SCALE", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": configs.prune_configs})
@triton.jit
def _grouped_nf4_lowrank_gemm_kernel(
    tiles_ptr, a1_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
    a2_ptr, b2_ptr, scale_ptr, bias_ptr, c_ptr, a_idx_ptr, row_w_ptr, c_idx_ptr,
    N, K1, K2, W_COLS,
    stride_a1m, stride_a1k, stride_pe, stride_ae, stride_ne,
    stride_a2m, stride_a2k, stride_b2e, stride_b2k, stride_b2n,
    stride_se, stride_sk, stride_biase, stride_biasn, stride_cm, stride_cn,
    TRANS_W: tl.constexpr,          # False: B1[k, j] = Wr_e[j, k] (forward); True: B1[k, j] = Wr_e[k, j] (input grad)
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_A_IDX: tl.constexpr,
    HAS_ROW_W: tl.constexpr,
    HAS_C_IDX: tl.constexpr,
    QBLOCK: tl.constexpr,
    NESTED_QBLOCK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows [row0, row1) of expert e:
    ``C[c_idx] = (w·A1[a_idx])·deq(Wr_e)^(T) + (A2·diag(σ_e))·B2_e (+ w·b_e)``."""
    e, rm, rn, rk, offs_k, mask_m, mask_n = grouped_tile(tiles_ptr, N, BLOCK_M, BLOCK_N, BLOCK_K)
    if e < 0:  # past the last real tile (the grid is an upper bound)
        return
    e64 = e.to(tl.int64)
    cdt = a1_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w = rm  # a placeholder: the routing weights are read only with HAS_ROW_W
    if HAS_ROW_W:
        w = tl.load(row_w_ptr + rm, mask=mask_m, other=0.0).to(tl.float32)
    if HAS_A_IDX:
        ra = tl.load(a_idx_ptr + rm, mask=mask_m, other=0).to(tl.int64)
    else:
        ra = rm

    # this expert's row of the stacked NF4 storage
    packed_e = packed_ptr + e64 * stride_pe
    absmax_e = absmax_ptr + e64 * stride_ae
    nested_e = nested_absmax_ptr + e64 * stride_ne
    offset = tl.load(offset_ptr + e64).to(tl.float32)
    a_ptrs = a1_ptr + ra[:, None] * stride_a1m + rk[None, :] * stride_a1k
    for k in range(0, tl.cdiv(K1, BLOCK_K)):
        kk = k * BLOCK_K + rk
        mask_k = kk < K1
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_ROW_W:
            a = a.to(tl.float32) * w[:, None]
        if TRANS_W:
            flat = kk[:, None] * W_COLS + rn[None, :]
        else:
            flat = rn[None, :] * W_COLS + kk[:, None]
        b = nf4_dequant_tile(packed_e, absmax_e, nested_e, nested_code_ptr, code_ptr, offset, flat,
                             mask_k[:, None] & mask_n[None, :], QBLOCK, NESTED_QBLOCK)
        # cast like bitsandbytes does (float32 value → compute dtype), then an fp32-accumulated dot
        acc = tl.dot(a.to(cdt), b.to(cdt), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_a1k

    acc = grouped_lowrank_segment(acc, a2_ptr, b2_ptr, scale_ptr, e64, rm, rn, rk, offs_k, mask_m, mask_n, K2,
                                  stride_a2m, stride_a2k, stride_b2e, stride_b2k, stride_b2n, stride_se, stride_sk,
                                  HAS_SCALE, INPUT_PRECISION, BLOCK_K)
    grouped_store_rows(acc, c_ptr, bias_ptr, c_idx_ptr, w, e64, rm, rn, mask_m, mask_n,
                       stride_biase, stride_biasn, stride_cm, stride_cn, HAS_BIAS, HAS_ROW_W, HAS_C_IDX)


# =============================================================================== launchers
class NF4Experts(NamedTuple):
    """The stacked NF4 residuals of E experts: ``(packed E×P uint8, absmax E×B uint8,
    nested_absmax E×N float32, nested_code (256,), offset (E,) float32, code (16,))``, each
    expert's ``shape`` (m, n) and the blocksizes."""

    tensors: tuple
    shape: tuple
    blocksize: int = 64
    nested_blocksize: int = 256

    def launch(self, tiles: Tensor, a1: Tensor, trans_w: bool, a2, b2_ekn, scale, bias, out: Tensor,
               rows: RowMap = RowMap()) -> None:
        """The residual segment of a grouped GEMM (what :mod:`~.grouped_sorsa` calls for a residual
        that is not a dense stack): :func:`launch_grouped_nf4_gemm`."""
        launch_grouped_nf4_gemm(tiles, a1, self, trans_w, a2, b2_ekn, scale, bias, out, rows)


def launch_grouped_nf4_gemm(tiles: Tensor, a1: Tensor, nf4: NF4Experts, trans_w: bool, a2, b2_ekn, scale, bias,
                            out: Tensor, rows: RowMap = RowMap()) -> None:
    """``out[c_idx] = (w·a1[a_idx])·deq(Wr_e)ᵀ (deq(Wr_e) with ``trans_w``) + (a2·diag(scale_e))·B2_e
    (+ w·bias_e)`` for every expert's rows in one launch; ``B2`` given as (tensor, stride_e,
    stride_k, stride_n); ``a2`` None: the residual product alone."""
    packed, absmax, nested_absmax, nested_code, offset, code = nf4.tensors
    m, n = nf4.shape
    N = out.shape[1]
    K1 = m if trans_w else n
    if a2 is None:  # no low-rank segment: K2 = 0, placeholders never read
        a2, b2_ekn, scale, K2 = a1, (a1, 0, 0, 0), None, 0
    else:
        K2 = a2.shape[1]
    b2, s2e, s2k, s2n = b2_ekn
    ep = epilogue(tiles, scale, bias, out, rows)
    _grouped_nf4_lowrank_gemm_kernel[ep.grid](
        tiles, a1, packed, absmax, nested_absmax, nested_code, offset, code,
        a2, b2, *ep.pointers,
        N, K1, K2, n,
        a1.stride(0), a1.stride(1), packed.stride(0), absmax.stride(0), nested_absmax.stride(0),
        a2.stride(0), a2.stride(1), s2e, s2k, s2n,
        *ep.strides,
        TRANS_W=trans_w, **ep.flags,
        QBLOCK=nf4.blocksize, NESTED_QBLOCK=nf4.nested_blocksize,
        INPUT_PRECISION=input_precision(a1.dtype), BLOCK_M=ROW_BLOCK,
    )
