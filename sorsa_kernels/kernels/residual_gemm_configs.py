"""Tile configs and prunes of the fused residual + low-rank GEMM (kernels/residual_gemm.py).

Untuned starting points (Triton matmul tutorial tiles, ``GROUP_M = 8`` L2 swizzle; NVIDIA's
Hopper/Ampere guidance), pruned per launch by what compiled without spills
(tools/compile_facts.py) and by the device's shared memory per block
(:func:`~._launch.device_target`); to be measured with ``bench/``.  The same list serves
every GPU family: on sm_80/86/89 (mma.sync) Triton keeps ``num_stages − 1`` operand buffers,
so the 128×256×64 and 128×128×64 tiles fit 99 KB there (96 KB), and the prune drops what
does not fit (sm_75's 64 KB).
"""
from __future__ import annotations

import triton

from ._launch import INTERPRET, acc_per_thread, device_target, fit_smem, wgmma_rows

__all__ = ["SMALL_TILE_MAX_M", "gemm_configs", "prune_gemm_configs", "tma_gemm_configs",
           "prune_tma_gemm_configs"]


# Row counts from which narrow (mma.sync-sized) row tiles are pruned from the GEMM configs:
# at M ≥ 1024 a 64/128-row tile already fills the GPU and only it can use wgmma on Hopper.
SMALL_TILE_MAX_M = 1024


def gemm_configs(interpret: bool = INTERPRET) -> list:
    if interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})]
    cfg = triton.Config
    return [
        # Hopper (H100, 228 KB smem): large tiles, 64-deep K, 3-4 stages.  Untuned starting points.
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        # Ampere (A100, 164 KB smem): 32-deep K with 4 stages (Triton matmul tutorial table).
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # Small M (decode, short batches): narrow row tiles so the grid still fills the SMs.
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # Small-footprint fallback (≈32 KB smem even in fp32) so some config always fits.
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=2),
    ]


def prune_gemm_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Configs that fit the device's shared memory, less BLOCK_M < 64 configs when M ≥ SMALL_TILE_MAX_M (they only help small M), and for
    fp32 operands (mma.sync tf32, no wgmma) those above 64 fp32 accumulators per thread:
    they spilled 0.8-140 KB per thread on sm_90 (compile facts), the others spill nothing.
    fp32 under ``highest`` (IEEE: FMA dots, the K step's operands in registers) keeps K steps
    ≤ 32: 64-deep ones spilled 10-60 KB per thread on sm_80 (compile facts)."""
    kept = configs
    if named_args["M"] >= SMALL_TILE_MAX_M:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] >= 64] or kept
    # The precision only matters for fp32 operands (tl.dot ignores it for 16-bit ones, which
    # the NF4 path passes as "ieee").
    fp32 = named_args["a2_ptr"].element_size() == 4
    prec = kwargs.get("INPUT_PRECISION", "tf32") if fp32 else "tf32"
    if fp32:
        kept = [c for c in kept if acc_per_thread(c, c.kwargs["BLOCK_N"]) <= 64] or kept
    if prec == "ieee":
        kept = [c for c in kept if c.kwargs["BLOCK_K"] <= 32] or kept
    return fit_smem(kept, device_target(named_args["a2_ptr"].device), _step_bytes(named_args),
                    lambda c: wgmma_rows(c, c.kwargs["BLOCK_M"], prec))


def _step_bytes(named_args: dict):
    """Bytes of one K step's A and B tiles: the widest operand dtype (B operands of another
    dtype are loaded as they are stored and cast in registers)."""
    esz = max(named_args[k].element_size() for k in ("a1_ptr", "b1_ptr", "a2_ptr", "b2_ptr") if k in named_args)
    return lambda c: esz * c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"])


def tma_gemm_configs(interpret: bool = INTERPRET) -> list:
    """Hopper-only persistent TMA GEMM: the pointer GEMM's warpgroup-sized (≥ 64-row),
    64-deep configs (16-bit operands only, so no fp32 pruning is needed)."""
    configs = gemm_configs(interpret)
    if interpret:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] >= 64 and c.kwargs["BLOCK_K"] == 64]


def prune_tma_gemm_configs(configs: list, named_args: dict, **kwargs) -> list:
    """The TMA GEMM's configs that fit the device's shared memory (all do on sm_90, the only
    family it runs on: ≤ 144 KB of 227 KB, compile facts)."""
    return fit_smem(configs, device_target(named_args["a2_ptr"].device), _step_bytes(named_args))
