"""Targets per architecture, ``all-linear``, GPT-2 ``Conv1D``, trainable heads, the adaptation summary."""
import gc
import json
import logging
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from sorsa_kernels import (  # noqa: E402
    QSORSALinear,
    SORSALinear,
    adaptation_summary,
    apply_sorsa,
    export_peft_lora,
    load_adapter,
    merge_sorsa,
    save_adapter,
)
from sorsa_kernels.adapters.adapter_io import AdapterError  # noqa: E402
from sorsa_kernels.adapters.modules_to_save import SavedModule  # noqa: E402
from sorsa_kernels.adapters.surgery import find_targets, sorsa_layers  # noqa: E402
from sorsa_kernels.adapters.targets import infer_task_type  # noqa: E402

IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32, **IDS)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert_cls(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=64, max_position_embeddings=32, num_labels=3, **IDS)
    return transformers.BertForSequenceClassification(cfg).eval()


def _ids():
    return torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ targets
def test_unknown_model_type_without_targets_is_an_error_naming_all_linear_and_the_linear_layers():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    model.add_module("proj", torch.nn.Linear(8, 4))
    with pytest.raises(ValueError) as e:
        apply_sorsa(model, 2, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "target_modules='all-linear'" in msg and "0, proj" in msg


def test_all_linear_adapts_every_linear_but_the_output_head():
    model = _gpt2()
    names = find_targets(model, "all-linear")
    assert "lm_head" not in names and len(names) == 4  # c_attn, c_proj (attn), c_fc, c_proj (mlp)
    assert find_targets(model, ["all-linear"]) == names  # as the CLI passes it


def test_default_targets_follow_model_type():
    assert [n.rsplit(".", 1)[-1] for n in find_targets(_gpt2())] == ["c_attn", "c_proj", "c_fc", "c_proj"]
    assert not any("pooler" in n or "classifier" in n for n in find_targets(_bert_cls()))


# ------------------------------------------------------------------ Conv1D
def test_conv1d_becomes_a_fan_in_fan_out_layer_and_its_weight_is_released():
    model = _gpt2()
    ref = weakref.ref(model.transformer.h[0].attn.c_attn.weight)
    x = _ids()
    with torch.no_grad():
        before = model(x).logits
    apply_sorsa(model, 4, progress=False)
    gc.collect()
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, SORSALinear) and layer.fan_in_fan_out
    assert ref() is None  # no second (transposed) copy of the weight stays alive
    assert layer.residual.shape == (96, 32) and layer.residual.is_contiguous()
    with torch.no_grad():
        assert (model(x).logits - before).abs().max() < 1e-5


def test_conv1d_layer_merges_back_into_a_conv1d():
    c = Conv1D(24, 16)
    torch.nn.init.normal_(c.bias)
    layer = SORSALinear.from_linear(c, 4)
    with torch.no_grad():
        layer.S.mul_(1.5)
    x = torch.randn(3, 16)
    merged = layer.merge()
    assert isinstance(merged, Conv1D) and merged.weight.shape == (16, 24)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


def test_conv1d_qsorsa_layer_merges_back_into_a_conv1d():
    c = Conv1D(64, 64)
    layer = QSORSALinear.from_linear(c, 4, quant_report=None)
    x = torch.randn(3, 64)
    assert layer.fan_in_fan_out and isinstance(layer.merge(), Conv1D)
    torch.testing.assert_close(layer.merge()(x), layer(x), rtol=1e-4, atol=1e-4)


def test_conv1d_adapter_records_fan_in_fan_out_and_refuses_a_linear_base(tmp_path):
    model = apply_sorsa(_gpt2(), 4, progress=False)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert all(lc["fan_in_fan_out"] for lc in cfg["layers"].values())
    base = _gpt2()
    name = "transformer.h.0.attn.c_attn"
    lin = torch.nn.Linear(32, 96)
    base.set_submodule(name, lin)
    with pytest.raises(AdapterError, match=f"layer {name} is an nn.Linear but the adapter was trained on a Conv1D"):
        load_adapter(base, tmp_path)


