"""SORSALinear: forward and gradients against a float64 oracle, init, merge, bad input."""
import pytest
import torch
from torch import nn

from sorsa_kernels import SORSALinear
from sorsa_kernels.ops import reference
from tests.conftest import rel_err


def _layer(n=100, m=72, r=5, bias=True, alpha=None, seed=0, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(n, m, bias=bias)
    layer = SORSALinear.from_linear(lin, r, alpha=alpha, **kw)
    with torch.no_grad():  # move the factors away from the SVD point so every term matters
        layer.U.add_(0.1 * torch.randn_like(layer.U))
        layer.S.mul_(1.5)
        layer.V.add_(0.1 * torch.randn_like(layer.V))
    return lin, layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("alpha", [None, 16.0])
@pytest.mark.parametrize("shape", [(7, 100), (2, 3, 100)])
def test_forward_and_all_grads_match_float64_oracle(bias, alpha, shape):
    _, layer = _layer(bias=bias, alpha=alpha)
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64 = x.detach().double().requires_grad_()
    U, S, V = (p.detach().double().requires_grad_() for p in (layer.U, layer.S, layer.V))
    b = None if layer.bias is None else layer.bias.double()
    y64 = reference.linear_dense(x64, layer.residual.double(), U, S, V, b, layer.scale)
    y64.backward(dy.double())

    assert rel_err(y, y64) < 1e-5
    assert rel_err(x.grad, x64.grad) < 1e-5
    assert rel_err(layer.U.grad, U.grad) < 1e-5
    assert rel_err(layer.S.grad, S.grad) < 1e-5
    assert rel_err(layer.V.grad, V.grad) < 1e-5


def test_backward_saves_only_x_and_rank_wide_intermediate():
    _, layer = _layer(n=100, m=72, r=5)
    x = torch.randn(33, 100, requires_grad=True)
    params = {p.data_ptr() for p in layer.parameters()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    activations = [t for t in saved if t.data_ptr() not in params]
    shapes = sorted(tuple(t.shape) for t in activations)
    assert shapes == [(33, 5), (33, 100)]


def test_init_preserves_output_fp32():
    lin, layer = _layer()
    fresh = SORSALinear.from_linear(lin, 5)
    x = torch.randn(9, 100)
    assert rel_err(fresh(x), lin(x)) < 1e-5


def test_randomized_svd_init_preserves_output():
    torch.manual_seed(1)
    lin = nn.Linear(100, 72)
    layer = SORSALinear.from_linear(lin, 5, svd="randomized", niter=4)
    x = torch.randn(9, 100)
    assert rel_err(layer(x), lin(x)) < 1e-5


def test_init_factors_are_top_singular_triplets():
    torch.manual_seed(2)
    lin = nn.Linear(100, 72)
    layer = SORSALinear.from_linear(lin, 5)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    assert rel_err(layer.S, s[:5]) < 1e-5
    eye = torch.eye(5, dtype=torch.float64)
    assert rel_err(layer.U.double().T @ layer.U.double(), eye) < 1e-5
    assert rel_err(layer.V.double().T @ layer.V.double(), eye) < 1e-5


def test_alpha_scale_keeps_init_output_and_divides_S():
    lin = nn.Linear(100, 72)
    plain = SORSALinear.from_linear(lin, 5)
    scaled = SORSALinear.from_linear(lin, 5, alpha=10.0)
    assert scaled.scale == 2.0
    assert rel_err(scaled.S * 2.0, plain.S) < 1e-6
    x = torch.randn(4, 100)
    assert rel_err(scaled(x), lin(x)) < 1e-5


def test_bf16_residual_with_fp32_adapters():
    lin = nn.Linear(100, 72).to(torch.bfloat16)
    layer = SORSALinear.from_linear(lin, 5)
    assert layer.residual.dtype == torch.bfloat16 and layer.U.dtype == torch.float32
    assert layer.weight is layer.residual
    x = torch.randn(4, 100, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, lin(x)) < 1e-2
    y.float().sum().backward()
    assert layer.U.grad.dtype == torch.float32


def test_merge_returns_linear_with_same_output():
    _, layer = _layer()
    merged = layer.merge()
    assert type(merged) is nn.Linear
    x = torch.randn(6, 100)
    assert rel_err(merged(x), layer(x)) < 1e-5


def test_only_adapters_are_trainable():
    _, layer = _layer()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"U", "S", "V"}


def test_dropout_branch_trains_and_is_identity_in_eval():
    torch.manual_seed(3)
    lin = nn.Linear(100, 72)
    layer = SORSALinear.from_linear(lin, 5, dropout=0.5)
    x = torch.randn(8, 100, requires_grad=True)
    layer.train()
    y = layer(x)
    y.sum().backward()
    assert x.grad is not None and layer.V.grad is not None
    layer.eval()
    assert rel_err(layer(x), lin(x)) < 1e-5


@pytest.mark.parametrize("rank", [0, -1, 73])
def test_bad_rank_is_rejected_with_its_limit(rank):
    lin = nn.Linear(100, 72)
    with pytest.raises(ValueError, match="rank"):
        SORSALinear.from_linear(lin, rank, name="model.layers.0.q_proj")


def test_rank_over_limit_message_names_limit_and_layer():
    with pytest.raises(ValueError, match=r"rank 73 exceeds min\(in_features, out_features\) = 72 for layer blk.q"):
        SORSALinear.from_linear(nn.Linear(100, 72), 73, name="blk.q")


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weight_is_rejected(bad, word):
    lin = nn.Linear(10, 8)
    with torch.no_grad():
        lin.weight[2, 3] = bad
    with pytest.raises(ValueError, match=word):
        SORSALinear.from_linear(lin, 2, name="blk.v")


def test_non_linear_module_is_rejected():
    with pytest.raises(TypeError, match="nn.Linear"):
        SORSALinear.from_linear(nn.Conv1d(3, 3, 1), 1)


def test_unsupported_dtype_is_rejected():
    with pytest.raises(TypeError, match="unsupported residual_dtype"):
        SORSALinear.from_linear(nn.Linear(10, 8), 2, residual_dtype=torch.int8)


def test_wrong_input_width_is_rejected():
    _, layer = _layer()
    with pytest.raises(ValueError, match="expected 100"):
        layer(torch.randn(3, 99))


def test_unknown_svd_mode_is_rejected():
    with pytest.raises(ValueError, match="svd must be"):
        SORSALinear.from_linear(nn.Linear(10, 8), 2, svd="qr")
