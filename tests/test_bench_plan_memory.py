"""The memory plan's per-GPU bytes against FSDP2's own shards (bench/moe_memory.py's fully_shard over a
fake process group), and bench/plan_table.py's committed targets."""
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs torch.distributed")

TINY = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, vocab_size=128,
            max_position_embeddings=64, tie_word_embeddings=False)
R = 8


@pytest.mark.parametrize("world", [1, 2])
def test_plan_per_gpu_bytes_equal_fully_shard_local_shards(world):
    import torch
    import transformers

    from bench import moe_memory
    from sorsa_kernels.memory.plan import PlanSettings, plan_memory

    measured = moe_memory.measure(worlds=(world,), setups={"q": dict(kind="qsorsa", rank=R)}, model_cfg=TINY)["q"][world]
    config = transformers.Qwen3MoeConfig(**TINY, dtype=torch.bfloat16)
    plan = plan_memory(config, PlanSettings(rank=R, quantize="nf4", world_size=world)).components
    assert plan["frozen_base"] == measured["frozen"]
    assert plan["quant_state"] == measured["quant_state"]
    assert plan["adapters"] == measured["adapters"]
    assert plan["gradients"] == measured["grads"]
    tensors = TINY["num_hidden_layers"] * (4 + 2) * 3  # U, S, V of q, k, v, o and of the two expert stacks
    assert plan["optimizer_state"] == measured["adamw"] + 4 * tensors  # + AdamW's float32 step, which the bench omits


def test_committed_plan_table_meets_the_qwen3_target_on_one_24gb_gpu():
    rows = json.loads((Path(__file__).parents[1] / "bench" / "results" / "plan.json").read_text())["rows"]
    qwen = next(r for r in rows if r.get("target") == "Qwen3-30B-A3B")
    assert qwen["fits"] and qwen["peak_bytes"] <= 20 * 2 ** 30 and qwen["levers"]


def test_plan_vs_cuda_plans_every_case_without_a_gpu(capsys):
    from bench import plan_vs_cuda

    plan_vs_cuda.main(["--plan-only"])
    out = capsys.readouterr().out
    assert all(f"| {case} |" in out for case in plan_vs_cuda.CASES)
