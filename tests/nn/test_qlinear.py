"""QSORSALinear: construction, exact rebuild from factors, merge, storage, bad input."""
import pytest
import torch
from torch import nn

from sorsa_kernels import SORSALinear
from sorsa_kernels.nn.qlinear import QSORSALinear
from sorsa_kernels.ops import reference
from sorsa_kernels.quant.nf4 import dequantize_nf4, quantize_nf4
from tests.conftest import rel_err

bnbF = pytest.importorskip("bitsandbytes.functional")


def _lin(n=100, m=72, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n, m, bias=bias)


def _layer(seed=0, **kw):
    lin = _lin(seed=seed)
    kw.setdefault("quant_report", None)
    return lin, QSORSALinear.from_linear(lin, 8, **kw)


@pytest.mark.parametrize("alpha", [None, 16.0])
def test_from_factors_reproduces_from_linear_outputs_exactly(alpha):
    lin, layer = _layer(alpha=alpha, quant_iters=1)
    with torch.no_grad():
        layer.U.add_(0.1)
        layer.S.mul_(1.5)
    again = QSORSALinear.from_factors(
        lin, *layer.init_factors, trained=(layer.U, layer.S, layer.V), alpha=alpha
    )
    x = torch.randn(2, 7, 100)
    assert torch.equal(again.nf4_packed, layer.nf4_packed)
    assert torch.equal(again.nf4_absmax, layer.nf4_absmax)
    assert torch.equal(again(x), layer(x))


def test_is_a_sorsa_layer_with_the_same_trainable_parameters():
    _, layer = _layer()
    assert isinstance(layer, SORSALinear)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["U", "S", "V"]
    assert layer.adapter_parameters() == [layer.U, layer.S, layer.V]


def test_initial_output_is_the_linear_output_up_to_the_quantization_error():
    lin, layer = _layer(quant_iters=1)
    x = torch.randn(16, 100)
    Wr = reference.compute_residual(lin.weight, *layer.init_factors, layer.scale)
    expected = lin(x) - x @ (Wr - dequantize_nf4(layer.nf4())).T
    assert rel_err(layer(x), expected) < 1e-5


def test_residual_property_is_the_dequantized_storage_in_compute_dtype():
    lin = _lin().to(torch.bfloat16)
    layer = QSORSALinear.from_linear(lin, 8, quant_report=None)
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.residual, dequantize_nf4(layer.nf4(), torch.bfloat16))


def test_merge_gives_linear_with_dequantized_residual_plus_principal_part():
    _, layer = _layer()
    with torch.no_grad():
        layer.U.add_(0.05)
    merged = layer.merge(torch.float32)
    x = torch.randn(5, 100)
    assert isinstance(merged, nn.Linear)
    assert rel_err(merged(x), layer(x)) < 1e-5


def test_merge_defaults_to_the_weight_dtype():
    layer = QSORSALinear.from_linear(_lin().to(torch.bfloat16), 8, quant_report=None)
    assert layer.merge().weight.dtype == torch.bfloat16


def test_quant_state_reads_in_bitsandbytes():
    _, layer = _layer()
    assert torch.equal(bnbF.dequantize_4bit(*layer.quant_state()), layer.residual)


def test_set_nf4_takes_a_bitsandbytes_quantized_residual():
    _, layer = _layer()
    w = torch.randn(72, 100)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    from sorsa_kernels.quant.nf4 import NF4Weight

    layer.set_nf4(NF4Weight.from_bnb(packed, state))
    assert torch.equal(layer.residual, bnbF.dequantize_4bit(packed, state))


def test_dtype_cast_of_the_model_leaves_nf4_state_exact():
    _, layer = _layer()
    before = layer.residual.clone()
    layer.half()
    assert layer.U.dtype == torch.float16
    assert torch.equal(layer.residual, before)


def test_state_dict_round_trip_restores_outputs():
    _, layer = _layer(seed=1)
    fresh = QSORSALinear(100, 72, 8)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 100)
    assert torch.equal(fresh(x), layer(x))


def test_from_linear_attaches_report_with_history():
    _, layer = _layer(quant_iters=2, quant_report="fro", name="blk.0")
    rep = layer.quant_report
    assert rep.name == "blk.0" and rep.iters == 2 and len(rep.fro_history) == 3
    assert rep.fro == pytest.approx(min(rep.fro_history), rel=1e-6) and rep.nuc is None


def test_from_factors_has_no_report():
    lin, layer = _layer()
    assert QSORSALinear.from_factors(lin, *layer.init_factors).quant_report is None


def test_gradients_reach_only_the_adapters():
    _, layer = _layer()
    x = torch.randn(4, 100, requires_grad=True)
    layer(x).square().sum().backward()
    assert all(p.grad is not None for p in (layer.U, layer.S, layer.V)) and x.grad is not None
    assert layer.bias.grad is None


def test_quantizes_the_float32_residual():
    lin, layer = _layer(quant_iters=0)
    Wr = reference.compute_residual(lin.weight, *layer.init_factors, layer.scale)
    assert torch.equal(layer.nf4_packed, quantize_nf4(Wr).packed)


