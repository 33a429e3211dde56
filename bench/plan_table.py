"""The memory plan's table for four real models (configs under ``bench/configs/``, no download).

For Qwen3-30B-A3B, gpt-oss-20b, Llama-3.1-8B and Llama-2-7B: QSORSA (NF4 residuals) r=16 and r=64,
sequence 512 and 2048, batch 1, bf16 compute, gradient checkpointing, one GPU and FSDP2 over 2;
the peak per GPU with AdamW, with each memory lever alone, and with all of them; then the issue's
three targets at sequence 1024.  Every figure is ``sorsa_kernels.memory.plan.plan_memory`` (meta
device: the package's surgery and layer classes; activations from the shapes; 0.75 GiB CUDA
context included).  gpt-oss's checkpoints hold MXFP4 experts; QSORSA loads them dequantized
(bf16), splits each expert by SVD and stores the residual in NF4 (4 bits + double-quantized
absmax per 64: ≈4.13 bits per weight against MXFP4's 4.25), so the plan counts NF4 experts;
its targets are the package's defaults for ``gpt_oss`` (q, k, v, o and the experts), as every model's.

Run: ``python -m bench.plan_table`` (CPU, a minute or two) → ``bench/results/plan.md`` and ``plan.json``.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from sorsa_kernels.memory.levers import COSTS, LEVERS, lever_flags, plan_cached, plan_levers, plans_that_fit
from sorsa_kernels.memory.plan import GIB, PlanSettings

CONFIGS = Path(__file__).parent / "configs"
MODELS = ("Qwen3-30B-A3B", "gpt-oss-20b", "Llama-3.1-8B", "Llama-2-7B")  # each with its default targets
TARGETS = (("Qwen3-30B-A3B", 16, 1024, 20), ("Llama-2-7B", 64, 512, 8), ("Llama-3.1-8B", 16, 1024, 11))


def load(name: str):
    from sorsa_kernels.jobs.plan import load_model_config

    return load_model_config(str(CONFIGS / f"{name}.json"))


def main() -> None:
    cache: dict = {}  # one tally dict per (model, rank, world): the meta model built once per adapter dtype
    rows, raw = [], []
    lever_names = [k for k, _ in LEVERS if k != "gradient_checkpointing"]
    for name in MODELS:
        config = load(name)
        for rank in (16, 64):
            for seq in (512, 2048):
                for world in (1, 2):
                    base = PlanSettings(rank=rank, quantize="nf4", bf16=True, max_length=seq,
                                        batch_size=1, gradient_checkpointing=True, world_size=world)
                    tallies = cache.setdefault((name, rank, world), {})
                    plans = {"adamw": plan_cached(config, base, tallies), **plan_levers(config, base, tallies)}
                    rows.append(f"| {name} | {rank} | {seq} | {world} | "
                                + " | ".join(f"{p.peak_bytes / GIB:.2f}" for p in plans.values()) + " |")
                    raw.append(dict(model=name, rank=rank, seq=seq, world=world,
                                    plans={k: dict(peak_bytes=p.peak_bytes, components=p.components)
                                           for k, p in plans.items()}))
    head = ("| model | r | seq | GPUs | AdamW | " + " | ".join(f"+ {lever_flags({k: v})}" for k, v in LEVERS
                                                              if k in lever_names) + " | all levers |")
    table = "\n".join([head, "|---|---:|---:|---:|" + "---:|" * (len(lever_names) + 2), *rows])
    target_rows = ["| target | budget GiB | AdamW peak | fewest levers that fit | peak | fits |", "|---|---:|---:|---|---:|---|"]
    for name, rank, seq, budget in TARGETS:
        config = load(name)
        base = PlanSettings(rank=rank, quantize="nf4", bf16=True, max_length=seq,
                            batch_size=1, gradient_checkpointing=True)
        tallies: dict = {}
        plan = plan_cached(config, base, tallies)
        found = [] if plan.fits(budget * GIB) else plans_that_fit(config, base, budget * GIB, tallies=tallies, limit=1)
        lv, fp = found[0] if found else ({}, plan)
        ok = fp.peak_bytes <= budget * GIB
        target_rows.append(f"| {name} QSORSA r={rank} seq {seq} | {budget} | {plan.peak_bytes / GIB:.2f} | "
                           f"{lever_flags(lv) or ('none needed' if ok else 'none fits')} | {fp.peak_bytes / GIB:.2f} | "
                           f"{'yes' if ok else 'no'} |")
        raw.append(dict(target=name, rank=rank, seq=seq, budget_gib=budget, levers=lv, peak_bytes=fp.peak_bytes,
                        components=fp.components, fits=ok))
    import transformers

    env = f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
    text = "\n\n".join([
        "# Memory plan: four models, QSORSA, one GPU and FSDP2 over 2",
        "`python -m bench.plan_table` — `sorsa_kernels.memory.plan_memory` on the configs under `bench/configs/` "
        f"(meta device, nothing downloaded or allocated; {env}). GiB per GPU; batch 1, bf16 compute, gradient "
        "checkpointing, NF4 residuals, fp32 adapters unless a lever says otherwise, 0.75 GiB CUDA context "
        "included. Levers: `--optim adamw8bit` (bitsandbytes 8-bit state for every U and V whatever its size, "
        "fp32 for S and vectors, as `training.optim.make_optimizer` builds it), `--gradient-release` (each adapter stepped in its gradient hook), `--loss-chunk-size 256`, "
        "`--adapter-dtype bfloat16` (stepped in fp32 and stochastically rounded: an fp32 copy of every adapter "
        "and its gradient during the step, one at a time under gradient release). Experts through the routed op "
        "(`nf4_dequant` is 0 on a GPU: the grouped NF4 kernel dequantizes in its K loop). Not yet measured on a GPU (issue 33 carries that row: "
        "`python -m bench.plan_vs_cuda` against `torch.cuda.max_memory_allocated`); the CPU check of the cost model is "
        "`tests/memory/test_plan_vs_measured.py` (every component within 10 %, fp32 and bf16 models).",
        table, "## Targets (sequence as stated, batch 1, checkpointing)", "\n".join(target_rows),
        "The Qwen3-30B-A3B row as a command (prints `fits 24GB: yes`): `sorsa-kernels plan --model "
        "bench/configs/Qwen3-30B-A3B.json --quantize nf4 --rank 16 --max-length 1024 --batch-size 1 "
        "--gradient-checkpointing --bf16 --optim adamw8bit --gradient-release --loss-chunk-size 256 "
        "--adapter-dtype bfloat16 "
        "--gpu-memory 24GB`. What the levers cost: " + "; ".join(f"`{k}`: {v}" for k, v in COSTS.items()) + ".",
        "gpt-oss-20b: MXFP4 experts in the checkpoint are requantized to NF4 by QSORSA (counted as NF4 above). "
        "Its attention is eager (sinks), so the recomputed layer keeps seq² softmax probabilities per head."])
    out = Path(__file__).parent / "results"
    (out / "plan.md").write_text(text + "\n")
    (out / "plan.json").write_text(json.dumps({"environment": env, "rows": raw}, indent=1, default=str) + "\n")
    print(text)


if __name__ == "__main__":
    main()
