import json

import peft
import pytest
import torch

from sorsa_kernels import apply_sorsa, export_peft_lora
from sorsa_kernels.adapters.peft_export import lora_factors
from tests.conftest import rel_err
from tests.conftest import build_tiny_llama, train_steps


@pytest.mark.parametrize("alpha", [None, 4.0])
def test_exported_lora_reproduces_finetuned_logits_in_peft(token_ids, tmp_path, alpha):
    model = build_tiny_llama()
    apply_sorsa(model, 8, alpha=alpha, progress=False)
    train_steps(model, token_ids, steps=4)
    expected = model(token_ids).logits
    export_peft_lora(model, tmp_path)
    lora = peft.PeftModel.from_pretrained(build_tiny_llama(), tmp_path).eval()
    got = lora(token_ids).logits
    assert rel_err(got, expected) < 1e-4
    assert rel_err(got, build_tiny_llama()(token_ids).logits) > 1e-3  # the factors really moved


def test_exported_config_is_rank_2r(token_ids, tmp_path):
    model = build_tiny_llama()
    apply_sorsa(model, 8, target_modules=["q_proj"], progress=False)
    export_peft_lora(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16 and cfg["lora_alpha"] == 16


def test_lora_factors_give_the_weight_update(token_ids):
    model = build_tiny_llama()
    apply_sorsa(model, 8, progress=False)
    train_steps(model, token_ids)
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    A, B = lora_factors(layer)
    U0, S0, V0 = layer.init_factors
    want = layer.U.detach() @ torch.diag(layer.S.detach()) @ layer.V.detach().T - U0 @ torch.diag(S0) @ V0.T
    assert A.shape == (16, 64) and B.shape == (96, 16)
    assert rel_err(B @ A, want) < 1e-5


def test_export_over_a_previous_export_replaces_it_whole(token_ids, tmp_path):
    model = build_tiny_llama()
    apply_sorsa(model, 8, progress=False)
    export_peft_lora(model, tmp_path / "lora")
    train_steps(model, token_ids, steps=2)
    expected = model(token_ids).logits
    export_peft_lora(model, tmp_path / "lora")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no temporary or old folder left
    lora = peft.PeftModel.from_pretrained(build_tiny_llama(), tmp_path / "lora").eval()
    assert rel_err(lora(token_ids).logits, expected) < 1e-4


# ---------------------------------------------------------------------- issue 29, item 21: PEFT's private expert layout
def _tiny_mixtral():
    import transformers

    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=32))


def test_export_of_experts_refuses_a_peft_older_than_the_tested_layout(tmp_path, monkeypatch):
    from sorsa_kernels.adapters import peft_export

    model = apply_sorsa(_tiny_mixtral(), 2, progress=False)
    monkeypatch.setattr(peft_export, "installed_peft_version", lambda: "0.17.0")
    with pytest.raises(ValueError, match=r"target_parameters layout, tested on peft 0\.21\.2, but peft 0\.17\.0 "
                                         r"is installed; upgrade .*merge_sorsa"):
        export_peft_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_export_without_experts_does_not_depend_on_the_peft_version(tmp_path, monkeypatch):
    from sorsa_kernels.adapters import peft_export

    monkeypatch.setattr(peft_export, "installed_peft_version", lambda: "0.13.0")
    export_peft_lora(apply_sorsa(build_tiny_llama(), 2, progress=False), tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
