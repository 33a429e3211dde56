"""Randomized-SVD initialization of a Llama-7B's 224 adapted weights at r = 128: wall seconds.

What ``apply_sorsa(model, 128, svd="randomized")`` spends on a 7B Llama's projections: for each
of the 32 layers × 7 projections (q, k, v, o 4096×4096; gate, up 11008×4096; down 4096×11008,
out×in) one :meth:`sorsa_kernels.SORSALinear.from_linear` (``torch.svd_lowrank`` with r + 16
columns and 2 power iterations in float32, the residual ``W − U·diag(S)·Vᵀ``, the casts).  The
weights are bf16 on the GPU; one random weight per distinct shape is reused (the SVD's time
does not depend on the values), and each built layer is dropped before the next so that memory
stays at one layer.  One untimed warm-up build per shape (cuSOLVER/cuBLAS handles); then the
whole set once, wall clock around it with ``torch.cuda.synchronize()``.

Issue 33's target (``bench/targets.py``): under 30 s.  CPU (CI, ``--benchmark-disable``): 2 layers
of 256/688-wide projections at r = 8, fp32.  Marked ``quick``.
"""
from __future__ import annotations

import time

import pytest
import torch

from . import harness, providers

pytestmark = pytest.mark.quick

LAYERS_GPU, RANK_GPU = 32, 128
#: (name, out_features, in_features) of one Llama-7B decoder layer.
PROJECTIONS_7B = [
    ("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
    ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008),
]
PROJECTIONS_CPU = [(n, 256 if o == 4096 else 688, 256 if i == 4096 else 688) for n, o, i in PROJECTIONS_7B]


def _synchronize() -> None:
    if harness.ON_CUDA:
        torch.cuda.synchronize()


def test_randomized_svd_init_of_the_7b_adapter_set(benchmark):
    """Build SORSALinear from every projection of the set; record the total wall seconds."""
    from sorsa_kernels import SORSALinear

    on_gpu = harness.grid().name == "gpu"
    layers, rank = (LAYERS_GPU, RANK_GPU) if on_gpu else (2, 8)
    projections = PROJECTIONS_7B if on_gpu else PROJECTIONS_CPU
    dtype = torch.bfloat16 if on_gpu else torch.float32
    bases = {(o, i): providers.base_linear(i, o, dtype, harness.DEVICE, seed=o + i) for _, o, i in projections}
    for lin in bases.values():  # warm-up: library handles, kernels' first load
        SORSALinear.from_linear(lin, rank, svd="randomized")
    _synchronize()
    built = []

    def init_all() -> float:
        built.clear()
        _synchronize()
        t0 = time.perf_counter()
        for _ in range(layers):
            for _, o, i in projections:
                layer = SORSALinear.from_linear(bases[(o, i)], rank, svd="randomized")
                built.append(layer.S.shape)
                del layer
        _synchronize()
        return time.perf_counter() - t0

    total_s = benchmark.pedantic(init_all, rounds=1, iterations=1, warmup_rounds=0)
    assert built == [torch.Size([rank])] * (layers * len(projections))
    benchmark.group = f"randomized SVD init, {layers} layers x {len(projections)} projections, r={rank}"
    benchmark.extra_info.update({
        "kind": "svd_init", "provider": "sorsa", "rank": rank, "layers": layers * len(projections),
        "shapes": ", ".join(f"{n} {o}x{i}" for n, o, i in projections), "dtype": harness.dtype_name(dtype),
        "svd": "randomized (torch.svd_lowrank, q = r + 16, niter 2, float32)", "total_s": total_s,
        "device": harness.DEVICE.type, "device_name": harness.device_name(), "grid": harness.grid().name,
        "versions": dict(harness.versions()),
    })
