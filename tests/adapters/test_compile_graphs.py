"""A whole adapted model compiles to one graph: SORSA linear layers and SORSA experts are custom ops
with fake kernels, so ``torch.compile`` sees one node per op and no host sync breaks the graph."""
import pytest
import torch
import transformers

import sorsa_kernels as sk


def _mixtral() -> transformers.MixtralForCausalLM:
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)).eval()


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_model_with_sorsa_linear_layers_and_experts_compiles_to_one_graph_without_breaks(quantize):
    model = sk.apply_sorsa(_mixtral(), 4, quantize=quantize, progress=False)
    roles = sk.adaptation_summary(model).layers
    assert any("experts" in r for r in roles) and any("self_attn" in r for r in roles), roles
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
