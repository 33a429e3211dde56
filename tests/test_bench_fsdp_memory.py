"""bench/fsdp_memory.py: per-rank bytes read from fully_shard over a fake process group."""
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs torch.distributed")

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
SHAPES = [(64, 64)] * 4 + [(64, 96), (64, 96), (96, 64)]  # (in, out) of q,k,v,o,gate,up,down


@pytest.fixture(scope="module")
def results():
    from bench import fsdp_memory

    setups = {k: {**v, "rank": 8} for k, v in fsdp_memory.SETUPS.items()}
    return fsdp_memory.measure(worlds=(1, 2), setups=setups, model_cfg=TINY)


def test_qsorsa_storage_adapters_and_optimizer_state_halve_from_one_to_two_ranks(results):
    one, two = results["qsorsa-r128"][1], results["qsorsa-r128"][2]
    for key in ("residual", "adapters", "grads", "adamw"):
        assert two[key] * 2 == one[key], key
    assert one["tables"] == two["tables"] > 0  # replicated code tables


def test_qsorsa_single_rank_figures_match_the_layer_shapes(results):
    one = results["qsorsa-r128"][1]
    assert one["residual"] == 2 * sum(n * m for n, m in SHAPES) // 2          # 4 bits per weight, 2 layers
    assert one["adapters"] == 2 * sum(4 * (8 * (n + m) + 8) for n, m in SHAPES)  # fp32 U, S, V
    assert one["adamw"] == 2 * one["adapters"]


def test_qlora_quant_state_is_replicated_and_its_packed_weight_sharded(results):
    one, two = results["fsdp-qlora-r64-fp32"][1], results["fsdp-qlora-r64-fp32"][2]
    assert two["quant_state"] == one["quant_state"] > 0
    assert two["residual"] * 2 == one["residual"]
    answerai = results["fsdp-qlora-answerai"][1]  # bf16 LoRA on six projections (no o_proj)
    assert answerai["adapters"] == 2 * sum(2 * 8 * (n + m) for n, m in SHAPES[:3] + SHAPES[4:])
