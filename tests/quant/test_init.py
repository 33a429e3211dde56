"""The quantization report (quant/init.py): per-layer errors against the NF4 baseline and their totals."""
import math

import pytest
import torch
from torch import nn

from sorsa_kernels.quant.init import (
    LayerQuantReport,
    QuantReport,
    layer_quant_report,
    quantization_error,
)
from sorsa_kernels.quant.nf4 import dequantize_nf4, quantize_nf4

pytest.importorskip("bitsandbytes")


def _decaying(m, n, seed):
    """A random m×n matrix with singular values decaying over two decades."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) @ torch.diag(torch.logspace(0, -2, n))


def _svd_residual(W, rank):
    """W minus its top-``rank`` SVD part (the split without error-reducing iterations)."""
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    return W - (U[:, :rank] * s[:rank]) @ Vh[:rank]


def test_layer_report_has_frobenius_and_nuclear_against_nf4_baseline():
    W = _decaying(72, 100, 7)
    res = _svd_residual(W, 8)
    q = quantize_nf4(res)
    rep = layer_quant_report(W, res, q, rank=8, iters=0, name="l0")
    err = res - dequantize_nf4(q)
    base = quantization_error(W)
    assert rep.fro == pytest.approx(float(err.norm()), rel=1e-6)
    assert rep.nuc == pytest.approx(float(torch.linalg.matrix_norm(err, "nuc")), rel=1e-4)
    assert rep.fro_nf4 == pytest.approx(float(base.norm()), rel=1e-6)
    assert rep.nuc_nf4 == pytest.approx(float(torch.linalg.matrix_norm(base, "nuc")), rel=1e-4)
    assert 0 < rep.fro_reduction < 1 and 0 < rep.nuc_reduction < 1
    assert rep.as_dict()["shape"] == [72, 100]


def test_layer_report_without_nuclear_leaves_it_none():
    W = _decaying(72, 100, 8)
    q = quantize_nf4(W)
    rep = layer_quant_report(W, W, q, rank=8, iters=0, nuclear=False)
    assert rep.nuc is None and rep.nuc_reduction is None
    assert rep.fro == pytest.approx(rep.fro_nf4)


def _rep(name, fro, fro_nf4, nuc, nuc_nf4):
    return LayerQuantReport(name=name, shape=(4, 4), rank=1, iters=1, best_iter=1, fro=fro,
                            fro_nf4=fro_nf4, fro_weight=1.0, nuc=nuc, nuc_nf4=nuc_nf4)


def test_total_combines_frobenius_in_quadrature_and_nuclear_by_sum():
    rep = QuantReport()
    rep.add(_rep("a", 3.0, 6.0, 1.0, 2.0))
    rep.add(_rep("b", 4.0, 8.0, 2.0, 4.0))
    tot = rep.total()
    assert tot["fro"] == 5.0 and tot["fro_nf4"] == 10.0 and tot["fro_reduction"] == 0.5
    assert tot["nuc"] == 3.0 and tot["nuc_nf4"] == 6.0 and tot["nuc_reduction"] == 0.5
    assert set(rep.as_dict()["layers"]) == {"a", "b"}


def test_total_has_no_nuclear_when_a_layer_lacks_it():
    rep = QuantReport()
    rep.add(_rep("a", 3.0, 6.0, 1.0, 2.0))
    rep.add(_rep("b", 4.0, 8.0, None, None))
    assert rep.total()["nuc"] is None and rep.total()["nuc_reduction"] is None


def test_report_rejects_duplicate_layer_name():
    rep = QuantReport()
    rep.add(_rep("a", 1.0, 2.0, None, None))
    with pytest.raises(ValueError, match="already has a layer named 'a'"):
        rep.add(_rep("a", 1.0, 2.0, None, None))


def test_from_model_collects_layer_reports_by_module_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].quant_report = _rep("", 1.0, 2.0, None, None)
    rep = QuantReport.from_model(model)
    assert list(rep.layers) == ["1"] and math.isclose(rep.total()["fro_reduction"], 0.5)