def test_conv1d_peft_export_sets_fan_in_fan_out(tmp_path):
    export_peft_lora(apply_sorsa(_gpt2(), 4, progress=False), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["task_type"] == "CAUSAL_LM"


# ------------------------------------------------------------------ trainable heads
def test_classification_head_is_kept_as_a_trainable_copy_by_default():
    model = apply_sorsa(_bert_cls(), 4, progress=False)
    assert isinstance(model.classifier, SavedModule)
    assert all(p.requires_grad for p in model.classifier.trained.parameters())
    assert not any(p.requires_grad for p in model.classifier.original.parameters())
    assert model.classifier.out_features == 3  # attributes read through to the copy


def test_modules_to_save_empty_keeps_the_head_frozen():
    model = apply_sorsa(_bert_cls(), 4, progress=False, modules_to_save=[])
    assert isinstance(model.classifier, torch.nn.Linear) and not model.classifier.weight.requires_grad


def test_modules_to_save_naming_no_module_is_an_error():
    with pytest.raises(ValueError, match="modules_to_save 'head' matches no module of the model"):
        apply_sorsa(_bert_cls(), 4, progress=False, modules_to_save=["head"])


def _train_head(model):
    with torch.no_grad():
        model.classifier.trained.weight.add_(1.0)
        for layer in sorsa_layers(model).values():
            layer.S.mul_(1.1)


def test_saved_head_round_trips_through_the_adapter_and_merges(tmp_path):
    model = apply_sorsa(_bert_cls(), 4, progress=False)
    _train_head(model)
    x = _ids()
    with torch.no_grad():
        want = model(x).logits
    save_adapter(model, tmp_path)
    loaded = load_adapter(_bert_cls(), tmp_path)
    assert isinstance(loaded.classifier, SavedModule)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want)
        merged = merge_sorsa(loaded)
        assert isinstance(merged.classifier, torch.nn.Linear)
        torch.testing.assert_close(merged(x).logits, want, rtol=1e-5, atol=1e-5)


def test_saved_head_of_another_shape_is_refused_before_the_model_changes(tmp_path):
    save_adapter(apply_sorsa(_bert_cls(), 4, progress=False), tmp_path)
    base = _bert_cls()
    base.classifier = torch.nn.Linear(32, 5)
    with pytest.raises(AdapterError, match=r"saved module classifier\.bias has shape \(3,\) but the base model.s"):
        load_adapter(base, tmp_path)
    assert not sorsa_layers(base)


