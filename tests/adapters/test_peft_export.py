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
