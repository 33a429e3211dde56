"""``load_adapter`` goes through the surgery plan (issue 30 item 1): the file's layers are the
targets and its saved modules the ``modules_to_save``, checked before any change and applied
as one transaction.  A three-layer toy model keeps every case fast."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sorsa_kernels import SORSALinear, load_adapter, save_adapter
from sorsa_kernels.adapters import adapter_load
from sorsa_kernels.adapters.adapter_format import CONFIG_NAME, METADATA_KEY, WEIGHTS_NAME, AdapterError


def _base() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.a = nn.Linear(16, 12)
    m.b = nn.Linear(12, 10, bias=False)
    m.c = nn.Linear(10, 8)
    return m


def _adapted() -> nn.Module:
    """The base with a rank per layer (4, 3, 2) and factors moved off their initial values."""
    m = _base()
    for name, rank in (("a", 4), ("b", 3), ("c", 2)):
        setattr(m, name, SORSALinear.from_linear(getattr(m, name), rank))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (m.a, m.b, m.c):
            for p in (layer.U, layer.S, layer.V):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def _forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.c(m.b(m.a(x)))


def _state(m: nn.Module) -> tuple:
    """What a failed load must leave as it was: the modules, the tensors and the requires_grad flags."""
    return ({n: type(x) for n, x in m.named_modules()}, {k: v.clone() for k, v in m.state_dict().items()},
            {n: p.requires_grad for n, p in m.named_parameters()})


def _assert_unchanged(m: nn.Module, before: tuple) -> None:
    modules, tensors, grads = _state(m)
    assert modules == before[0]
    assert tensors.keys() == before[1].keys() and all(torch.equal(tensors[k], before[1][k]) for k in tensors)
    assert grads == before[2]


def _rewrite(folder, edit) -> None:
    """Hand-edit a saved adapter: ``edit(config, tensors)`` changes both, then both files are written again."""
    path = folder / WEIGHTS_NAME
    with safe_open(path, "pt") as f:
        config = json.loads(f.metadata()[METADATA_KEY])
    tensors = load_file(path)
    edit(config, tensors)
    save_file(tensors, path, metadata={METADATA_KEY: json.dumps(config)})
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def test_layers_of_different_ranks_in_one_file_load_exactly(tmp_path):
    trained = _adapted()
    save_adapter(trained, tmp_path)
    loaded = load_adapter(_base(), tmp_path)
    assert [loaded.a.rank, loaded.b.rank, loaded.c.rank] == [4, 3, 2]
    x = torch.randn(5, 16)
    assert torch.equal(_forward(loaded, x), _forward(trained, x))


def test_hand_edited_saved_module_naming_a_target_layer_is_refused_before_any_change(tmp_path):
    save_adapter(_adapted(), tmp_path)
    head = _base().a

    def save_target_as_head(config, tensors):
        config["modules_to_save"] = {"a": ["weight", "bias"]}
        tensors["modules_to_save/a.weight"] = head.weight.detach().clone()
        tensors["modules_to_save/a.bias"] = head.bias.detach().clone()

    _rewrite(tmp_path, save_target_as_head)
    base = _base()
    before = _state(base)
    with pytest.raises(AdapterError, match="modules_to_save 'a' overlaps the target layer a"):
        load_adapter(base, tmp_path)
    _assert_unchanged(base, before)


def test_corrupt_tensor_in_the_last_layer_leaves_the_first_layers_unchanged(tmp_path, monkeypatch):
    """A factor of the last layer that is broken after the file was validated (read back wrong, say)
    fails that layer's rebuild; the layers rebuilt before it are put back."""
    save_adapter(_adapted(), tmp_path)
    config, tensors = adapter_load.read_adapter(tmp_path)
    tensors["c.V0"] = tensors["c.V0"][:-1]  # 9 rows where the layer has 10 inputs
    monkeypatch.setattr(adapter_load, "read_adapter", lambda directory: (config, tensors))
    base = _base()
    before = _state(base)
    with pytest.raises(ValueError, match="V0"):
        load_adapter(base, tmp_path, allow_base_mismatch=True)
    _assert_unchanged(base, before)
    assert type(base.a) is nn.Linear and type(base.b) is nn.Linear


def test_corrupt_expert_tensor_puts_every_rebuilt_layer_and_experts_module_back(tmp_path, monkeypatch):
    """Experts are rebuilt in place, after the linear layers: a failure there undoes both kinds."""
    from sorsa_kernels import apply_sorsa
    from tests.adapters.test_experts_surgery import build

    save_adapter(apply_sorsa(build("mixtral"), 4, progress=False), tmp_path)
    config, tensors = adapter_load.read_adapter(tmp_path)
    last = list(config["experts"])[-1]
    tensors[f"{last}.down_proj.V0"] = tensors[f"{last}.down_proj.V0"][:, :-1]  # one input row short
    monkeypatch.setattr(adapter_load, "read_adapter", lambda directory: (config, tensors))
    base = build("mixtral")
    before = _state(base)
    with pytest.raises(ValueError):
        load_adapter(base, tmp_path, allow_base_mismatch=True)
    _assert_unchanged(base, before)
    assert all("forward" not in m.__dict__ for n, m in base.named_modules() if n.endswith("experts"))
