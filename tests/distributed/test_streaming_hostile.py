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
