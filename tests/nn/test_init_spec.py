"""Issue 30 item 3 (first half): one frozen SORSAInit carries the init options from the job's
config through apply_sorsa and the experts surgery to every from_linear / from_weight."""
import dataclasses

import pytest
import torch
from torch import nn

from sorsa_kernels.nn import QSORSAExperts, QSORSALinear, SORSAExperts, SORSALinear
from sorsa_kernels.nn.init_spec import INIT_FIELDS, SORSAInit


def test_the_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SORSAInit(rank=4).alpha = 2.0


@pytest.mark.parametrize("options, error, message", [
    (dict(rank=0), ValueError, "rank must be a positive integer, got 0"),
    (dict(rank=4, alpha=0.0), ValueError, "alpha must be a positive finite number, got 0.0"),
    (dict(rank=4, alpha=1e300), ValueError, "alpha 1e[+]300 gives scale alpha/rank"),
    (dict(rank=4, dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0"),
    (dict(rank=4, svd="qr"), ValueError, "svd must be one of"),
    (dict(rank=4, niter=-1), ValueError, "niter must be a non-negative integer, got -1"),
    (dict(rank=4, quantize="int8"), ValueError, "quantize must be None or 'nf4', got 'int8'"),
    (dict(rank=4, residual_dtype=torch.int8), TypeError, "unsupported residual_dtype torch.int8"),
])
def test_each_field_is_checked_on_construction_naming_it(options, error, message):
    with pytest.raises(error, match=message):
        SORSAInit(**options)


def test_keywords_and_the_spec_build_the_same_layer():
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    by_keywords = SORSALinear.from_linear(lin, 4, alpha=8.0, svd="randomized", adapter_dtype=torch.float64)
    by_spec = SORSALinear.from_linear(lin, SORSAInit(rank=4, alpha=8.0, svd="randomized", adapter_dtype=torch.float64))
    for a, b in zip(by_keywords.state_dict().values(), by_spec.state_dict().values()):
        assert torch.equal(a, b)
    assert by_spec.scale == 2.0 and by_spec.U.dtype == torch.float64


def test_a_layer_class_asked_for_another_storage_is_refused():
    with pytest.raises(TypeError, match="SORSALinear stores a dense residual, not quantize='nf4'"):
        SORSALinear.from_linear(nn.Linear(64, 64), SORSAInit(rank=4, quantize="nf4"))


def test_experts_take_the_same_spec_as_linear_layers():
    torch.manual_seed(0)
    w = torch.randn(3, 64, 64)
    spec = SORSAInit(rank=2, alpha=4.0, quantize="nf4", quant_iters=0)
    layer = QSORSAExperts.from_weight(w, spec, name="experts.down_proj")
    assert layer.rank == 2 and layer.scale == 2.0
    dense = SORSAExperts.from_weight(w, dataclasses.replace(spec, quantize=None))
    assert type(dense) is SORSAExperts and torch.equal(dense.init_factors[0], layer.init_factors[0])  # 0 iterations
    assert QSORSALinear.from_linear(nn.Linear(64, 64), spec, quant_report=None).scale == 2.0


def test_dropout_on_expert_weights_names_the_stack():
    with pytest.raises(ValueError, match="dropout 0.1 is not supported on expert weights for layer e.up"):
        SORSAExperts.from_weight(torch.randn(2, 8, 8), 2, dropout=0.1, name="e.up")


def test_the_finetune_config_becomes_one_spec():
    from sorsa_kernels.jobs.finetune.config import FinetuneConfig
    from sorsa_kernels.jobs.finetune.model import sorsa_arguments

    cfg = FinetuneConfig(rank=8, alpha=16.0, svd="randomized", adapter_dtype="bf16", quantize="nf4").resolved()
    targets, init = sorsa_arguments(cfg)
    assert init == SORSAInit(rank=8, alpha=16.0, svd="randomized", adapter_dtype=torch.bfloat16, quantize="nf4")
    assert set(INIT_FIELDS) >= {"alpha", "svd", "niter", "oversample", "quantize", "quant_iters", "dropout"}


def test_sorsa_init_is_exported_from_the_package_with_an_example():
    import sorsa_kernels

    assert "SORSAInit" in sorsa_kernels.__all__ and sorsa_kernels.SORSAInit is SORSAInit
    assert "sorsa_kernels.SORSAInit(" in sorsa_kernels.__doc__


def test_the_package_all_is_every_lazy_export_and_the_version():
    import sorsa_kernels

    assert sorted(sorsa_kernels.__all__) == sorted(["__version__", *sorsa_kernels._EXPORTS])


def test_importing_the_package_and_its_init_export_name_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, sorsa_kernels; 'SORSAInit' in sorsa_kernels.__all__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
