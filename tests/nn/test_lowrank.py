"""Issue 30 item 2: every SORSA layer class (dense or NF4, one weight or a stack of experts) is
constructed by one function, ``nn.lowrank.init_low_rank``, so each checks what the others check."""
import pytest
import torch

from sorsa_kernels.nn import QSORSAExperts, QSORSALinear, SORSAExperts, SORSALinear

CLASSES = {c.__name__: c for c in (SORSALinear, QSORSALinear, SORSAExperts, QSORSAExperts)}


def build(cls: str, rank: int = 4, **options):
    """A 16-in, 12-out layer of ``cls`` (a stack of 3 experts for the experts classes)."""
    experts = (3,) if "Experts" in cls else ()
    return CLASSES[cls](*experts, 16, 12, rank, **options)



@pytest.mark.parametrize("cls", list(CLASSES))
def test_every_layer_constructor_refuses_an_alpha_the_adapter_dtype_cannot_hold(cls):
    with pytest.raises(ValueError, match=r"alpha 1e\+300 gives scale alpha/rank"):
        build(cls, alpha=1e300)


@pytest.mark.parametrize("cls", list(CLASSES))
def test_every_layer_constructor_refuses_a_rank_above_the_smaller_side(cls):
    with pytest.raises(ValueError, match="rank 13 exceeds min"):
        build(cls, 13)


@pytest.mark.parametrize("cls", list(CLASSES))
def test_every_layer_holds_factors_and_frozen_bias_of_one_layout(cls):
    layer = build(cls, alpha=8.0)
    lead = (3,) if "Experts" in cls else ()
    assert layer.scale == 2.0 and layer.init_factors is None
    assert [tuple(t.shape) for t in (layer.U, layer.S, layer.V)] == [(*lead, 12, 4), (*lead, 4), (*lead, 16, 4)]
    assert all(t.dtype == torch.float32 and t.requires_grad for t in (layer.U, layer.S, layer.V))
    if layer.bias is not None:
        assert tuple(layer.bias.shape) == (*lead, 12) and not layer.bias.requires_grad
