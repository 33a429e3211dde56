"""SORSA experts vs PEFT LoRA ``target_parameters`` on the same MoE block: CPU forward+backward time.

One process, interleaved repetitions, fp32: a Qwen3-MoE sparse block (router + fused experts,
random weights from its config class, transformers' ``grouped_mm`` experts implementation) adapted (a) by PEFT LoRA on ``experts.gate_up_proj`` and
``experts.down_proj`` (``target_parameters``, which forms each expert's ΔW), and (b) by
``SORSAExperts`` (the reference path here, grouped rows, no ΔW).  Usage:
``python -m bench.cpu_experts [--reps N] [--threads T]``; prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers

from sorsa_kernels.adapters.experts import adapt_experts

# (tokens, hidden, moe_intermediate, experts, top_k, rank)
SHAPES = [(256, 256, 128, 8, 2, 8), (512, 512, 256, 16, 4, 16), (1024, 512, 256, 32, 4, 16)]


def _block(H, I, E, k):
    cfg = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k,
                                      intermediate_size=2 * I, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=H // 4, vocab_size=64)
    cfg._experts_implementation = "grouped_mm"  # what a loaded model uses on CPU and GPU (transformers 5.24)
    torch.manual_seed(0)
    block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.05)
    return block


def _lora(block, r):
    from .bench_experts import peft_lora_experts

    return peft_lora_experts(copy.deepcopy(block), r)


def _sorsa(block, r):
    model = copy.deepcopy(block)
    for p in model.parameters():
        p.requires_grad_(False)
    adapt_experts(model.experts, r, name="experts")
    return model


def _step(module, x, dy):
    x.grad = None
    for p in module.parameters():
        p.grad = None
    module(x).backward(dy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{torch.get_num_threads()} threads, CPU, fp32, forward+backward of a Qwen3-MoE sparse block")
    print("| tokens | H | I | E | top-k | r | PEFT LoRA ms (min / median) | SORSA ms (min / median) | LoRA/SORSA (min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for T, H, I, E, k, r in SHAPES:
        block = _block(H, I, E, k)
        built = {"lora": _lora(block, r), "sorsa": _sorsa(block, r)}
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, T, H, generator=g).requires_grad_(True)
        dy = torch.randn(1, T, H, generator=g)
        for m in built.values():
            _step(m, x, dy)
        times = {k_: [] for k_ in built}
        for _ in range(args.reps):
            for name, m in built.items():
                t0 = time.perf_counter()
                _step(m, x, dy)
                times[name].append((time.perf_counter() - t0) * 1e3)
        lo, so = times["lora"], times["sorsa"]
        print(f"| {T} | {H} | {I} | {E} | {k} | {r} | {min(lo):.2f} / {statistics.median(lo):.2f} | "
              f"{min(so):.2f} / {statistics.median(so):.2f} | {min(lo) / min(so):.2f} |")


if __name__ == "__main__":
    main()
