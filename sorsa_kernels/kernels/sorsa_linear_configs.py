"""Configs, prunes and split heuristics of the SORSA linear kernels (kernels/sorsa_linear.py).

The autotune config lists of the skinny low-rank kernels (``x·V``, ``dy·U``) and of the
weight-gradient reductions, the prunes that size them for the device (shared memory per
block, accumulators per thread), and the launch-time constants and split heuristics that
fix every reduction boundary from the shapes and the SM count, never from a tuned config.

Prunes size configs for the launch's device (:func:`~._launch.device_target`: the GPU's
shared memory per block, queried once per device; a capability under
:func:`~._launch.compile_target`; no limit in the interpreter).  The shared memory of a
config is the pipelined operand tiles (:func:`~._launch.pipelined_smem`), checked against
every GPU family by tests/kernels/test_compile_facts.py and the committed
docs/compile-facts-sm*.md tables.
"""
from __future__ import annotations

import torch
import triton

from ._launch import INTERPRET, acc_per_thread, config_table, device_target, fit_smem, num_sms, wgmma_rows

__all__ = [
    "MAX_BLOCK_R", "UP_BLOCK_M", "WG_STEP_M", "SPLIT_ALIGN", "K_SPLIT_ALIGN", "K_SPLIT_MIN",
    "MAX_K_SPLITS", "SKINNY_NOMINAL_M",
    "skinny_configs", "prune_skinny_configs", "up_grad_configs", "prune_up_grad_configs",
    "weight_grad_configs", "prune_weight_grad_configs",
    "rank_tile", "rows_per_split", "k_per_split", "k_splits", "num_m_splits",
]

# Largest rank tile of the skinny kernels; r above it is split over a second grid axis.
# 128 covers the ranks SORSA is used with (the paper uses r ≤ 128) in a single tile.  The
# interpreter uses 32 so that CI exercises the multi-rank-tile path with a small r.
MAX_BLOCK_R = 32 if INTERPRET else 128

# Row tile of _lowrank_up_grad_kernel.  Fixed (not autotuned) because the dS partial buffer
# has one row per row tile, so the dS reduction boundaries must not depend on a tuned value.
# 128 rows (was 64) halve the re-reads of U (every row tile reads all of it, or all of its K
# chunk); the grid it leaves (32 row tiles at M = 4096) is refilled by split-K.  At 8 warps
# the 128 × r≤128 fp32 tile stays in registers: 96-164 registers, no spills, ≤ 192 KB of
# shared memory on sm_90 at r = 128 (compile facts).
UP_BLOCK_M = 16 if INTERPRET else 128

# Determinism of the dU / dV reductions over M (see _lowrank_weight_grad_kernel): the rows of
# one fp32 partial (a "split") are a multiple of SPLIT_ALIGN chosen by the launcher from
# (M, K, r, SM count) only, and inside a split the rows are consumed in fixed steps of
# WG_STEP_M.  Neither depends on the autotuned config, so the bits of dU / dV do not depend
# on which config the autotuner picked (a timing-dependent choice).
WG_STEP_M = 16 if INTERPRET else 64
SPLIT_ALIGN = 16 if INTERPRET else 256

# Split-K of the skinny kernels (x·V over K = in_features, dy·U over K = out_features).  At
# M = 4096 their row-tile grid is 32-64 CTAs on H100's 132 SMs (under half a wave), so when
# the grid (counted with the nominal row tile SKINNY_NOMINAL_M, since the tuned BLOCK_M may
# not decide it) is below two waves, K is cut into chunks of a multiple of K_SPLIT_ALIGN
# (256: a multiple of every skinny/up-grad BLOCK_K, so a chunk boundary never falls inside a
# K step) of at least K_SPLIT_MIN columns, at most MAX_K_SPLITS of them (each split costs an
# M×r fp32 partial write + read, ~6 % of dy's bytes at m = 4096, r = 128).  The chunk size
# depends on (M, K, r, SM count) only, never on the autotuned config, and the fp32 partials
# are summed by torch in split order: the bits do not depend on the autotuner's choice.
# The interpreter (and any non-CUDA device) uses two 16-aligned chunks so CI runs the split path.
K_SPLIT_ALIGN = 16 if INTERPRET else 256
K_SPLIT_MIN = 512
MAX_K_SPLITS = 8
SKINNY_NOMINAL_M = 128

