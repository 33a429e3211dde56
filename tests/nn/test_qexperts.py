"""``QSORSAExperts``: SORSA experts with each expert's residual in NF4 (bitsandbytes layout)."""
from __future__ import annotations

import pytest
import torch

from sorsa_kernels.nn import QSORSAExperts, SORSAExperts
from sorsa_kernels.nn.factory import experts_class
from sorsa_kernels.nn.qlinear import QSORSALinear
from sorsa_kernels.ops import reference
from sorsa_kernels.quant.nf4 import dequantize_nf4, quantize_nf4
from tests.conftest import rel_err

E, M, N, R = 3, 20, 36, 4


def _weight(seed=0):
    return torch.randn(E, M, N, generator=torch.Generator().manual_seed(seed))


def test_each_expert_is_stored_as_the_dense_qsorsa_layer_stores_it():
    w = _weight()
    layer = QSORSAExperts.from_weight(w, R, quant_iters=1)
    for e in range(E):
        lin = torch.nn.Linear(N, M, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w[e])
        dense = QSORSALinear.from_linear(lin, R, quant_iters=1, quant_report=None)
        q = layer.expert_nf4(e)
        assert torch.equal(q.packed, dense.nf4().packed) and torch.equal(q.absmax, dense.nf4().absmax)
        assert torch.equal(layer.U[e], dense.U) and torch.equal(layer.S[e], dense.S)


def test_expert_nf4_reads_in_bitsandbytes():
    from bitsandbytes.functional import dequantize_4bit

    layer = QSORSAExperts.from_weight(_weight(), R, quant_iters=0)
    packed, state = layer.expert_nf4(1).to_bnb()
    assert torch.equal(dequantize_4bit(packed, state), layer.dense_residual(experts=slice(1, 2))[0])


def test_error_reducing_init_lowers_the_error_against_plain_qsorsa():
    w = _weight(1)
    errs = [float((QSORSAExperts.from_weight(w, R, quant_iters=t).merged_weight() - w).norm()) for t in (0, 2)]
    assert errs[1] < errs[0]


def test_init_error_is_the_nf4_error_of_the_residual_only():
    w = _weight()
    layer = QSORSAExperts.from_weight(w, R, quant_iters=0)
    U0, S0, V0 = layer.init_factors
    res = reference.compute_residual(w, U0, S0, V0, 1.0)
    want = torch.stack([dequantize_nf4(quantize_nf4(res[e]), torch.float32) for e in range(E)])
    assert torch.equal(layer.dense_residual(torch.float32), want)


def test_from_factors_rebuilds_the_storage_bit_for_bit():
    w = _weight()
    layer = QSORSAExperts.from_weight(w, R, alpha=8.0)
    with torch.no_grad():
        layer.U.add_(0.1)
    again = QSORSAExperts.from_factors(w, *layer.init_factors, trained=(layer.U, layer.S, layer.V), alpha=8.0)
    a, b = layer.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_forward_is_the_dense_experts_math_on_the_dequantized_residual():
    layer = QSORSAExperts.from_weight(_weight(), R, alpha=2.0)
    counts = torch.tensor([5, 0, 3])
    x = torch.randn(8, N)
    want = reference.experts_dense(x, counts, layer.dense_residual(), layer.U, layer.S, layer.V, None, layer.scale)
    assert rel_err(layer(x, counts), want) < 1e-6


def test_merged_weight_is_dequantized_residual_plus_low_rank():
    layer = QSORSAExperts.from_weight(_weight(), R)
    with torch.no_grad():
        layer.S.mul_(1.5)
    want = reference.merged_weight(layer.dense_residual(torch.float32), layer.U, layer.S, layer.V, 1.0)
    assert torch.equal(layer.merged_weight(torch.float32), want)


def test_storage_is_frozen_parameters_and_constant_tables_buffers():
    layer = QSORSAExperts.from_weight(_weight(), R, residual_dtype=torch.bfloat16)
    params = dict(layer.named_parameters())
    assert [n for n, p in params.items() if p.requires_grad] == ["U", "S", "V"]
    assert params["nf4_packed"].shape == (E, (M * N + 1) // 2) and params["nf4_packed"].dtype == torch.uint8
    assert params["nf4_absmax"].shape == (E, -(-M * N // 64))
    assert set(dict(layer.named_buffers())) == {"nf4_offset", "nf4_nested_code", "nf4_code"}
    assert layer.half().nf4_nested_absmax.dtype == torch.int32  # casts leave the NF4 state exact


def test_residual_metadata_without_dequantizing(monkeypatch):
    layer = QSORSAExperts.from_weight(_weight(), R, residual_dtype=torch.bfloat16)
    monkeypatch.setattr(layer, "dense_residual", lambda *a, **k: pytest.fail("dequantized"))
    r = layer.residual
    assert (r.dtype, tuple(r.shape), r.device.type) == (torch.bfloat16, (E, M, N), "cpu")
    assert layer.weight.dtype == torch.bfloat16


def test_unsupported_compute_dtype_named():
    with pytest.raises(TypeError, match="QSORSA residual_dtype must be float32, float16 or bfloat16"):
        QSORSAExperts.from_weight(_weight(), R, residual_dtype=torch.float64)


def test_factory_picks_the_experts_class():
    assert experts_class(None) is SORSAExperts and experts_class("nf4") is QSORSAExperts
    with pytest.raises(ValueError, match="quantize must be None or 'nf4' for expert weights, got 'int4'"):
        experts_class("int4")
