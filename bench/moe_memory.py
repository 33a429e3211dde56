"""Per-GPU bytes of a Qwen3-30B-A3B-shaped MoE under FSDP2: QSORSA (r=16/64) vs QLoRA with PEFT ``target_parameters``.

A Qwen3-MoE model with Qwen3-30B-A3B's shape (48 layers, hidden 2048, 32 query / 4 key-value heads
of 128, 128 routed experts of intermediate 768 per layer, top-8, vocab 151936) is built on the meta
device, its adapted weights replaced by shape-only modules, then sharded with ``fully_shard`` (each
decoder layer, then the root) over a *fake* process group of world size 1, 2, 4 and 8, as
``bench/fsdp_memory.py`` does: nothing is allocated, no GPU is needed.  Every figure is read from
the local shards FSDP2 made on rank 0 (the larger shard when a size does not divide), plus the
replicated buffers:

* frozen base — the packed 4-bit codes (NF4), or a bf16 weight left unquantized;
* quant state — absmax codes + nested absmax, with the code tables and offsets;
* adapters — the trainable factors; grads — one gradient per trainable shard, in its dtype;
* AdamW — ``exp_avg`` and ``exp_avg_sq`` per trainable shard, in the parameter's dtype.

Compared setups (adapters, grads and AdamW state fp32 in all, PEFT's default adapter dtype):

``qsorsa-r16`` / ``qsorsa-r64``
    This package: ``apply_sorsa(model, r, quantize="nf4")`` with the default targets of
    ``qwen3_moe`` — ``QSORSALinear`` on q,k,v,o and ``QSORSAExperts`` on every layer's routed
    experts (``gate_up_proj`` E×1536×2048 and ``down_proj`` E×2048×768, each expert's residual
    NF4, packed bytes and absmax stacks sharded by FSDP2 on the expert dimension).
``qlora-peft-r16`` / ``qlora-peft-r64``
    QLoRA as ``transformers`` 5.24 + PEFT 0.21 build it: ``BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`` replaces the ``nn.Linear`` layers
    (q,k,v,o) by ``Linear4bit``, whose ``QuantState`` is not a parameter (every rank keeps all of
    it); the fused expert weights are 3-D parameters, which ``replace_with_bnb_linear`` does not
    touch, so they stay **bf16** (sharded).  LoRA on q,k,v,o (``target_modules``) and on
    ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj`` (``target_parameters``:
    ``lora_A`` (r·E)×in, ``lora_B`` out×(r·E) per projection).
``qlora-peft-nf4-experts-r16`` / ``-r64``
    The same LoRA if the expert stacks *were* NF4 as well (bitsandbytes storage, QuantState
    replicated): a lower bound for a QLoRA that quantized experts, which the libraries do not do today.

Not counted: the rest of the model (bf16 embeddings, head, norms, routers; the same in every setup),
activations, FSDP's all-gather buffers, and PEFT's transient: its ``ParamWrapper`` forms
``W + ΔW`` for the whole expert stack of a projection in every forward (reported as a separate
column: one projection's E×m×n bf16 tensor), which SORSA experts never form.

Run: ``python -m bench.moe_memory`` (CPU, seconds) → markdown on stdout, ``bench/results/moe_memory.json``.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from torch import nn

from bench import fsdp_memory
from bench.fsdp_memory import QLoRAShape
from sorsa_kernels.memory.accounting import bytes_by_category
from sorsa_kernels.nn.qexperts import QSORSAExperts
from sorsa_kernels.nn.qlinear import QSORSALinear

QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=False)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
SETUPS = {
    "qsorsa-r16": dict(kind="qsorsa", rank=16),
    "qsorsa-r64": dict(kind="qsorsa", rank=64),
    "qlora-peft-r16": dict(kind="qlora", rank=16, nf4_experts=False),
    "qlora-peft-r64": dict(kind="qlora", rank=64, nf4_experts=False),
    "qlora-peft-nf4-experts-r16": dict(kind="qlora", rank=16, nf4_experts=True),
    "qlora-peft-nf4-experts-r64": dict(kind="qlora", rank=64, nf4_experts=True),
}
WORLDS = (1, 2, 4, 8)


class PeftExpertsShape(nn.Module):
    """One fused expert projection (E×out×in) with PEFT's ``target_parameters`` LoRA, shapes only.

    ``nf4=False``: the weight is a frozen bf16 parameter (what ``transformers`` leaves unquantized).
    ``nf4=True``: bitsandbytes NF4 storage, packed bytes a parameter, QuantState buffers (replicated).
    """

    def __init__(self, E: int, in_features: int, out_features: int, rank: int, nf4: bool) -> None:
        super().__init__()
        meta = dict(device="meta")
        numel = E * in_features * out_features
        if nf4:
            self.weight = nn.Parameter(torch.empty((numel + 1) // 2, 1, dtype=torch.uint8, **meta), requires_grad=False)
            nblocks = -(-numel // 64)
            self.register_buffer("absmax", torch.empty(nblocks, dtype=torch.uint8, **meta))
            self.register_buffer("nested_absmax", torch.empty(-(-nblocks // 256), dtype=torch.float32, **meta))
            self.register_buffer("nested_code", torch.empty(256, dtype=torch.float32, **meta))
            self.register_buffer("offset", torch.empty(1, dtype=torch.float32, **meta))
            self.register_buffer("code", torch.empty(16, dtype=torch.float32, **meta))
        else:
            self.base_weight = nn.Parameter(torch.empty(E, out_features, in_features, dtype=torch.bfloat16, **meta),
                                            requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(rank * E, in_features, dtype=torch.float32, **meta))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank * E, dtype=torch.float32, **meta))


def build(setup: dict, model_cfg: dict = QWEN3_30B_A3B) -> nn.Module:
    """The Qwen3-MoE skeleton (bf16, meta) with the setup's targets replaced by shape-only modules."""
    import transformers

    from sorsa_kernels.adapters.plan import set_submodule

    with torch.device("meta"):
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**model_cfg)).to(torch.bfloat16)
    model.requires_grad_(False)
    r = setup["rank"]
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in ATTN:
            n, m = mod.in_features, mod.out_features
            if setup["kind"] == "qsorsa":
                new = QSORSALinear(n, m, r, bias=False, residual_dtype=torch.bfloat16, device="meta")
            else:
                new = QLoRAShape(n, m, r, torch.float32)
            set_submodule(model, name, new)
        elif name.endswith("mlp.experts"):
            for attr in ("gate_up_proj", "down_proj"):
                E, m, n = getattr(mod, attr).shape
                delattr(mod, attr)
                if setup["kind"] == "qsorsa":
                    new = QSORSAExperts(E, n, m, r, residual_dtype=torch.bfloat16, device="meta")
                else:
                    new = PeftExpertsShape(E, n, m, r, setup["nf4_experts"])
                setattr(mod, attr, new)
    return model


