"""The memory plan against ``torch.cuda.max_memory_allocated`` on real training steps (issue 33's row).

A scaled-down Llama (hidden 2048, intermediate 5632, 8 layers, 16/4 heads, vocab 32000: 0.6 B
parameters, bf16) is adapted with QSORSA r=16 on the GPU and trained one warm-up step, then one
measured step (forward, backward, optimizer step, ``zero_grad(set_to_none=True)``) per case:
AdamW with and without gradient checkpointing, 8-bit AdamW, and 8-bit AdamW with gradient release and
bf16 adapters (the job's own optimizers: ``make_optimizer``, ``enable_gradient_release``).  Batch 4 × 1024 tokens, so
activations and optimizer state are a large share of the peak.  Each case compares the plan's peak
without its CUDA-context allowance (``plan_memory(..., device="cuda")``) with the step's
``torch.cuda.max_memory_allocated()`` (tensors only: the context is not in it), and prints the ratio;
the target is within 10 %.

Run (CUDA GPU): ``python -m bench.plan_vs_cuda`` → ``bench/results/plan-vs-cuda-<device>.json`` and a
markdown table on stdout.  ``python -m bench.plan_vs_cuda --plan-only`` prints the planned side on any machine.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from sorsa_kernels.memory.plan import CUDA_CONTEXT_BYTES, GIB, PlanSettings, plan_memory

MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
BATCH, SEQ, RANK = 4, 1024, 16
CASES = {"adamw": dict(optim="adamw", gradient_checkpointing=False),
         "adamw-checkpointing": dict(optim="adamw", gradient_checkpointing=True),
         "adamw8bit": dict(optim="adamw8bit", gradient_checkpointing=False),
         "adamw8bit-release-bf16": dict(optim="adamw8bit", gradient_checkpointing=True, gradient_release=True,
                                        adapter_dtype="bfloat16")}


def config():
    import transformers

    return transformers.LlamaConfig(**MODEL, dtype=torch.bfloat16)


def plan_for(case: str):
    """The plan of ``case`` (a GPU run: foreach AdamW, NF4 kernels, the context allowance included)."""
    return plan_memory(config(), PlanSettings(rank=RANK, quantize="nf4", bf16=True, max_length=SEQ, batch_size=BATCH,
                                              device="cuda", **CASES[case]))


def measure(case: str) -> int:
    """``torch.cuda.max_memory_allocated`` over one training step of ``case`` (after a warm-up step)."""
    import transformers

    from sorsa_kernels import apply_sorsa

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config()).to(torch.bfloat16)
    case_settings = CASES[case]
    bf16_adapters = case_settings.get("adapter_dtype") == "bfloat16"
    apply_sorsa(model, RANK, quantize="nf4", svd="randomized", progress=False,
                adapter_dtype=torch.bfloat16 if bf16_adapters else None)
    model.train()
    model.config.use_cache = False
    if CASES[case]["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from sorsa_kernels.training.gradient_release import enable_gradient_release
    from sorsa_kernels.training.optim import adapter_scales, make_optimizer, optimizer_for_params

    if case_settings.get("gradient_release"):
        scales = adapter_scales(model)
        opt = enable_gradient_release(model, lambda ps: optimizer_for_params(ps, case_settings["optim"], 1e-4,
                                                                             fp32_state=scales),
                                      gamma=4e-4, lr_max=1e-4)
    else:
        opt = make_optimizer(model, case_settings["optim"], lr=1e-4)
    x = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), device="cuda")

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, opt
    torch.cuda.empty_cache()
    return peak


def main(argv=None) -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--plan-only", action="store_true", help="print the planned peaks, measure nothing")
    args = args.parse_args(argv)
    rows = ["| case | planned GiB (no context) | measured GiB | planned / measured |", "|---|---:|---:|---:|"]
    results = {}
    for case in CASES:
        planned = plan_for(case).peak_bytes - CUDA_CONTEXT_BYTES
        measured = None if args.plan_only else measure(case)
        results[case] = dict(planned_bytes=planned, measured_bytes=measured)
        ratio = f"{planned / measured:.3f}" if measured else "-"
        rows.append(f"| {case} | {planned / GIB:.3f} | {measured / GIB if measured else float('nan'):.3f} | {ratio} |")
    print("\n".join(rows))
    if args.plan_only:
        return
    device = torch.cuda.get_device_name().replace(" ", "-")
    out = Path(__file__).parent / "results" / f"plan-vs-cuda-{device}.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "python": platform.python_version(), "model": MODEL, "batch": BATCH, "seq": SEQ,
                               "rank": RANK, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
