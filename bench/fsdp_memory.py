"""Per-rank bytes of NF4 residual + adapters + optimizer state under FSDP2: QSORSA vs FSDP-QLoRA.

A Llama-7B-shaped model (32 layers, hidden 4096, intermediate 11008, vocab 32000) is
built on the meta device, its seven projections per layer replaced by shape-only layers,
then sharded with ``fully_shard`` (each decoder layer, then the root) over a *fake*
process group of world size 1, 2 and 4 — no memory is allocated and no GPU is needed.
Every figure is read from the local shards FSDP2 made (``DTensor.to_local()`` on rank 0,
which holds the larger shard when a size does not divide), plus the replicated buffers:

* residual — the packed 4-bit codes; quant state — absmax codes + nested absmax;
  tables — the NF4 / nested code tables and offset;
* adapters — the trainable factors; grads — one gradient per trainable shard, in its dtype;
* AdamW — ``exp_avg`` and ``exp_avg_sq`` per trainable shard, in the parameter's dtype
  (torch.optim.AdamW keeps its state in the parameter's dtype).

Compared setups (the same formula for each):

``qsorsa-r128``
    This package: ``QSORSALinear`` r=128 on q,k,v,o,gate,up,down; U,S,V, grads and AdamW
    state fp32; the packed bytes, absmax and nested absmax are FSDP parameters (sharded),
    the code tables replicated buffers.
``fsdp-qlora-answerai``
    FSDP-QLoRA as its authors document it (AnswerDotAI/fsdp_qlora ``train.py`` defaults:
    ``--train_type qlora``, ``lora_rank=64``, ``lora_target_modules="all"`` = q,k,v,gate,up,down,
    ``--precision bf16`` = everything in bf16, so LoRA A/B, grads and AdamW state are bf16;
    bitsandbytes ``Linear4bit(quant_type="nf4", quant_storage=bf16)`` with its default double
    quantization).  FSDP shards the packed weight (a float-typed parameter thanks to
    ``quant_storage``); the ``QuantState`` (absmax, nested absmax, code tables) is a Python
    attribute, not a parameter, so every rank keeps all of it — ``train.py`` notes that
    "FSDP only syncs parameters and buffers, so the quant_state isn't copied" and quantizes
    on every rank to rebuild it.
``fsdp-qlora-r64-fp32``
    The same QLoRA storage with LoRA r=64 on all seven projections and fp32 A/B, grads and
    AdamW state (PEFT's default adapter dtype), for a like-for-like target set.

Run: ``python -m bench.fsdp_memory`` (CPU, a few seconds) → a markdown table on stdout and
``bench/results/fsdp_memory.json``.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from torch import nn

from sorsa_kernels.memory.accounting import bytes_by_category
from sorsa_kernels.nn.qlinear import QSORSALinear

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ANSWERAI_TARGETS = ("k_proj", "q_proj", "v_proj", "up_proj", "down_proj", "gate_proj")
SETUPS = {
    "qsorsa-r128": dict(kind="qsorsa", rank=128, targets=ALL7, dtype=torch.float32),
    "fsdp-qlora-answerai": dict(kind="qlora", rank=64, targets=ANSWERAI_TARGETS, dtype=torch.bfloat16),
    "fsdp-qlora-r64-fp32": dict(kind="qlora", rank=64, targets=ALL7, dtype=torch.float32),
}
WORLDS = (1, 2, 4)


class QLoRAShape(nn.Module):
    """Storage of bitsandbytes ``Linear4bit`` (NF4, double-quantized) + a LoRA, shapes only.

    The packed weight is a frozen parameter (FSDP shards it); the QuantState's tensors are
    registered as buffers, which FSDP leaves whole on every rank, as it does the QuantState.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, dtype: torch.dtype) -> None:
        super().__init__()
        numel = in_features * out_features
        nblocks = -(-numel // 64)
        meta = dict(device="meta")
        self.weight = nn.Parameter(torch.empty((numel + 1) // 2, 1, dtype=torch.uint8, **meta), requires_grad=False)
        self.register_buffer("absmax", torch.empty(nblocks, dtype=torch.uint8, **meta))
        self.register_buffer("nested_absmax", torch.empty(-(-nblocks // 256), dtype=torch.float32, **meta))
        self.register_buffer("nested_code", torch.empty(256, dtype=torch.float32, **meta))
        self.register_buffer("offset", torch.empty(1, dtype=torch.float32, **meta))
        self.register_buffer("code", torch.empty(16, dtype=torch.float32, **meta))
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, **meta))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, **meta))


def build(setup: dict, model_cfg: dict = LLAMA_7B) -> nn.Module:
    """The Llama skeleton (bf16, meta) with the setup's targets replaced by shape-only layers."""
    import transformers

    from sorsa_kernels.adapters.plan import set_submodule

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model_cfg)).to(torch.bfloat16)
    model.requires_grad_(False)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in setup["targets"]:
            n, m = mod.in_features, mod.out_features
            if setup["kind"] == "qsorsa":
                new = QSORSALinear(n, m, setup["rank"], bias=False, residual_dtype=torch.bfloat16,
                                   adapter_dtype=setup["dtype"], device="meta")
            else:
                new = QLoRAShape(n, m, setup["rank"], setup["dtype"])
            set_submodule(model, name, new)
    return model


