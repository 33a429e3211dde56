"""SORSA on the fused routed experts of tiny Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE models
(built from their config classes, random weights): default targets adapt the experts, logits
are unchanged by adaptation, training moves only adapter factors, save/load and merge
reproduce the logits."""
from __future__ import annotations

import logging

import pytest
import torch
import transformers

from sorsa_kernels import apply_sorsa, load_adapter, merge_sorsa, save_adapter
from sorsa_kernels.adapters.experts import adapted_experts, find_fused_experts, is_fused_experts
from sorsa_kernels.nn.experts import SORSAExperts
from sorsa_kernels.nn.qexperts import QSORSAExperts
from sorsa_kernels.ops import reference
from tests.conftest import rel_err
from tests.conftest import fresh_copy, train_steps

_COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64)
ARCHS = {
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **_COMMON)),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        intermediate_size=24, moe_intermediate_size=20, shared_expert_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, **_COMMON)),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        intermediate_size=24, moe_intermediate_size=20, num_experts=4, num_experts_per_tok=2, head_dim=8, **_COMMON)),
    "olmoe": lambda: transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        intermediate_size=24, num_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1,
        bos_token_id=None, **_COMMON)),
}


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = ARCHS[arch]().eval()
    with torch.no_grad():  # routers start at zero in some classes: give every layer a real routing
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    return model


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_targets_adapt_experts_and_keep_logits(arch, ids):
    model = build(arch)
    want = model(ids).logits
    apply_sorsa(model, rank=4, alpha=8.0, progress=False)
    experts = adapted_experts(model)
    assert sorted(experts) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for module in experts.values():
        assert isinstance(module.gate_up_proj, SORSAExperts) and isinstance(module.down_proj, SORSAExperts)
    assert rel_err(model(ids).logits, want) < 1e-5


@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_changes_only_adapter_parameters(arch, ids):
    model = apply_sorsa(build(arch), rank=4, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, ids, steps=2)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved <= trainable
    assert all(n.rsplit(".", 1)[-1] in ("U", "S", "V") for n in trainable)
    assert any(".experts.gate_up_proj." in n for n in moved) and any(".experts.down_proj." in n for n in moved)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_load_reproduces_logits_without_svd(arch, ids, tmp_path, monkeypatch):
    model = train_steps(apply_sorsa(build(arch), rank=4, alpha=8.0, progress=False), ids, steps=2)
    want = model(ids).logits
    save_adapter(model, tmp_path)

    def no_svd(*a, **k):
        raise AssertionError("load_adapter ran an SVD")

    monkeypatch.setattr(reference, "principal_split", no_svd)
    loaded = load_adapter(build(arch), tmp_path)
    assert sorted(adapted_experts(loaded)) == sorted(adapted_experts(model))
    assert torch.equal(loaded(ids).logits, want)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_puts_fused_weights_back_and_reproduces_logits(arch, ids):
    model = train_steps(apply_sorsa(build(arch), rank=4, progress=False), ids, steps=2)
    want = model(ids).logits
    merge_sorsa(model)
    assert not adapted_experts(model)
    for name in find_fused_experts(model):
        module = model.get_submodule(name)
        assert is_fused_experts(module) and "forward" not in module.__dict__
    assert rel_err(model(ids).logits, want) < 1e-5


def test_experts_alone_by_name(ids):
    model = build("mixtral")
    apply_sorsa(model, rank=3, target_modules=["experts"], progress=False)
    assert len(adapted_experts(model)) == 2
    assert not any(type(m).__name__ == "SORSALinear" for m in model.modules())


def test_adapting_twice_is_refused():
    model = apply_sorsa(build("olmoe"), rank=2, progress=False)
    with pytest.raises(ValueError, match="already adapted: model.layers.0.mlp.experts holds SORSA experts"):
        apply_sorsa(model, rank=2, progress=False)


def test_rank_above_expert_size_names_the_projection():
    with pytest.raises(ValueError, match="rank 21 exceeds .* = 20 for layer model.layers.0.mlp.experts.down_proj"):
        apply_sorsa(build("qwen3_moe"), rank=21, target_modules=["experts"], progress=False)


