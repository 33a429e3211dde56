"""An adapter kind added from outside the package (issue 30, item 3).

The toy kind is SORSA plus a trainable per-output magnitude, DoRA-style: ``y = m ⊙ SORSA(x)``.
It is defined here, registered with :func:`sorsa_kernels.nn.kinds.register_kind`, and then
applied, summarised, trained, saved, loaded, merged and counted by the FSDP helpers without a
line of the package knowing it; the PEFT export refuses it by name (its update is not a LoRA).
"""
import copy

import pytest
import torch
from torch import nn

from sorsa_kernels import SORSALinear, adaptation_summary, apply_sorsa, export_peft_lora, load_adapter, merge_sorsa
from sorsa_kernels import save_adapter
from sorsa_kernels.adapters.adapter_io import AdapterError, read_adapter
from sorsa_kernels.adapters.surgery import sorsa_layers
from sorsa_kernels.distributed.fsdp import local_nbytes
from sorsa_kernels.nn.kinds import AdapterKind, building, register_kind, unregister_kind

from ..conftest import build_tiny_llama, train_steps


class MagnitudeLinear(SORSALinear):
    """SORSA with a trainable magnitude per output row: ``y = m ⊙ (x·Wrᵀ + scale·x·V·diag(S)·Uᵀ)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.magnitude = nn.Parameter(torch.ones(self.out_features, dtype=self.U.dtype, device=self.U.device))

    def _fresh_magnitude(self):
        self.magnitude = nn.Parameter(torch.ones(self.out_features, dtype=self.U.dtype, device=self.U.device))
        return self

    @classmethod
    def from_linear(cls, linear, rank, **kwargs):
        return super().from_linear(linear, rank, **kwargs)._fresh_magnitude()

    @classmethod
    def from_factors(cls, linear, U0, S0, V0, **kwargs):
        return super().from_factors(linear, U0, S0, V0, **kwargs)._fresh_magnitude()

    def forward(self, x):
        return super().forward(x) * self.magnitude.to(x.dtype)

    def merge(self, dtype=None):
        plain = super().merge(torch.float32)
        out = nn.Linear(self.in_features, self.out_features, bias=plain.bias is not None,
                        dtype=dtype or self.residual.dtype)
        with torch.no_grad():
            out.weight.copy_(plain.weight * self.magnitude.float()[:, None])
            if plain.bias is not None:
                out.bias.copy_(plain.bias * self.magnitude.float())
        return out


KIND = AdapterKind("magnitude", MagnitudeLinear, extra={"magnitude": ("out",)}, lora=False, label="SORSA+magnitude")


@pytest.fixture(autouse=True)
def toy_kind():
    register_kind(KIND)
    yield KIND
    unregister_kind(KIND)


@pytest.fixture
def adapted():
    with building("magnitude"):
        return apply_sorsa(build_tiny_llama(0), 4, progress=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_apply_sorsa_builds_the_registered_kind_and_the_summary_counts_it(adapted):
    layers = sorsa_layers(adapted)
    assert len(layers) == 14 and all(type(m) is MagnitudeLinear for m in layers.values())
    assert adaptation_summary(adapted).adapted == 14
    assert all(m.magnitude.requires_grad for m in layers.values())


def test_outside_the_building_block_apply_sorsa_builds_plain_sorsa():
    model = apply_sorsa(build_tiny_llama(0), 4, progress=False)
    assert all(type(m) is SORSALinear for m in sorsa_layers(model).values())


def test_a_training_step_moves_the_magnitude(adapted, token_ids):
    train_steps(adapted, token_ids, steps=1)
    q = adapted.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.magnitude, torch.ones_like(q.magnitude))


def test_save_then_load_rebuilds_the_kind_with_identical_logits(adapted, token_ids, tmp_path):
    train_steps(adapted, token_ids, steps=2)
    save_adapter(adapted, tmp_path / "adapter")
    config, tensors = read_adapter(tmp_path / "adapter")
    name = "model.layers.0.self_attn.q_proj"
    assert config["layers"][name]["kind"] == "magnitude" and tensors[f"{name}.magnitude"].shape == (64,)
    loaded = load_adapter(build_tiny_llama(0), tmp_path / "adapter")  # no building block: the file says the kind
    assert all(type(m) is MagnitudeLinear for m in sorsa_layers(loaded).values())
    assert torch.equal(loaded.get_submodule(name).magnitude, adapted.get_submodule(name).magnitude)
    assert torch.equal(_logits(loaded, token_ids), _logits(adapted, token_ids))


def test_merge_gives_plain_linears_with_the_adapted_logits(adapted, token_ids):
    train_steps(adapted, token_ids, steps=2)
    expected = _logits(adapted, token_ids)
    merged = merge_sorsa(copy.deepcopy(adapted))
    assert not sorsa_layers(merged)
    torch.testing.assert_close(_logits(merged, token_ids), expected, rtol=1e-5, atol=1e-5)


def test_fsdp_byte_count_includes_the_kinds_extra_tensor(adapted):
    layers = sorsa_layers(adapted).values()
    want = sum(p.numel() * p.element_size() for m in layers for p in (m.U, m.S, m.V, m.magnitude))
    assert local_nbytes(adapted)["adapters"] == want


def test_peft_export_refuses_a_kind_whose_update_is_not_a_lora(adapted, tmp_path):
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj is a SORSA\+magnitude adapter "
                                         r"\(kind 'magnitude'\), whose update is not a LoRA"):
        export_peft_lora(adapted, tmp_path / "lora")


def test_loading_a_kind_that_is_not_registered_names_it(adapted, tmp_path):
    save_adapter(adapted, tmp_path / "adapter")
    unregister_kind(KIND)
    with pytest.raises(AdapterError, match=r"kind 'magnitude' is not registered; registered: 'sorsa'"):
        load_adapter(build_tiny_llama(0), tmp_path / "adapter")


def test_building_an_unregistered_kind_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"adapter kind 'dora' is not registered for layers; registered: "):
        with building("dora"):
            pass
