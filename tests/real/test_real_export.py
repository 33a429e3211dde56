"""Merge and PEFT LoRA export parity on SmolLM2-135M after a few training steps (adapters on two layers)."""
import copy

import pytest
import torch

from tests.conftest import rel_err
from tests.conftest import train_steps

TARGETS = r"model\.layers\.(0|29)\..*_proj"


@pytest.fixture(scope="module")
def trained(smollm2):
    from sorsa_kernels import apply_sorsa

    base, tokenizer = smollm2
    model = apply_sorsa(copy.deepcopy(base), 8, TARGETS, svd="randomized", progress=False)
    ids = tokenizer(["Tom has 3 apples and buys 4 more. How many apples?"], return_tensors="pt")["input_ids"]
    train_steps(model, ids, steps=2, lr=1e-3)
    with torch.no_grad():
        return model, ids, model(ids).logits.double()


def test_merged_model_gives_the_adapted_logits(trained):
    from sorsa_kernels import merge_sorsa

    model, ids, expected = trained
    merged = merge_sorsa(copy.deepcopy(model))
    with torch.no_grad():
        assert rel_err(merged(ids).logits, expected) < 1e-5


def test_peft_lora_export_on_the_original_base_gives_the_adapted_logits(trained, smollm2, tmp_path):
    peft = pytest.importorskip("peft")
    from sorsa_kernels import export_peft_lora

    model, ids, expected = trained
    base = smollm2[0]
    export_peft_lora(model, tmp_path / "lora")
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    with torch.no_grad():
        assert rel_err(lora(ids).logits, expected) < 1e-5
        assert rel_err(base(ids).logits, expected) > 1e-4  # the training really moved the function
