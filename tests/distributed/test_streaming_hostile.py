"""Issue 24, item 11: the streaming loader checks every tensor it reads against the model's config
(shape, floating point) and names the file and tensor in one line, instead of broadcasting a
wrong-sized norm, failing at forward on a transposed projection, or ``KeyError: 'I8'``."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from sorsa_kernels.distributed.streaming import load_sorsa_streaming

from ..conftest import build_tiny_llama


@pytest.fixture
def saved(tmp_path):
    build_tiny_llama().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _rewrite(folder, key, fn):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors[key] = fn(tensors[key]).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def test_the_untouched_checkpoint_loads(saved):
    load_sorsa_streaming(saved, 2, ["q_proj"], quantize=None)


@pytest.mark.parametrize("key, fn, message", [
    ("model.norm.weight", lambda t: t[:1], r"tensor model\.norm\.weight has shape \(1,\) but the model's config "
                                           r"needs \(64,\)"),
    ("model.layers.0.mlp.up_proj.weight", lambda t: t.T, r"tensor model\.layers\.0\.mlp\.up_proj\.weight has shape "
                                                         r"\(64, 96\) but the model's config needs \(96, 64\)"),
])
def test_a_tensor_whose_shape_disagrees_with_the_config_is_one_line(saved, key, fn, message):
    _rewrite(saved, key, fn)
    with pytest.raises(ValueError, match=message):
        load_sorsa_streaming(saved, 2, ["q_proj", "up_proj"], quantize=None)


def test_an_int8_target_weight_names_its_dtype_instead_of_a_key_error(saved):
    _rewrite(saved, "model.layers.0.self_attn.q_proj.weight", lambda t: t.to(torch.int8))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.self_attn\.q_proj\.weight is stored as I8; "
                                         r"the streaming loader reads floating-point checkpoints"):
        load_sorsa_streaming(saved, 2, ["q_proj"], quantize=None)


def test_an_int8_norm_weight_is_refused(saved):
    _rewrite(saved, "model.norm.weight", lambda t: t.to(torch.int8))
    with pytest.raises(ValueError, match=r"tensor model\.norm\.weight is torch\.int8 but the model holds a "
                                         r"floating-point tensor there"):
        load_sorsa_streaming(saved, 2, ["q_proj"], quantize=None)


# ---- issue 29 item 11: the streaming loader does not build SORSA experts, so it refuses MoE models up front
@pytest.fixture
def saved_moe(tmp_path):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=64, num_local_experts=2)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    return tmp_path / "moe"


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj"]])
def test_streaming_an_moe_model_is_refused_in_one_line_before_any_read(saved_moe, monkeypatch, targets):
    import sorsa_kernels.distributed.streaming as streaming

    monkeypatch.setattr(streaming, "_read", lambda *a: pytest.fail("a tensor was read before the refusal"))
    with pytest.raises(ValueError, match=r"^the streaming loader does not load mixture-of-experts models \(routed "
                                         r"experts model\.layers\.0\.mlp\.experts\).*call apply_sorsa$"):
        load_sorsa_streaming(saved_moe, 2, targets, quantize=None)


def test_streaming_takes_the_same_init_spec_as_apply_sorsa(saved):
    from sorsa_kernels.nn.init_spec import SORSAInit

    model = load_sorsa_streaming(saved, SORSAInit(rank=2, alpha=4.0), ["q_proj"])
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "SORSALinear" and layer.scale == 2.0  # the spec's quantize=None, not "nf4"
