"""QSORSA end to end on CPU: surgery, save/load, merge, PEFT export, regularizer."""
import peft
import torch

from sorsa_kernels import (
    QSORSALinear, QuantReport, apply_sorsa, export_peft_lora, load_adapter, merge_sorsa, save_adapter,
)
from tests.conftest import rel_err
from tests.conftest import build_tiny_llama, train_steps


def _quantized_trained(token_ids):
    model = build_tiny_llama()
    apply_sorsa(model, 8, quantize="nf4", quant_iters=2, progress=False)
    return train_steps(model, token_ids, steps=2)


def test_apply_sorsa_nf4_replaces_every_projection(token_ids):
    model = build_tiny_llama()
    apply_sorsa(model, 8, quantize="nf4", progress=False)
    layers = [m for m in model.modules() if isinstance(m, QSORSALinear)]
    assert len(layers) == 14
    total = QuantReport.from_model(model).total()
    assert total["fro"] < total["fro_nf4"]  # the split beats quantizing W0 directly


def test_quantized_save_load_reproduces_logits_exactly(token_ids, tmp_path):
    model = _quantized_trained(token_ids)
    save_adapter(model, tmp_path)
    loaded = load_adapter(build_tiny_llama(), tmp_path)
    assert all(isinstance(loaded.get_submodule(n), QSORSALinear) for n in
               ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"))
    assert torch.equal(loaded(token_ids).logits, model(token_ids).logits)


def test_quantized_merge_keeps_logits(token_ids):
    model = _quantized_trained(token_ids)
    out = model(token_ids).logits
    merge_sorsa(model)
    assert rel_err(model(token_ids).logits, out) < 1e-5


def test_quantized_export_differs_from_training_model_only_by_quantization_error(token_ids, tmp_path):
    model = _quantized_trained(token_ids)
    out = model(token_ids).logits
    base_logits = build_tiny_llama()(token_ids).logits
    export_peft_lora(model, tmp_path)
    lora = peft.PeftModel.from_pretrained(build_tiny_llama(), tmp_path).eval()
    got = lora(token_ids).logits
    # exported LoRA on the unquantized base ≈ the quantized model, up to the NF4 error
    assert rel_err(got, out) < 0.1
    assert rel_err(got, base_logits) > 1e-3


def test_apply_sorsa_forwards_quant_report():
    """``quant_report`` reaches every layer: "fro" skips the nuclear norms, None skips the report."""
    model = apply_sorsa(build_tiny_llama(), 8, quantize="nf4", quant_report="fro", progress=False)
    reports = [m.quant_report for m in model.modules() if isinstance(m, QSORSALinear)]
    assert reports and all(r is not None and r.nuc is None and r.fro > 0 for r in reports)
    model = apply_sorsa(build_tiny_llama(), 8, quantize="nf4", quant_report="full", progress=False)
    assert all(m.quant_report.nuc is not None for m in model.modules() if isinstance(m, QSORSALinear))
    model = apply_sorsa(build_tiny_llama(), 8, quantize="nf4", quant_report=None, progress=False)
    assert all(m.quant_report is None for m in model.modules() if isinstance(m, QSORSALinear))
