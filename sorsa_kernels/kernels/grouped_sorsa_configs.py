"""Configs and prunes of the grouped SORSA (MoE experts) kernels (kernels/grouped_sorsa.py).

Untuned starting points (the dense GEMM's tiles, Triton matmul tutorial; no GPU was available
when they were written: measure with ``bench/``), pruned per launch by the device's shared
memory per block (:func:`~._launch.device_target`, as every family's prunes) and, for fp32
operands, by fp32 accumulators per thread.  The row tile is not a config: it is
:data:`ROW_BLOCK`, the tile table's row step.  Checked per GPU family by
tools/compile_facts.py (the ``experts`` launch classes of docs/compile-facts-sm*.md).
"""
from __future__ import annotations


from ._launch import INTERPRET, acc_per_thread, config_table, device_target, fit_smem, wgmma_rows

__all__ = ["ROW_BLOCK", "MAX_BLOCK_R", "gemm_configs", "prune_gemm_configs", "weight_grad_configs",
           "prune_weight_grad_configs"]

# Rows per tile of the grouped GEMMs (the tile table's row step) and per step of the
# weight-gradient loops: 64 fills a wgmma tile on Hopper and wastes at most 63 rows per
# expert; 16 under the interpreter keeps CI small while still splitting experts into tiles.
ROW_BLOCK = 16 if INTERPRET else 64

# The weight-gradient kernel's r tile is next_pow2(r) capped here, r split over the grid's third
# axis beyond it: the dense weight-gradient kernel's cap (kernels/sorsa_linear_configs.py:
# 128 keeps a BLOCK_K × BLOCK_R fp32 tile of the compile tables' configs in registers); 32
# under the interpreter so that CI runs the split with a small r.
MAX_BLOCK_R = 32 if INTERPRET else 128


def gemm_configs(interpret: bool = INTERPRET) -> list:
    """N tile × K step of the grouped GEMM (rows: :data:`ROW_BLOCK`)."""
    # (BLOCK_N, BLOCK_K, warps, stages): untuned starting points (see the module docstring); the
    # last is a small-footprint fallback (24 KB even with fp32 operands) so some config always fits.
    return config_table(interpret, ("BLOCK_N", "BLOCK_K"), [
        (128, 64, 4, 4), (256, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 2)])


def weight_grad_configs(interpret: bool = INTERPRET) -> list:
    """Output rows (of dU / dV, over K), warps and stages; the step over rows is :data:`ROW_BLOCK`."""
    # (BLOCK_K, warps, stages); BLOCK_K 32 is the fp32 / r ≥ 128 fallback.
    return config_table(interpret, ("BLOCK_K",), [(128, 4, 3), (64, 4, 4), (256, 8, 3), (32, 4, 2)])


def prune_gemm_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Configs of the grouped GEMM that fit the device's shared memory (one K step holds a
    ROW_BLOCK × BLOCK_K A tile and a BLOCK_K × BLOCK_N B tile, each in the dtype it is
    stored in: fp32 adapters are cast in registers); for fp32 operands also ≤ 64 fp32
    accumulators and ≤ 64 operand elements of a K step per thread: N128×K64 at 4 warps (96
    operand elements) spilled 520 B and N256×K64 at 8 warps (80) 276 B per thread on sm_80
    in the residual forms, fp32 under ``high`` (compile facts); the others ≤ 80 B."""
    a2 = named_args["a2_ptr"]
    rows = kwargs.get("BLOCK_M", ROW_BLOCK)
    kept = configs
    if a2.element_size() == 4:
        def per_thread(c, n):
            return n // (32 * c.num_warps)

        kept = [c for c in configs if per_thread(c, rows * c.kwargs["BLOCK_N"]) <= 64
                and per_thread(c, c.kwargs["BLOCK_K"] * (rows + c.kwargs["BLOCK_N"])) <= 64] or configs
    a_esz = max(named_args[k].element_size() for k in ("a1_ptr", "a2_ptr"))
    b_esz = max(named_args[k].element_size() for k in ("b1_ptr", "b2_ptr"))
    prec = kwargs.get("INPUT_PRECISION", "tf32")
    return fit_smem(kept, device_target(a2.device),
                    lambda c: c.kwargs["BLOCK_K"] * (a_esz * rows + b_esz * c.kwargs["BLOCK_N"]),
                    lambda c: wgmma_rows(c, rows, prec))


def prune_weight_grad_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Configs of the grouped weight-gradient kernel that fit the device's shared memory (one
    row step holds the BLOCK_K × ROW_BLOCK Aᵀ tile and the ROW_BLOCK × BLOCK_R B tile); for
    fp32 operands also ≤ 64 fp32 accumulators per thread of the BLOCK_K × BLOCK_R output
    tile, as the dense weight-gradient kernel (kernels/sorsa_linear_configs.py)."""
    a, b = named_args["a_ptr"], named_args["b_ptr"]
    block_r = kwargs["BLOCK_R"]
    rows = kwargs.get("BLOCK_M", ROW_BLOCK)
    kept = configs
    if a.element_size() == 4:
        kept = [c for c in configs if acc_per_thread(c, block_r, rows="BLOCK_K") <= 64] or configs
    prec = kwargs.get("INPUT_PRECISION", "tf32")
    return fit_smem(kept, device_target(a.device),
                    lambda c: rows * (a.element_size() * c.kwargs["BLOCK_K"] + b.element_size() * block_r),
                    lambda c: wgmma_rows(c, c.kwargs["BLOCK_K"], prec))