def _prune(configs: list, t, kwargs: dict, fp32_keep, step_bytes, mma_rows) -> list:
    """The rule every prune here follows: for fp32 inputs keep the configs ``fp32_keep(c,
    block_r, prec)`` accepts (all of them when it accepts none), then those whose pipeline
    stages (``step_bytes(c, element_size, block_r)`` each) fit the device's shared memory,
    with ``mma_rows(c)`` rows per dot deciding wgmma."""
    block_r = kwargs.get("BLOCK_R", MAX_BLOCK_R)
    prec = kwargs.get("INPUT_PRECISION", "tf32")
    esz = t.element_size()
    kept = configs
    if esz == 4:
        kept = [c for c in configs if fp32_keep(c, block_r, prec)] or configs
    return fit_smem(kept, device_target(t.device), lambda c: step_bytes(c, esz, block_r),
                    lambda c: wgmma_rows(c, mma_rows(c), prec))


def prune_skinny_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Configs of the skinny kernels that fit the device's shared memory; for fp32 inputs
    also K steps ≤ 64 and ≤ 64 accumulators per thread (the rest spilled on sm_90 at
    r = 128, compile facts); under ``highest`` (IEEE FMA dots) K steps ≤ 32 (64 spilled 5 KB
    per thread on sm_80)."""
    return _prune(
        configs, named_args["x_ptr"], kwargs,
        lambda c, block_r, prec: (c.kwargs["BLOCK_K"] <= (32 if prec == "ieee" else 64)
                                  and acc_per_thread(c, block_r) <= 64),
        lambda c, esz, block_r: esz * c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] + block_r),
        lambda c: c.kwargs["BLOCK_M"])


def skinny_configs(interpret: bool = INTERPRET) -> list:
    """Row tile × K step for the r-wide products (x·V and dy·U); memory bound, so deep K steps.

    128-row tiles read U or V half as often as 64-row ones (every row tile re-reads all of
    it).  A 256-row tile (BLOCK_K 32, 8 warps) spilled 272 B at r = 128 on sm_90 (compile
    facts, tools/compile_facts.py) and was dropped.
    """
    # (BLOCK_M, BLOCK_K, warps, stages); the last fits A100 shared memory in fp32 with a 128-wide rank tile.
    return config_table(interpret, ("BLOCK_M", "BLOCK_K"), [
        (128, 64, 8, 3), (128, 32, 4, 4), (64, 128, 4, 3), (64, 64, 4, 4), (32, 128, 4, 4), (16, 256, 4, 3),
        (32, 32, 4, 2)])


def prune_up_grad_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Configs of the up-grad kernel that fit the device's shared memory; for fp32 inputs
    also K steps ≤ 64 (BLOCK_K 128 needed 256 KB of shared memory and spilled 12 KB at
    r = 128 on sm_90, compile facts)."""
    rows = kwargs.get("BLOCK_M", UP_BLOCK_M)
    return _prune(configs, named_args["dy_ptr"], kwargs,
                  lambda c, block_r, prec: c.kwargs["BLOCK_K"] <= 64,
                  lambda c, esz, block_r: esz * c.kwargs["BLOCK_K"] * (rows + block_r),
                  lambda c: rows)


