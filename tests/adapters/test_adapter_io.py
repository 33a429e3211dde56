import json

import pytest
import torch

from sorsa_kernels import SORSALinear, apply_sorsa, load_adapter, save_adapter
from sorsa_kernels.adapters import adapter_save
from tests.conftest import build_tiny_llama, train_steps


@pytest.fixture
def trained(tiny_llama, token_ids):
    apply_sorsa(tiny_llama, 8, progress=False)
    return train_steps(tiny_llama, token_ids)


def test_save_load_reproduces_logits_exactly(trained, token_ids, tmp_path):
    save_adapter(trained, tmp_path)
    loaded = load_adapter(build_tiny_llama(), tmp_path)
    assert torch.equal(loaded(token_ids).logits, trained(token_ids).logits)


def test_load_restores_trainable_state_and_initial_factors(trained, tmp_path):
    save_adapter(trained, tmp_path)
    loaded = load_adapter(build_tiny_llama(), tmp_path)
    a = trained.get_submodule("model.layers.1.mlp.down_proj")
    b = loaded.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(b, SORSALinear) and b.U.requires_grad
    assert torch.equal(a.residual, b.residual)
    for x, y in zip(a.init_factors, b.init_factors):
        assert torch.equal(x, y)


def test_files_are_safetensors_and_json(trained, tmp_path):
    save_adapter(trained, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert len(cfg["target_modules"]) == 14 and cfg["layers"]["model.layers.0.self_attn.q_proj"]["rank"] == 8


def test_truncated_weights_file_is_rejected(trained, tmp_path):
    save_adapter(trained, tmp_path)
    w = tmp_path / "adapter.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_adapter(build_tiny_llama(), tmp_path)


def test_corrupt_config_is_rejected(trained, tmp_path):
    save_adapter(trained, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(build_tiny_llama(), tmp_path)


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(build_tiny_llama(), tmp_path)


def test_mismatched_base_model_is_rejected(trained, tmp_path):
    import transformers

    save_adapter(trained, tmp_path)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    other = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj has weight shape"):
        load_adapter(other, tmp_path)
    assert not any(isinstance(m, SORSALinear) for m in other.modules())


def test_missing_tensor_is_rejected(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    save_adapter(trained, tmp_path)
    w = tmp_path / "adapter.safetensors"
    tensors = load_file(w)
    del tensors["model.layers.0.self_attn.q_proj.V0"]
    save_file(tensors, w)
    with pytest.raises(ValueError, match="lack tensor model.layers.0.self_attn.q_proj.V0"):
        load_adapter(build_tiny_llama(), tmp_path)


def test_loading_twice_is_rejected(trained, tmp_path):
    save_adapter(trained, tmp_path)
    with pytest.raises(ValueError, match="already a SORSA layer"):
        load_adapter(trained, tmp_path)


def test_failed_save_leaves_previous_adapter_intact(trained, token_ids, tmp_path, monkeypatch):
    save_adapter(trained, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    train_steps(trained, token_ids, steps=1)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_save, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(trained, tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before


def test_save_without_adapters_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="no SORSA layers"):
        save_adapter(build_tiny_llama(), tmp_path)
