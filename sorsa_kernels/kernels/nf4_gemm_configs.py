"""Configs, prune and path threshold of the NF4 kernels (kernels/nf4_gemm.py)."""
from __future__ import annotations

import triton

from ._launch import INTERPRET, device_target, fit_smem

__all__ = ["DEQUANT_MIN_M", "DEQUANT_BLOCK", "GPU_CONFIGS", "INTERPRETER_CONFIGS", "CONFIGS", "prune_nf4_configs"]

# From this many rows on, dequantize once into a scratch matrix and run the dense fused GEMM
# (see the module docstring).  256 = two 128-row tiles: an untuned starting point (GPU run).
DEQUANT_MIN_M = 256
# Packed bytes per program of _nf4_dequant_kernel (2·DEQUANT_BLOCK values).
DEQUANT_BLOCK = 64 if INTERPRET else 1024

# Block sizes.  No GPU was available when these were written: they are untuned starting
# points taken from the Triton matmul tutorial's configs (BLOCK_M/N 64-128, BLOCK_K 32-64,
# GROUP_M 8 for L2 reuse) and Hopper guidance (4-8 warps, 3-4 stages), plus narrow-row
# configs for decode-sized M.  This kernel only serves M < DEQUANT_MIN_M.  Pruned with the
# sm_90 compile facts (tools/compile_facts.py): 128×128×64 (256 KB), 64×128×64
# (336 KB) and 16×128×64 at 4 stages (310 KB) exceeded 227 KB of shared memory, and
# 128×128×32 spilled 1 KB in the dx form; the dequantized tile passes through shared memory,
# so these tiles cost far more than a bf16 GEMM's.
# BLOCK_R is the step through the rank columns of the low-rank operands; it reuses
# BLOCK_K (ranks 8..128 fit one to four steps).
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1}, num_stages=2, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 1}, num_stages=3, num_warps=4),
]
# Under TRITON_INTERPRET=1 (CI on CPU) one small config: several tiles per dimension on
# the test shapes so masking and tile seams are exercised, and no autotuning runs.
INTERPRETER_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_stages=1, num_warps=4),
]
CONFIGS = INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS


# Bytes per element of the dequantized B tile that the K loop pipelines through shared memory:
# the five gathers of nf4_dequant_tile (packed byte 1, code level 4, absmax byte 1, nested
# absmax 4, nested code 4).  With the A tile this matches the compile facts (M128 N64 K64 at
# 4 stages: 3 × (16 + 56) KB = 216 KB on sm_90, 3 buffers even where the dot is a wgmma).
_DEQUANT_TILE_BYTES = 14


def prune_nf4_configs(configs: list, named_args: dict, **kwargs) -> list:
    """The fused NF4 kernel's configs that fit the device's shared memory per block; under
    fp32 ``highest`` (IEEE FMA dots) only A tiles of at most 32 × 32 per K step (64 × 32 and
    16 × 64 spilled 0.8-1.4 KB per thread on sm_80, 32 × 32 nothing: compile facts)."""
    a = named_args["a_ptr"]
    esz = a.element_size()
    kept = configs
    if esz == 4 and kwargs.get("INPUT_PRECISION") == "ieee":  # 16-bit operands pass "ieee" too: ignored
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= 32 and c.kwargs["BLOCK_K"] <= 32] or configs
    return fit_smem(kept, device_target(a.device),
                    lambda c: c.kwargs["BLOCK_K"] * (esz * c.kwargs["BLOCK_M"] + _DEQUANT_TILE_BYTES * c.kwargs["BLOCK_N"]),
                    lambda c: False)  # gathered B tiles: num_stages − 1 buffers on sm_90 too (compile facts)