def prune_weight_grad_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Configs of the weight-gradient kernel that fit the device's shared memory; for fp32
    inputs also ≤ 64 fp32 accumulators per thread of the BLOCK_K × BLOCK_R output tile (128
    spilled about 11 KB at r = 128 on sm_90, compile facts; the others none); ≤ 32 under
    ``highest`` (IEEE FMA dots: 64 spilled 3.9 KB per thread on sm_80)."""
    step = kwargs.get("BLOCK_M", WG_STEP_M)
    return _prune(
        configs, named_args["a_ptr"], kwargs,
        lambda c, block_r, prec: acc_per_thread(c, block_r, rows="BLOCK_K") <= (32 if prec == "ieee" else 64),
        lambda c, esz, block_r: esz * step * (c.kwargs["BLOCK_K"] + block_r),
        lambda c: c.kwargs["BLOCK_K"])


def up_grad_configs(interpret: bool = INTERPRET) -> list:
    """K step only: the row tile is fixed at UP_BLOCK_M (see there); 8 warps for its
    128 × r fp32 tile (BLOCK_K 128 needs 192 KB at r = 128: Hopper only, A100 keeps the others)."""
    # (BLOCK_K, warps, stages); BLOCK_K 256 at 3 stages needed 288 KB of shared memory at r = 128:
    # dropped.  BLOCK_K 32 is the fp32 / r = 128 fallback (see above).
    return config_table(interpret, ("BLOCK_K",), [(128, 8, 3), (64, 8, 4), (32, 8, 2)])


def weight_grad_configs(interpret: bool = INTERPRET) -> list:
    """Output rows (of dU / dV), warps and stages; the step over M is fixed (WG_STEP_M)."""
    # (BLOCK_K, warps, stages); BLOCK_K 32 is the fp32 / r = 128 fallback.
    return config_table(interpret, ("BLOCK_K",), [(128, 4, 3), (128, 8, 4), (64, 4, 4), (256, 8, 3), (32, 4, 2)])


def rank_tile(r: int) -> int:
    """Rank tile (BLOCK_R) of the skinny and weight-gradient kernels for rank ``r``."""
    return min(MAX_BLOCK_R, max(16, triton.next_power_of_2(r)))


def rows_per_split(M: int, K: int, r: int, device: torch.device) -> int:
    """Rows of M per fp32 partial of the dU/dV reduction (a multiple of SPLIT_ALIGN).

    On a GPU: enough splits for about two waves when the K×r output alone would leave SMs
    idle, with at least 512 rows per split and at most 64 splits.  In the interpreter:
    16-row splits capped at 2, so the split path is what CI tests.  Depends only on the
    shapes and the SM count, never on the autotuned config (see _lowrank_weight_grad_kernel).
    """
    if device.type != "cuda":
        want = max(1, min(2, triton.cdiv(M, 16)))
    else:
        out_tiles = triton.cdiv(K, 128) * triton.cdiv(r, rank_tile(r))
        want = triton.cdiv(2 * num_sms(device.index or 0), out_tiles)
        want = max(1, min(want, triton.cdiv(M, 512), 64))
    return triton.cdiv(triton.cdiv(M, want), SPLIT_ALIGN) * SPLIT_ALIGN


def k_per_split(M: int, K: int, r: int, row_tile: int, device: torch.device) -> int:
    """Columns of K per fp32 partial of the skinny kernels' split-K (≥ K: no split).

    On a GPU: enough chunks to reach about two waves when the (row tile × rank tile) grid,
    counted with ``row_tile`` (fixed, not the tuned one), would leave SMs idle; at least
    K_SPLIT_MIN columns per chunk, at most MAX_K_SPLITS chunks.  Elsewhere (the
    interpreter): two chunks whenever K spans more than one K_SPLIT_ALIGN, so the split path
    is what CI tests.  A multiple of K_SPLIT_ALIGN; depends on the shapes and the SM count
    only, never on the autotuned config.
    """
    if device.type != "cuda":
        want = 2
    else:
        tiles = triton.cdiv(M, row_tile) * triton.cdiv(r, rank_tile(r))
        want = triton.cdiv(2 * num_sms(device.index or 0), tiles)
        want = max(1, min(want, K // K_SPLIT_MIN, MAX_K_SPLITS))
    return max(1, triton.cdiv(triton.cdiv(K, want), K_SPLIT_ALIGN)) * K_SPLIT_ALIGN


def k_splits(M: int, K: int, r: int, row_tile: int, device: torch.device) -> tuple[int, int]:
    """``(k_per_split, splits)`` of a skinny kernel's K reduction (see :func:`k_per_split`)."""
    kps = k_per_split(M, K, r, row_tile, device)
    return kps, max(1, triton.cdiv(K, kps))


def num_m_splits(M: int, K: int, r: int, device: torch.device) -> int:
    """How many fp32 partials the dU/dV reduction over M writes (summed afterwards)."""
    return triton.cdiv(M, rows_per_split(M, K, r, device))
