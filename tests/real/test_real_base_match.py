"""Issue 29, item 10 on real weights: SmolLM2-135M with a small (lr-1e-5 sized) update merged in is
refused as the base of its adapter; the untouched base, also in bfloat16, is accepted."""
import copy

import pytest
import torch

TARGETS = r"model\.layers\.(0|29)\.self_attn\.(q|v)_proj"


@pytest.fixture(scope="module")
def small_update(smollm2, tmp_path_factory):
    from sorsa_kernels import apply_sorsa, save_adapter
    from sorsa_kernels.adapters.surgery import sorsa_layers

    model = apply_sorsa(copy.deepcopy(smollm2[0]), 8, TARGETS, progress=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ~20 Adam steps at lr 1e-5 per factor entry
        for layer in sorsa_layers(model).values():
            for p in (layer.U, layer.S, layer.V):
                p.add_(2e-4 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("real_base_match") / "adapter"
    save_adapter(model, folder)
    return model, folder


def test_smollm2_with_a_small_update_merged_in_is_refused(small_update):
    from sorsa_kernels import load_adapter, merge_sorsa
    from sorsa_kernels.adapters.base_match import BaseMismatchError

    model, folder = small_update
    with pytest.raises(BaseMismatchError, match=r"holds the adapter's own update .*already merged"):
        load_adapter(merge_sorsa(copy.deepcopy(model)), folder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_smollm2_base_of_an_adapter_with_a_small_update_is_accepted(small_update, smollm2, dtype):
    from sorsa_kernels import load_adapter

    load_adapter(copy.deepcopy(smollm2[0]).to(dtype), small_update[1])