def test_peft_export_of_a_classifier_is_seq_cls_with_the_trained_head(tmp_path):
    peft = pytest.importorskip("peft")
    model = apply_sorsa(_bert_cls(), 4, progress=False)
    _train_head(model)
    x = _ids()
    with torch.no_grad():
        want = model(x).logits
    export_peft_lora(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    lora = peft.PeftModel.from_pretrained(_bert_cls(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(x).logits, want, rtol=1e-5, atol=1e-5)


def test_task_type_is_inferred_from_the_model_class():
    assert infer_task_type(_gpt2()) == "CAUSAL_LM"
    assert infer_task_type(_bert_cls()) == "SEQ_CLS"
    assert infer_task_type(_bert_cls().bert) == "FEATURE_EXTRACTION"
    assert infer_task_type(torch.nn.Linear(2, 2)) is None


# ------------------------------------------------------------------ summary
def test_summary_counts_layers_parameters_and_what_was_left(caplog):
    with caplog.at_level(logging.INFO, logger="sorsa_kernels"):
        model = apply_sorsa(_gpt2(), 4, progress=False)
    s = adaptation_summary(model)
    assert s.layers == {"attn.c_attn": 1, "attn.c_proj": 1, "mlp.c_fc": 1, "mlp.c_proj": 1}
    assert s.trainable_parameters == sum(p.numel() for l in sorsa_layers(model).values() for p in l.adapter_parameters())
    assert s.not_adapted == ["lm_head"] and not s.fused_experts
    assert s.line() in caplog.text and "\n" not in s.line() and "not adapted: 1 linear (lm_head)" in s.line()
    assert s.details() == ["not adapted (linear): lm_head"]


def _mixtral(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=64, num_local_experts=2, **IDS)
    return transformers.MixtralForCausalLM(cfg).eval()


def test_summary_lists_adapted_experts_as_adapted():
    model = apply_sorsa(_mixtral(), 4, progress=False)  # the default targets of mixtral include the experts
    s = adaptation_summary(model)
    assert s.layers["mlp.experts.gate_up_proj"] == 1 and s.layers["mlp.experts.down_proj"] == 1
    experts = model.model.layers[0].mlp.experts
    expert_params = sum(p.numel() for m in (experts.gate_up_proj, experts.down_proj) for p in m.adapter_parameters())
    linear_params = sum(p.numel() for l in sorsa_layers(model).values() for p in l.adapter_parameters())
    assert s.trainable_parameters == linear_params + expert_params and expert_params > 0
    assert not s.fused_experts and "fused expert" not in s.line() and "mlp.experts.down_proj×1" in s.line()


def test_summary_reports_experts_left_out_of_the_targets_as_not_adapted():
    s = adaptation_summary(apply_sorsa(_mixtral(), 4, target_modules=["q_proj", "v_proj"], progress=False))
    assert s.fused_experts == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    assert "2 fused expert parameters" in s.line() and not any("experts" in r for r in s.layers)


def test_all_linear_leaves_fused_experts_frozen():  # as PEFT's all-linear: linear modules only
    s = adaptation_summary(apply_sorsa(_mixtral(), 4, target_modules="all-linear", progress=False))
    assert len(s.fused_experts) == 2 and not any("experts" in r for r in s.layers)


def test_experts_inside_modules_to_save_are_not_adapted():
    model = apply_sorsa(_mixtral(), 4, modules_to_save=["model.layers.0.mlp"], progress=False)
    assert isinstance(model.model.layers[0].mlp, SavedModule)
    s = adaptation_summary(model)
    assert not any("experts" in r for r in s.layers) and not s.fused_experts  # trained as part of the copy


# ------------------------------------------------------------------ adapter file fields
def _edit_config(directory, edit):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = directory / "adapter.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["sorsa_config"])
    edit(cfg)
    save_file(load_file(path), path, metadata={**meta, "sorsa_config": json.dumps(cfg)})
    (directory / "adapter_config.json").unlink()


def test_adapter_with_non_boolean_fan_in_fan_out_is_refused(tmp_path):
    save_adapter(apply_sorsa(_gpt2(), 4, progress=False), tmp_path)
    name = "transformer.h.0.attn.c_attn"
    _edit_config(tmp_path, lambda c: c["layers"][name].update(fan_in_fan_out="yes"))
    with pytest.raises(AdapterError, match=f"layer {name}: fan_in_fan_out must be true or false, got 'yes'"):
        load_adapter(_gpt2(), tmp_path)


def test_adapter_with_malformed_modules_to_save_is_refused(tmp_path):
    save_adapter(apply_sorsa(_bert_cls(), 4, progress=False), tmp_path)
    _edit_config(tmp_path, lambda c: c.update(modules_to_save=["classifier"]))
    with pytest.raises(AdapterError, match="modules_to_save must be an object of module name"):
        load_adapter(_bert_cls(), tmp_path)


# ---- issue 29 item 23: all-linear on MoE models, and the command line's words for the unknown architecture
def _qwen2_moe(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2MoeConfig(hidden_size=32, intermediate_size=24, moe_intermediate_size=20,
                                      shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      vocab_size=64, **IDS)
    return transformers.Qwen2MoeForCausalLM(cfg).eval()


def test_all_linear_on_qwen2_moe_leaves_the_shared_expert_gate_out():
    model = apply_sorsa(_qwen2_moe(), 4, target_modules="all-linear", progress=False)
    s = adaptation_summary(model)
    assert "model.layers.0.mlp.shared_expert_gate" in s.not_adapted
    assert s.layers["mlp.shared_expert.gate_proj"] == 1 and s.adapted == 7  # q k v o + shared gate/up/down


def test_all_linear_skips_a_layer_smaller_than_the_rank_and_says_so(caplog):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with caplog.at_level(logging.INFO, logger="sorsa_kernels"):
        apply_sorsa(model, 4, target_modules="all-linear", progress=False)
    assert isinstance(model[0], SORSALinear) and isinstance(model[2], torch.nn.Linear)
    assert "not adapted: 2 (its smaller side 2 is below rank 4)" in caplog.text
    s = adaptation_summary(model)
    assert s.below_rank == ["2"] and "1 linear smaller than the rank (2)" in s.line()


def test_named_layer_smaller_than_the_rank_is_still_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with pytest.raises(ValueError, match="rank 4 exceeds min.* = 2 for layer 2"):
        apply_sorsa(model, 4, target_modules=["0", "2"], progress=False)


def test_unknown_model_type_on_the_command_line_says_target_modules_flag():
    from sorsa_kernels.cli import _one_line
    from sorsa_kernels.jobs.finetune.config import FinetuneConfig
    from sorsa_kernels.jobs.finetune.model import apply_config_sorsa

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError) as e:
        apply_config_sorsa(model, FinetuneConfig().resolved())
    line = _one_line(e.value)
    assert "pass --target-modules all-linear or names of its linear layers: 0" in line
    assert "target_modules=" not in line and "\n" not in line


def test_all_linear_beside_names_on_the_command_line_is_refused_before_loading(no_model_load, capsys):
    from sorsa_kernels.cli import main

    assert main(["finetune", "--target-modules", "all-linear", "q_proj"]) == 1
    err = capsys.readouterr().err
    assert "--target-modules all-linear q_proj: all-linear must stand alone" in err and not no_model_load
