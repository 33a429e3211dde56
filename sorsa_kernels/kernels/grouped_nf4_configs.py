"""Configs and prune of the grouped NF4 experts kernel (kernels/grouped_nf4.py).

Untuned starting points: the grouped SORSA GEMM's N × K tiles (kernels/grouped_sorsa_configs.py)
at the stage counts the dense NF4 kernel's compile facts allow (kernels/nf4_gemm_configs.py:
the dequantized B tile costs 14 bytes per element of shared memory through its five gathers).
No GPU was available when they were written: measure with ``bench/`` before trusting them.
The row tile is the tile table's :data:`~.grouped_sorsa_configs.ROW_BLOCK`.
"""
from __future__ import annotations


from ._launch import INTERPRET, config_table, device_target, fit_smem
from .grouped_sorsa_configs import ROW_BLOCK

__all__ = ["gemm_configs", "prune_configs"]

# Bytes per element of the dequantized B tile (packed byte 1, code level 4, absmax byte 1,
# nested absmax 4, nested code 4), as kernels/nf4_gemm_configs.py counts it.
_DEQUANT_TILE_BYTES = 14


def gemm_configs(interpret: bool = INTERPRET) -> list:
    """N tile × K step of the grouped NF4 GEMM (rows: ROW_BLOCK)."""
    # (BLOCK_N, BLOCK_K, warps, stages); the last is a small-footprint fallback (≈34 KB).
    return config_table(interpret, ("BLOCK_N", "BLOCK_K"), [(64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)])


def prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """The configs whose K step (a ROW_BLOCK × BLOCK_K A tile and a dequantized BLOCK_K × BLOCK_N
    B tile) fits the device's shared memory per block."""
    a = named_args["a1_ptr"]
    esz = a.element_size()
    return fit_smem(configs, device_target(a.device),
                    lambda c: c.kwargs["BLOCK_K"] * (esz * ROW_BLOCK + _DEQUANT_TILE_BYTES * c.kwargs["BLOCK_N"]),
                    lambda c: False)
