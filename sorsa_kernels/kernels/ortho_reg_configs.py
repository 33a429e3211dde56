"""Configs, prune and per-GPU-family launch parameters of the regularizer kernels (kernels/ortho_reg.py).

No GPU was available when these were written: every number below is an untuned starting
point taken from the Triton matmul tutorial and the Hopper guidance (64-128 wide tiles,
4-8 warps, 2-3 stages), to be measured with bench/bench_regularizer.py; the per-family
choices come from the compile facts (tools/compile_facts.py, docs/compile-facts-sm*.md).

Launch 1 (partial Grams) is idempotent, so the autotuner may re-run it: warps and stages
are tuned, and pruned to the device's shared memory.  Its step through the rows of A
(the K of each tl.dot, per GPU family: :func:`fixed_launch_params`) is fixed so that the summation order never depends on
the tuned config.  Launches 2 and 3 update buffers in place (launch 2 overwrites chunk 0 of
the workspace with G − I; launch 3 adds into .grad), so the autotuner cannot re-run them:
they take fixed parameters per GPU family (:func:`fixed_launch_params`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import triton

from ._launch import INTERPRET, Target, device_target, fit_smem

__all__ = ["GRAM_STEP_K", "GPU_GRAM_STEP_K", "UPDATE_BLOCK_K", "DEFAULT_K_CHUNK", "MEAN_BLOCK", "gram_configs",
           "prune_gram_configs", "FixedParams", "fixed_launch_params"]

# The step through the rows of A of launch 1 (the K of each Gram tl.dot); fixed per GPU
# family and precision, never tuned (:func:`fixed_launch_params`: 64 on a GPU, 32 for fp32
# sets below sm_90); GRAM_STEP_K where no GPU family is known (32 in the interpreter).
GPU_GRAM_STEP_K = 64
GRAM_STEP_K = 32 if INTERPRET else GPU_GRAM_STEP_K

# Rows of A per program of launch 3.  It shapes the work table, so it is fixed per call.
# 128 rows (GPU) read each fp32 tile of D = G − I once per 128 rows of A instead of per 64.
UPDATE_BLOCK_K = 64 if INTERPRET else 128
# Gram rows summed by one program of launch 1 before its partial is written.  2048 splits
# the 7B shapes (k = 4096 and 11008) into 2 and 6 chunks: about 1300 programs for 448
# matrices, ~10 waves on an H100, with a workspace of ~80 MiB at r = 128.
DEFAULT_K_CHUNK = 2048
# Norms summed per iteration by the program that forms the mean.
MEAN_BLOCK = 1024


def gram_configs(interpret: bool = INTERPRET) -> list:
    """Warps × stages of launch 1 (the interpreter ignores both: one config, no benchmarking).

    8 warps at 2 or 3 stages are the fp32 (tf32x3) 128-wide configs below sm_90: with the
    32-row step there (:func:`fixed_launch_params`) 64 KB and no spills on sm_80/86/89
    (compile facts)."""
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 3), (8, 3), (4, 2), (8, 4), (8, 2))]
    return configs[:1] if interpret else configs


def prune_gram_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Configs of launch 1 that fit the device's shared memory; for tf32x3 (fp32 sets) at
    128-wide tiles only 8 warps at ≤ 3 stages (4 warps spilled 5.7 KB per thread on sm_90
    and 4.0 KB on sm_86; 4 stages needed 256 KB on sm_90, compile facts)."""
    block_r = kwargs.get("BLOCK_R", 0)
    kept = configs
    if kwargs.get("DOT_PRECISION") == "tf32x3" and block_r >= 128:
        kept = [c for c in configs if c.num_warps >= 8 and c.num_stages <= 3] or configs
    # Two BLOCK_R × GRAM_STEP_K tiles per step: 16-bit when the dot takes them as they are,
    # else loaded and upcast to fp32.
    esz = 2 if kwargs.get("NATIVE_DOT") else 4
    step = kwargs.get("BLOCK_K", GRAM_STEP_K)
    return fit_smem(kept, device_target(named_args["table_ptr"].device), lambda c: 2 * esz * block_r * step)


@dataclass(frozen=True)
class FixedParams:
    """Launch parameters of the fixed-config launches 2 (norms) and 3 (update)."""

    norm_warps: int
    update_r_step: int
    update_warps: int
    update_stages: int
    gram_step_k: int = GRAM_STEP_K


def fixed_launch_params(target: Optional[Target], block_r: int, dot_precision: str = "tf32") -> FixedParams:
    """Per GPU family, the parameters of launches 2 and 3 for Gram tiles ``block_r`` wide,
    and launch 1's step through the rows of A (``gram_step_k``, fixed so that the summation
    order does not depend on the tuned config).

    Launch 1 in fp32 (tf32x3) at 128-wide tiles, 7B adapter set, r = 128 and 256 (compile
    facts): 64-row steps spilled 484 B (8 warps, 3 stages) and 1.3 KB (8 warps, 2 stages)
    per thread on sm_80 and sat at 255 registers on sm_86/89; 32-row steps spill nothing
    on sm_80/86/89 (238 registers, 64 KB of shared memory at 2 and 3 stages).  sm_90 keeps
    64 (no spills there).

    The update's step through r (``R_STEP``, the K of its tl.dot) at 128-row blocks and 8
    warps in fp32 (tf32x3), 7B adapter set, r = 128 (compile facts): 64 spills nothing on
    sm_90 (128 did: 280 B) but 27.6 KB on sm_80 and 1.4 KB on sm_86; 32 spills nothing on
    sm_80/86/89 (64 KB of shared memory).  sm_75 (64 KB) takes 16.  The interpreter: 16.
    Norms: 8 warps at 128-wide tiles (spills 40 B on sm_90, 104 B on sm_86; 4 warps 2.3 KB).
    """
    wide = block_r >= 128
    if target is None:
        step = 16
    elif target.capability >= 90:
        step = 64
    elif target.smem >= 96 * 1024:
        step = 32
    else:
        step = 16
    warps = 8 if wide else 4
    if target is None:
        gram_step = GRAM_STEP_K
    elif target.capability < 90 and dot_precision == "tf32x3" and wide:
        gram_step = 32
    else:
        gram_step = GPU_GRAM_STEP_K
    return FixedParams(norm_warps=warps, update_r_step=min(block_r, step), update_warps=warps, update_stages=2,
                       gram_step_k=gram_step)