def test_rejects_non_linear():
    with pytest.raises(TypeError, match="nn.Linear and Conv1D layers only; got Conv1d for layer enc.c"):
        QSORSALinear.from_linear(nn.Conv1d(3, 3, 1), 1, name="enc.c")


def test_rejects_float64_residual_dtype():
    with pytest.raises(TypeError, match="residual_dtype must be float32, float16 or bfloat16.*for layer l1"):
        QSORSALinear.from_linear(_lin(), 8, residual_dtype=torch.float64, name="l1")


def test_rejects_negative_quant_iters():
    with pytest.raises(ValueError, match="quant_iters must be a non-negative int.*got -1 for layer l2"):
        QSORSALinear.from_linear(_lin(), 8, quant_iters=-1, name="l2")


def test_rejects_unknown_report_mode():
    with pytest.raises(ValueError, match="quant_report must be one of"):
        QSORSALinear.from_linear(_lin(), 8, quant_report="nuc")


def test_rejects_rank_above_min_dimension():
    with pytest.raises(ValueError, match="rank 80 exceeds min\\(in_features, out_features\\) = 72 for layer l3"):
        QSORSALinear.from_linear(_lin(), 80, name="l3")


def test_from_factors_rejects_mismatched_factor_shape():
    lin, layer = _layer()
    U0, S0, V0 = layer.init_factors
    with pytest.raises(ValueError, match=r"V0 has shape \(99, 8\) but the layer needs \(100, 8\)"):
        QSORSALinear.from_factors(lin, U0, S0, V0[:99])


def test_set_nf4_rejects_wrong_shape():
    _, layer = _layer()
    with pytest.raises(ValueError, match=r"NF4 residual has shape \(72, 64\) but the layer needs \(72, 100\)"):
        layer.set_nf4(quantize_nf4(torch.randn(72, 64)))


def test_forward_rejects_wrong_feature_count():
    _, layer = _layer()
    with pytest.raises(ValueError, match="input has 64 features in its last dimension, expected 100"):
        layer(torch.randn(2, 64))


def test_torch_compile_traces_layer_without_graph_break(backend):
    backend("reference")
    _, layer = _layer(seed=2)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 100, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    assert rel_err(y, layer(x)) < 1e-6 and x.grad is not None


def _count_dequantizations(monkeypatch):
    """Count whole-matrix dequantizations, wherever the layer or its views call them from."""
    from sorsa_kernels.nn import qlinear
    from sorsa_kernels.quant import dense_view

    calls = []
    for module in (dense_view, qlinear):
        real = module.dequantize_nf4_bnb
        monkeypatch.setattr(module, "dequantize_nf4_bnb", lambda *a, _f=real, **k: calls.append(1) or _f(*a, **k))
    return calls


def test_weight_and_residual_metadata_do_not_dequantize(monkeypatch):
    lin = _lin().to(torch.bfloat16)
    layer = QSORSALinear.from_linear(lin, 8, quant_report=None)
    calls = _count_dequantizations(monkeypatch)
    for view in (layer.weight, layer.residual):
        assert view.dtype == torch.bfloat16
        assert view.shape == (72, 100) and view.size() == (72, 100) and view.size(1) == 100
        assert view.device == lin.weight.device
        assert (view.ndim, view.dim(), view.numel(), view.requires_grad) == (2, 2, 7200, False)
        assert isinstance(view, torch.Tensor)
    assert layer.residual_dtype == torch.bfloat16
    assert "residual=nf4" in repr(layer)
    assert calls == []


def test_using_the_weight_values_dequantizes_once_per_access(monkeypatch):
    _, layer = _layer()
    dense = dequantize_nf4(layer.nf4(), torch.float32)
    calls = _count_dequantizations(monkeypatch)
    w = layer.weight
    assert torch.equal(w, dense) and torch.equal(w + 0, dense) and torch.equal(dense, w.clone())
    assert type(w.float()) is torch.Tensor
    assert len(calls) == 1
    assert torch.equal(layer.dense_residual(), dense)


def test_forward_does_not_dequantize_the_whole_residual_and_merge_does_once(monkeypatch):
    _, layer = _layer()
    calls = _count_dequantizations(monkeypatch)
    layer(torch.randn(3, 100))
    assert calls == []
    layer.merge()
    assert len(calls) == 1


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_trainable_bias_gets_its_gradient(backend_name, monkeypatch):
    """A QSORSA bias set trainable gets db = Σ_rows dy (it used to get None silently)."""
    monkeypatch.setenv("SORSA_KERNELS_BACKEND", backend_name)
    _, layer = _layer(quant_iters=0)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, 100)
    dy = torch.randn(3, 5, 72)
    layer(x).backward(dy)
    assert layer.bias.grad is not None
    assert rel_err(layer.bias.grad, dy.double().sum((0, 1))) < 1e-6
    assert layer.U.grad is not None
