"""nn/factory.py: the one constructor of SORSA layers, dense or quantized."""
import pytest
import torch
from torch import nn

from sorsa_kernels.nn.factory import layer_class, make_sorsa_linear, quantize_modes
from sorsa_kernels.nn.linear import SORSALinear
from sorsa_kernels.nn.qlinear import QSORSALinear


def _lin():
    torch.manual_seed(0)
    return nn.Linear(40, 24)


def test_quantize_modes_are_dense_and_nf4():
    assert quantize_modes() == (None, "nf4")
    assert layer_class(None) is SORSALinear and layer_class("nf4") is QSORSALinear


def test_dense_factory_equals_from_linear():
    lin = _lin()
    a, b = make_sorsa_linear(lin, 4), SORSALinear.from_linear(lin, 4)
    assert type(a) is SORSALinear
    assert torch.equal(a.residual, b.residual) and torch.equal(a.U, b.U)


def test_nf4_factory_builds_the_same_qsorsa_as_its_from_linear():
    pytest.importorskip("bitsandbytes")
    lin = _lin()
    a = QSORSALinear.from_linear(lin, 4, quant_iters=0)
    b = make_sorsa_linear(lin, 4, quantize="nf4", quant_iters=0)
    assert type(a) is QSORSALinear and type(b) is QSORSALinear
    assert torch.equal(a.nf4_packed, b.nf4_packed)
    x = torch.randn(2, 40)
    assert torch.equal(a(x), b(x))


def _apply_sorsa_to_one_linear(linear, rank, **kwargs):
    from sorsa_kernels import apply_sorsa

    return apply_sorsa(nn.Sequential(linear), rank, ["0"], progress=False, **kwargs)


@pytest.mark.parametrize("build", [make_sorsa_linear, _apply_sorsa_to_one_linear])
def test_unknown_quantize_names_the_allowed_values(build):
    with pytest.raises(ValueError, match=r"quantize must be None or 'nf4', got 'int8'"):
        build(_lin(), 4, quantize="int8")


def test_from_linear_builds_only_its_own_class():
    """The factory alone picks the layer class: ``SORSALinear.from_linear`` takes no ``quantize``."""
    with pytest.raises(TypeError, match="quantize"):
        SORSALinear.from_linear(_lin(), 4, quantize="nf4")