def per_rank_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes rank 0 holds for the adapted layers, by category (see the module docstring)."""
    return bytes_by_category(model, (QSORSALinear, QLoRAShape), {
        "residual": {"nf4_packed", "weight"},
        "quant_state": {"nf4_absmax", "nf4_nested_absmax", "absmax", "nested_absmax"},
        "tables": {"nf4_code", "nf4_nested_code", "nf4_offset", "code", "nested_code", "offset"},
    })


def measure(worlds=WORLDS, setups=SETUPS, model_cfg: dict = LLAMA_7B, *, build=build,
            per_rank_bytes=per_rank_bytes) -> dict[str, dict[int, dict[str, int]]]:
    """``{setup: {world: per_rank_bytes(model)}}``, each model made by ``build(setup, model_cfg)`` and
    fully_shard-ed over a fake process group of that world size (``bench/moe_memory.py`` passes its own)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from sorsa_kernels.distributed.fsdp import shard_model

    results: dict[str, dict[int, dict[str, int]]] = {}
    for label, setup in setups.items():
        results[label] = {}
        for world in worlds:
            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
            try:
                model = build(setup, model_cfg)
                shard_model(model, init_device_mesh("cpu", (world,)))
                results[label][world] = per_rank_bytes(model)
            finally:
                dist.destroy_process_group()
    return results


def table(results) -> str:
    gib = 2 ** 30
    rows = ["| setup | world | NF4 residual | quant state (+tables) | adapters | grads | AdamW m,v | "
            "residual+adapters+optimizer | with grads |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, by_world in results.items():
        for world, b in by_world.items():
            qs = b["quant_state"] + b["tables"]
            core = b["residual"] + qs + b["adapters"] + b["adamw"]
            rows.append(
                f"| {label} | {world} | {b['residual'] / gib:.3f} | {qs / gib:.3f} | {b['adapters'] / gib:.3f} | "
                f"{b['grads'] / gib:.3f} | {b['adamw'] / gib:.3f} | **{core / gib:.3f}** | {(core + b['grads']) / gib:.3f} |"
            )
    return "\n".join(rows) + "\n\nGiB per rank (rank 0, the larger shard). Not counted: the rest of the model " \
        "(bf16 embeddings, norms, head; sharded the same way in both), activations, FSDP's all-gather buffers."


def main() -> None:
    results = measure()
    print(table(results))
    rest = {w: b["rest_of_model"] for w, b in results["qsorsa-r128"].items()}
    print("\nrest of the model per rank (bf16, GiB): " + ", ".join(f"world {w}: {v / 2**30:.3f}" for w, v in rest.items()))
    out = Path(__file__).parent / "results" / "fsdp_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "what": "per-rank bytes (rank 0) from fully_shard over a fake process group, meta device",
        "model": LLAMA_7B, "torch": torch.__version__, "python": platform.python_version(),
        "setups": {k: {**v, "dtype": str(v["dtype"])} for k, v in SETUPS.items()},
        "results": {k: {str(w): b for w, b in v.items()} for k, v in results.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