def test_quantized_default_targets_adapt_experts_as_qsorsa_experts(ids):
    model = build("mixtral")
    want = model(ids).logits
    apply_sorsa(model, rank=2, quantize="nf4", quant_report=None, progress=False)
    experts = adapted_experts(model)
    assert len(experts) == 2
    for module in experts.values():
        assert isinstance(module.gate_up_proj, QSORSAExperts) and isinstance(module.down_proj, QSORSAExperts)
    assert 0 < rel_err(model(ids).logits, want) < 0.25  # the NF4 error of the residuals (random tiny weights)


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
def test_qsorsa_experts_save_load_and_merge_reproduce_logits(arch, ids, tmp_path):
    base = build(arch)
    model = apply_sorsa(fresh_copy(base), rank=2, quantize="nf4", quant_iters=1, quant_report=None, progress=False)
    train_steps(model, ids, steps=2)
    want = model(ids).logits
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(fresh_copy(base), tmp_path / "a")
    assert all(isinstance(getattr(m, "down_proj"), QSORSAExperts) for m in adapted_experts(loaded).values())
    assert torch.equal(loaded(ids).logits, want)
    merged = merge_sorsa(loaded)
    assert not adapted_experts(merged) and all(is_fused_experts(m) for m in (
        merged.get_submodule(n) for n in find_fused_experts(merged)))
    assert rel_err(merged(ids).logits, want) < 1e-5


def test_loading_qsorsa_experts_runs_no_svd(ids, tmp_path, monkeypatch):
    model = apply_sorsa(build("mixtral"), rank=2, quantize="nf4", quant_report=None, progress=False)
    save_adapter(model, tmp_path / "a")
    monkeypatch.setattr(reference, "principal_split", lambda *a, **k: pytest.fail("SVD on load"))
    load_adapter(build("mixtral"), tmp_path / "a")


def test_dropout_with_default_targets_leaves_experts_frozen_with_a_warning(caplog):
    model = build("mixtral")
    with caplog.at_level(logging.WARNING):
        apply_sorsa(model, rank=2, dropout=0.1, progress=False)
    assert not adapted_experts(model) and len(find_fused_experts(model)) == 2
    assert "routed experts (2 modules) left frozen" in caplog.text and "dropout=0.1" in caplog.text


def test_dropout_on_experts_by_name_is_an_error():
    with pytest.raises(ValueError, match="dropout=0.1 is not supported on expert weights"):
        apply_sorsa(build("mixtral"), rank=2, target_modules=["experts"], dropout=0.1, progress=False)


