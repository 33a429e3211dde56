"""bfloat16 under the Triton interpreter (``SORSA_KERNELS_BACKEND=triton``, ``TRITON_INTERPRET=1``).

The interpreter computes a bfloat16 ``tl.dot`` wrongly (values of 1e10 where the reference
gives 1e-3): the linear and QSORSA ops refuse it in one line naming float32/float16 and the
reference backend; the regularizer's kernels upcast every tile before a dot, so it runs and
matches the reference.
"""
from __future__ import annotations

import pytest
import torch

from sorsa_kernels.ops import reference
from sorsa_kernels.ops.qsorsa_linear import qsorsa_linear
from sorsa_kernels.ops.regularizer import ortho_value_and_grad_
from sorsa_kernels.ops.sorsa_linear import sorsa_linear
from tests.conftest import rel_err

pytest.importorskip("triton")

REFUSAL = r"^the Triton interpreter \(TRITON_INTERPRET=1\) computes bfloat16 tl\.dot wrongly: .*float32 or float16.*SORSA_KERNELS_BACKEND=reference$"


@pytest.fixture(autouse=True)
def interpreter(monkeypatch, backend):
    backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _linear_inputs(M=9, n=40, m=24, r=5):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(M, n, generator=g)
    res = torch.randn(m, n, generator=g) * 0.02
    U, S, V = torch.randn(m, r, generator=g), torch.rand(r, generator=g) + 0.5, torch.randn(n, r, generator=g)
    return x, res, U, S, V


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["fused", "dropout"])
def test_bfloat16_linear_on_the_triton_interpreter_is_refused_in_one_line(dropout):
    x, res, U, S, V = (t.bfloat16() for t in _linear_inputs())
    with pytest.raises(TypeError, match=REFUSAL):
        sorsa_linear(x, res, U, S, V, None, 1.0, dropout_p=dropout, training=True)


def test_bfloat16_qsorsa_on_the_triton_interpreter_is_refused_in_one_line():
    from sorsa_kernels.quant.nf4 import quantize_nf4

    x, res, U, S, V = _linear_inputs(n=64)
    with pytest.raises(TypeError, match=REFUSAL):
        qsorsa_linear(x.bfloat16(), quantize_nf4(res), U.bfloat16(), S.bfloat16(), V.bfloat16())


def test_float32_input_with_bfloat16_adapters_runs_on_the_triton_interpreter():
    """The compute dtype is the input's: bfloat16 parameters are cast to float32 before any dot."""
    x, res, U, S, V = _linear_inputs()
    y = sorsa_linear(x, res.bfloat16(), U.bfloat16(), S.bfloat16(), V.bfloat16())
    want, _ = reference.linear_forward(x.double(), *(t.bfloat16().double() for t in (res, U, S, V)), None, 1.0)
    assert rel_err(y, want) < 1e-5


def test_bfloat16_regularizer_on_the_triton_interpreter_matches_the_reference():
    g = torch.Generator().manual_seed(12)
    mats = [torch.randn(k, 6, generator=g).bfloat16().requires_grad_() for k in (30, 17, 45)]
    copies = [m.detach().double().requires_grad_() for m in mats]
    value = ortho_value_and_grad_(mats, 2.0)
    expected = reference.ortho_value_and_grad_(copies, 2.0)
    assert rel_err(value, expected) < 1e-5
    for m, c in zip(mats, copies):
        assert rel_err(m.grad, c.grad) < 1e-2  # the gradient is stored in bfloat16
