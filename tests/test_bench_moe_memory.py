"""bench/moe_memory.py: per-GPU bytes of a MoE model read from fully_shard over a fake process group."""
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs torch.distributed")

E, H, I, L, R = 4, 32, 24, 2, 8  # experts, hidden, moe intermediate, layers, rank
TINY = dict(hidden_size=H, intermediate_size=48, moe_intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_experts=E, num_experts_per_tok=2, vocab_size=128,
            max_position_embeddings=64, tie_word_embeddings=False)
ATTN = [(H, 32), (H, 16), (H, 16), (32, H)]  # (in, out) of q, k, v, o
EXPERTS = [(H, 2 * I), (I, H)]  # (in, out) of gate_up_proj, down_proj


@pytest.fixture(scope="module")
def results():
    from bench import moe_memory

    setups = {k: {**v, "rank": R} for k, v in moe_memory.SETUPS.items() if k.endswith("r16")}
    return moe_memory.measure(worlds=(1, 2), setups=setups, model_cfg=TINY)


def test_qsorsa_expert_storage_adapters_and_optimizer_state_halve_from_one_to_two_gpus(results):
    one, two = results["qsorsa-r16"][1], results["qsorsa-r16"][2]
    for key in ("frozen", "adapters", "grads", "adamw"):
        assert two[key] * 2 == one[key], key


def test_qsorsa_single_gpu_figures_match_the_layer_shapes(results):
    one = results["qsorsa-r16"][1]
    weights = sum(n * m for n, m in ATTN) + E * sum(n * m for n, m in EXPERTS)
    assert one["frozen"] == L * weights // 2  # 4 bits per weight
    factors = sum(R * (n + m) + R for n, m in ATTN) + E * sum(R * (n + m) + R for n, m in EXPERTS)
    assert one["adapters"] == L * 4 * factors  # fp32 U, S, V
    assert one["adamw"] == 2 * one["adapters"]


def test_peft_target_parameters_keep_bf16_experts_with_a_lora_per_expert(results):
    one = results["qlora-peft-r16"][1]
    packed_attn = sum(n * m for n, m in ATTN) // 2
    assert one["frozen"] == L * (packed_attn + 2 * E * sum(n * m for n, m in EXPERTS))  # experts stay bf16
    lora = sum(R * (n + m) for n, m in ATTN) + sum(R * E * (n + m) for n, m in EXPERTS)
    assert one["adapters"] == L * 4 * lora
    nf4 = results["qlora-peft-nf4-experts-r16"]
    assert nf4[2]["quant_state"] == nf4[1]["quant_state"] > 0  # bitsandbytes' QuantState is replicated


def test_qsorsa_needs_less_than_qlora_with_bf16_experts(results):
    total = lambda b: b["frozen"] + b["quant_state"] + b["adapters"] + b["adamw"]  # noqa: E731
    assert total(results["qsorsa-r16"][1]) < total(results["qlora-peft-r16"][1])