def test_adapted_model_deep_copies(ids):
    model = apply_sorsa(build("qwen2_moe"), rank=2, progress=False)
    assert torch.equal(fresh_copy(model)(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_export_of_experts_loads_in_peft_on_target_parameters_and_reproduces_logits(arch, ids, tmp_path):
    import json

    peft = pytest.importorskip("peft")
    from sorsa_kernels import export_peft_lora

    base = build(arch)
    model = train_steps(apply_sorsa(fresh_copy(base), rank=2, alpha=4.0, progress=False), ids, steps=2)
    export_peft_lora(model, tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                        for p in ("down_proj", "gate_up_proj")]
    lora = peft.PeftModel.from_pretrained(fresh_copy(base), tmp_path / "lora").eval()
    want = model(ids).logits
    assert rel_err(want, base(ids).logits) > 1e-3  # training moved the logits: the check below can fail
    assert rel_err(lora(ids).logits, want) < 1e-5


def test_peft_export_of_experts_at_another_rank_names_merge(tmp_path):
    from sorsa_kernels import export_peft_lora

    model = apply_sorsa(build("mixtral"), rank=2, progress=False)
    model.model.layers[0].self_attn.q_proj.rank = 3  # as if the dense layers had another rank
    with pytest.raises(ValueError, match=r"SORSA experts .*gate_up_proj have rank 2 but other layers rank 3.*merge_sorsa"):
        export_peft_lora(model, tmp_path / "lora")


def test_triton_backend_trains_experts_like_the_reference(ids, backend):
    pytest.importorskip("triton")

    def grads(path):
        backend(path)
        model = apply_sorsa(build("qwen3_moe"), rank=3, target_modules=["experts"], progress=False)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    want_loss, want = grads("reference")
    loss, got = grads("triton")
    assert rel_err(loss, want_loss) < 1e-5
    assert sorted(got) == sorted(want)
    for n in want:
        assert rel_err(got[n], want[n]) < 1e-4, n


# ---- issue 24's guarantees on expert weights: the base they were fitted to, finite merges
def _trained_mixtral(ids, tmp_path):
    model = train_steps(apply_sorsa(build("mixtral"), rank=4, alpha=8.0, progress=False), ids, steps=2)
    save_adapter(model, tmp_path / "adapter")
    return model


def test_load_adapter_refuses_a_base_whose_experts_hold_the_merged_update(ids, tmp_path):
    model = _trained_mixtral(ids, tmp_path)
    merged = merge_sorsa(fresh_copy(model))
    with torch.no_grad():  # only the experts differ from the true base: the attention rows match
        base = build("mixtral")
        for (name, p), (_, q) in zip(base.named_parameters(), merged.named_parameters()):
            if ".experts." in name:
                p.copy_(q)
    with pytest.raises(ValueError, match=r"not fitted to this base: layer model\.layers\.\d\.mlp\.experts\."
                                         r"(gate_up_proj|down_proj)\[expert \d\]"):
        load_adapter(base, tmp_path / "adapter")
    assert not adapted_experts(base)
    load_adapter(base, tmp_path / "adapter", allow_base_mismatch=True)  # on purpose: allowed
    assert adapted_experts(base)


def test_merge_sorsa_refuses_a_nan_expert_factor_and_leaves_the_model_adapted(ids, tmp_path):
    model = _trained_mixtral(ids, tmp_path)
    experts = adapted_experts(model)
    with torch.no_grad():
        experts["model.layers.1.mlp.experts"].down_proj.U[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.down_proj"):
        merge_sorsa(model)
    assert sorted(adapted_experts(model)) == sorted(experts)  # no experts module merged
    assert any(isinstance(m, torch.nn.Module) and type(m).__name__ == "SORSALinear" for m in model.modules())
    merge_sorsa(model, allow_non_finite=True)  # on purpose: allowed
    assert not adapted_experts(model)


# ---- issue 29 item 18: apply_sorsa is all or nothing for experts too
def _state(model):
    return {n: (type(m), m.__dict__.get("forward")) for n, m in model.named_modules()}


def test_nan_in_layer_1_experts_leaves_layer_0_experts_unadapted(ids):
    model = build("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")
    before = _state(model)
    with pytest.raises(ValueError, match=r"weight contains NaN values for layer model\.layers\.1\.mlp\.experts\."
                                         r"down_proj"):
        apply_sorsa(model, rank=2, progress=False)
    assert not adapted_experts(model) and _state(model) == before
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = 0.0
    apply_sorsa(model, rank=2, progress=False)  # a retry is not "already adapted"
    assert len(adapted_experts(model)) == 2


def test_a_failure_while_adapting_layer_1_experts_restores_everything(ids, monkeypatch):
    model = build("qwen2_moe")
    want = model(ids).logits
    before, params = _state(model), dict(model.named_parameters())
    real = SORSAExperts.from_weight.__func__
    calls = []

    def flaky(cls, weight, rank, **kw):
        calls.append(kw.get("name"))
        if len(calls) == 3:  # layer 1's gate_up_proj: layer 0's experts are already adapted
            raise RuntimeError("out of memory")
        return real(cls, weight, rank, **kw)

    monkeypatch.setattr(SORSAExperts, "from_weight", classmethod(flaky))
    with pytest.raises(RuntimeError, match="out of memory"):
        apply_sorsa(model, rank=2, progress=False)
    assert calls[-1] == "model.layers.1.mlp.experts.gate_up_proj"
    assert not adapted_experts(model) and _state(model) == before
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] and p.requires_grad for n, p in model.named_parameters())
    assert torch.equal(model(ids).logits, want)