_FROZEN = {"nf4_packed", "weight", "base_weight"}
_QUANT = {"nf4_absmax", "nf4_nested_absmax", "absmax", "nested_absmax", "nf4_code", "nf4_nested_code", "nf4_offset",
          "code", "nested_code", "offset"}


def per_rank_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes rank 0 holds for the adapted weights, by category (see the module docstring)."""
    return bytes_by_category(model, (QSORSALinear, QSORSAExperts, QLoRAShape, PeftExpertsShape),
                                         {"frozen": _FROZEN, "quant_state": _QUANT})


def peft_transient_bytes(model_cfg: dict = QWEN3_30B_A3B) -> int:
    """PEFT's per-forward ``W + ΔW`` of the larger expert projection (E×2I×H, bf16), in bytes."""
    return model_cfg["num_experts"] * 2 * model_cfg["moe_intermediate_size"] * model_cfg["hidden_size"] * 2


def measure(worlds=WORLDS, setups=SETUPS, model_cfg: dict = QWEN3_30B_A3B) -> dict[str, dict[int, dict[str, int]]]:
    """``{setup: {world: per-rank bytes}}`` from fully_shard over a fake process group."""
    return fsdp_memory.measure(worlds, setups, model_cfg, build=build, per_rank_bytes=per_rank_bytes)


def table(results, model_cfg: dict = QWEN3_30B_A3B) -> str:
    gib = 2 ** 30
    rows = ["| setup | GPUs | frozen base | quant state | adapters | grads | AdamW m,v | "
            "frozen+adapters+optimizer | with grads | + rest of model |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, by_world in results.items():
        for world, b in by_world.items():
            core = b["frozen"] + b["quant_state"] + b["adapters"] + b["adamw"]
            rows.append(
                f"| {label} | {world} | {b['frozen'] / gib:.2f} | {b['quant_state'] / gib:.3f} | "
                f"{b['adapters'] / gib:.3f} | {b['grads'] / gib:.3f} | {b['adamw'] / gib:.3f} | **{core / gib:.2f}** | "
                f"{(core + b['grads']) / gib:.2f} | {(core + b['grads'] + b['rest_of_model']) / gib:.2f} |"
            )
    return "\n".join(rows) + (
        "\n\nGiB per GPU (rank 0, the larger shard). Not counted: activations, FSDP all-gather buffers, and PEFT's "
        f"per-forward `W + ΔW` of an expert stack ({peft_transient_bytes(model_cfg) / gib:.2f} GiB bf16 for one "
        "gate_up_proj; SORSA experts never form it).")


def main() -> None:
    results = measure()
    print(table(results))
    out = Path(__file__).parent / "results" / "moe_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "what": "per-GPU bytes (rank 0) from fully_shard over a fake process group, meta device",
        "model": QWEN3_30B_A3B, "torch": torch.__version__, "python": platform.python_version(),
        "setups": SETUPS, "peft_transient_bytes": peft_transient_bytes(),
        "results": {k: {str(w): b for w, b in v.items()} for k, v in results.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
