"""A kernel that cannot compile or launch on the GPU (OutOfResources, a ptxas error) falls
back once to the reference for that shape, with one warning naming kernel, device and shape;
training does not stop.  bfloat16 on a pre-Ampere GPU is an error naming float16.

The failures are forced: the kernel's launch (in the interpreter on CPU) is replaced by one
that raises what Triton raises on a GPU whose shared memory is too small.
"""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from sorsa_kernels.ops import reference
from sorsa_kernels.ops import regularizer as reg_op
from tests.conftest import rel_err

pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources, PTXASError  # noqa: E402

dispatch = importlib.import_module("sorsa_kernels.ops.dispatch")
op = importlib.import_module("sorsa_kernels.ops.sorsa_linear")
qop = importlib.import_module("sorsa_kernels.ops.qsorsa_linear")
eop = importlib.import_module("sorsa_kernels.ops.experts")


@pytest.fixture(autouse=True)
def fresh_fallbacks(monkeypatch, backend):
    monkeypatch.setattr(dispatch, "_FALLEN_BACK", set())
    backend("triton")


def _fail_launches(monkeypatch, module: str, kernel: str, exc: Exception) -> list:
    """Make ``module.kernel``'s launches raise ``exc``; returns the list of attempted launches."""
    autotuner = getattr(importlib.import_module(module), kernel)
    calls = []

    def run(*args, **kwargs):
        calls.append(1)
        raise exc

    monkeypatch.setattr(autotuner.fn, "run", run)
    return calls


def _linear_inputs(dtype=torch.float32, M=9, n=40, m=24, r=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, n, generator=g).to(dtype).requires_grad_()
    res = torch.randn(m, n, generator=g).to(dtype)
    U, S, V = (torch.randn(*s, generator=g).requires_grad_() for s in ((m, r), (r,), (n, r)))
    b = torch.randn(m, generator=g)
    return x, res, U, S, V, b


def test_linear_forward_out_of_resources_falls_back_once_with_one_warning(monkeypatch):
    calls = _fail_launches(monkeypatch, "sorsa_kernels.kernels.sorsa_linear", "_lowrank_down_kernel",
                           OutOfResources(131072, 101376, "shared memory"))
    x, res, U, S, V, b = _linear_inputs()
    with pytest.warns(RuntimeWarning) as record:
        y = op.sorsa_linear(x, res, U, S, V, b, scale=0.5)
    messages = [str(w.message) for w in record if "failed to compile or launch" in str(w.message)]
    assert len(messages) == 1
    assert "_lowrank_down_kernel" in messages[0] and "cpu" in messages[0] and "(9, 40)" in messages[0]
    expected, _ = reference.linear_forward(x.detach().double(), res.double(), U.detach().double(),
                                           S.detach().double(), V.detach().double(), b.double(), 0.5)
    assert rel_err(y, expected) < 1e-5
    y.sum().backward()  # training goes on: the backward still runs
    assert U.grad is not None and torch.isfinite(U.grad).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same shape again: no second warning, no new attempt
        op.sorsa_linear(x, res, U, S, V, b, scale=0.5)
    assert len(calls) == 1


def test_linear_backward_ptxas_error_falls_back_to_the_reference_gradients(monkeypatch):
    _fail_launches(monkeypatch, "sorsa_kernels.kernels.sorsa_linear", "_lowrank_up_grad_kernel",
                   PTXASError("ptxas fatal: Entry function uses too much shared data"))
    x, res, U, S, V, b = _linear_inputs()
    with pytest.warns(RuntimeWarning, match="_lowrank_up_grad_kernel"):
        op.sorsa_linear(x, res, U, S, V, b, scale=0.5).sum().backward()
    xd, Ud, Sd, Vd = (t.detach().double().requires_grad_() for t in (x, U, S, V))
    reference.linear_dense(xd, res.double(), Ud, Sd, Vd, b.double(), 0.5).sum().backward()
    for got, want in ((x.grad, xd.grad), (U.grad, Ud.grad), (S.grad, Sd.grad), (V.grad, Vd.grad)):
        assert rel_err(got, want) < 1e-5


def test_an_error_that_is_no_launch_failure_is_raised(monkeypatch):
    _fail_launches(monkeypatch, "sorsa_kernels.kernels.sorsa_linear", "_lowrank_down_kernel",
                   ValueError("a real bug"))
    x, res, U, S, V, b = _linear_inputs()
    with pytest.raises(ValueError, match="a real bug"):
        op.sorsa_linear(x, res, U, S, V, b)


def test_regularizer_out_of_resources_falls_back_to_the_reference(monkeypatch):
    _fail_launches(monkeypatch, "sorsa_kernels.kernels.ortho_reg", "_ortho_gram_partial_kernel",
                   OutOfResources(131072, 101376, "shared memory"))
    g = torch.Generator().manual_seed(1)
    mats = [torch.randn(30, 6, generator=g).requires_grad_() for _ in range(3)]
    copies = [m.detach().double().requires_grad_() for m in mats]
    with pytest.warns(RuntimeWarning, match="_ortho_gram_partial_kernel"):
        value = reg_op.ortho_value_and_grad_(mats, 2.0)
    expected = reference.ortho_value_and_grad_(copies, 2.0)
    assert rel_err(value, expected) < 1e-5
    for m, c in zip(mats, copies):
        assert rel_err(m.grad, c.grad) < 1e-5


def test_qsorsa_forward_out_of_resources_falls_back_to_the_reference(monkeypatch):
    from sorsa_kernels.quant.nf4 import quantize_nf4

    _fail_launches(monkeypatch, "sorsa_kernels.kernels.nf4_gemm", "_fused_nf4_lowrank_gemm_kernel",
                   OutOfResources(221184, 101376, "shared memory"))
    g = torch.Generator().manual_seed(2)
    m, n, r = 24, 64, 4
    q = quantize_nf4(torch.randn(m, n, generator=g))
    x = torch.randn(5, n, generator=g)
    U, S, V = (torch.randn(*s, generator=g) for s in ((m, r), (r,), (n, r)))
    with pytest.warns(RuntimeWarning, match="_fused_nf4_lowrank_gemm_kernel"):
        y = qop.qsorsa_linear(x, q, U, S, V, scale=0.5)
    monkeypatch.setenv("SORSA_KERNELS_BACKEND", "reference")
    assert rel_err(y, qop.qsorsa_linear(x, q, U, S, V, scale=0.5)) < 1e-6


def _experts_inputs(counts=(4, 0, 7), m=12, n=20, r=3):
    g = torch.Generator().manual_seed(3)
    E = len(counts)
    x = torch.randn(sum(counts), n, generator=g).requires_grad_()
    res = torch.randn(E, m, n, generator=g)
    U, V = torch.randn(E, m, r, generator=g).requires_grad_(), torch.randn(E, n, r, generator=g).requires_grad_()
    S = (torch.rand(E, r, generator=g) + 0.5).requires_grad_()
    return x, torch.tensor(counts), res, U, S, V


def _experts_expected(x, counts, res, U, S, V, scale):
    """y and the gradients of y.sum() by the dense per-expert formula in float64."""
    xd, Ud, Sd, Vd = (t.detach().double().requires_grad_() for t in (x, U, S, V))
    y = reference.experts_dense(xd, counts, res.double(), Ud, Sd, Vd, None, scale)
    y.sum().backward()
    return y.detach(), (xd.grad, Ud.grad, Sd.grad, Vd.grad)


def test_experts_forward_out_of_resources_falls_back_once_with_one_warning(monkeypatch):
    calls = _fail_launches(monkeypatch, "sorsa_kernels.kernels.grouped_sorsa",
                           "_grouped_residual_lowrank_gemm_kernel", OutOfResources(131072, 101376, "shared memory"))
    x, counts, res, U, S, V = _experts_inputs()
    with pytest.warns(RuntimeWarning) as record:
        y = eop.sorsa_experts(x, counts, res, U, S, V, scale=0.5)
    messages = [str(w.message) for w in record if "failed to compile or launch" in str(w.message)]
    assert len(messages) == 1
    assert all(w in messages[0] for w in ("_grouped_residual_lowrank_gemm_kernel", "cpu", "sorsa_experts forward",
                                          "(11, 20)", "(3, 12, 3)"))
    want, grads = _experts_expected(x, counts, res, U, S, V, 0.5)
    assert rel_err(y, want) < 1e-5
    with pytest.warns(RuntimeWarning, match="sorsa_experts backward"):  # its kernels use the same GEMM
        y.sum().backward()
    for got, expected in zip((x.grad, U.grad, S.grad, V.grad), grads):
        assert rel_err(got, expected) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same shape again: no warning, no new attempt
        eop.sorsa_experts(x, counts, res, U, S, V, scale=0.5).sum().backward()
    assert len(calls) == 2


def test_experts_backward_ptxas_error_falls_back_to_the_reference_gradients(monkeypatch):
    calls = _fail_launches(monkeypatch, "sorsa_kernels.kernels.grouped_sorsa", "_grouped_weight_grad_kernel",
                           PTXASError("ptxas fatal: Entry function uses too much shared data"))
    x, counts, res, U, S, V = _experts_inputs()
    y = eop.sorsa_experts(x, counts, res, U, S, V, scale=0.5)  # the forward's kernels run
    with pytest.warns(RuntimeWarning, match="_grouped_weight_grad_kernel") as record:
        y.sum().backward()
    assert len([w for w in record if "failed to compile or launch" in str(w.message)]) == 1
    want, grads = _experts_expected(x, counts, res, U, S, V, 0.5)
    assert rel_err(y, want) < 1e-5
    for got, expected in zip((x.grad, U.grad, S.grad, V.grad), grads):
        assert rel_err(got, expected) < 1e-5
    assert len(calls) == 1


def test_qsorsa_experts_out_of_resources_falls_back_to_the_reference(monkeypatch):
    from sorsa_kernels.quant.nf4 import dequantize_nf4, quantize_nf4

    _fail_launches(monkeypatch, "sorsa_kernels.kernels.grouped_sorsa", "_grouped_residual_lowrank_gemm_kernel",
                   OutOfResources(131072, 101376, "shared memory"))
    x, counts, _, U, S, V = _experts_inputs()
    g = torch.Generator().manual_seed(4)
    qs = [quantize_nf4(torch.randn(12, 20, generator=g)) for _ in range(3)]
    st = lambda f: torch.stack([getattr(q, f).reshape(-1) for q in qs])  # noqa: E731
    nf4 = (st("packed"), st("absmax"), st("nested_absmax"), qs[0].nested_code, st("offset").reshape(3), qs[0].code)
    dense = torch.stack([dequantize_nf4(q, torch.float32) for q in qs])
    with pytest.warns(RuntimeWarning, match="_grouped_residual_lowrank_gemm_kernel"):
        y = eop.qsorsa_experts(x, counts, nf4, U, S, V, scale=0.5, expert_chunk=1)
        y.sum().backward()
    want, grads = _experts_expected(x, counts, dense, U, S, V, 0.5)
    assert rel_err(y, want) < 1e-5
    for got, expected in zip((x.grad, U.grad, S.grad, V.grad), grads):
        assert rel_err(got, expected) < 1e-5


def test_experts_error_that_is_no_launch_failure_is_raised(monkeypatch):
    _fail_launches(monkeypatch, "sorsa_kernels.kernels.grouped_sorsa", "_grouped_residual_lowrank_gemm_kernel",
                   ValueError("a real bug"))
    x, counts, res, U, S, V = _experts_inputs()
    with pytest.raises(ValueError, match="a real bug"):
        eop.sorsa_experts(x, counts, res, U, S, V)


def test_experts_bfloat16_on_a_pre_ampere_gpu_is_an_error_naming_float16(monkeypatch):
    monkeypatch.setattr(dispatch, "_capability", lambda device: 75)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    x, counts, res, U, S, V = _experts_inputs()
    with pytest.raises(TypeError, match=r"bfloat16 needs .*sm_75.*float16"):
        eop.sorsa_experts(x.detach().bfloat16(), counts, res.bfloat16(), U, S, V)


def test_bfloat16_on_a_pre_ampere_gpu_is_an_error_naming_float16(monkeypatch):
    monkeypatch.setattr(dispatch, "_capability", lambda device: 75)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    x, res, U, S, V, b = _linear_inputs(torch.bfloat16)
    with pytest.raises(TypeError, match=r"bfloat16 needs .*8\.0.*Tesla T4 is sm_75.*float16"):
        op.sorsa_linear(x, res, U, S, V, b)


def test_float16_on_a_pre_ampere_gpu_runs_the_kernels(monkeypatch):
    monkeypatch.setattr(dispatch, "_capability", lambda device: 75)
    x, res, U, S, V, b = _linear_inputs(torch.float16)
    y = op.sorsa_linear(x, res, U, S, V, b, scale=0.5)
    expected, _ = reference.linear_forward(x.detach().double(), res.double(), U.detach().double(),
                                           S.detach().double(), V.detach().double(), b.double(), 0.5)
    assert rel_err(y, expected) < 1e-2


def _triton_without_ptxas_error(monkeypatch):
    """A Triton like 3.0 whose ``triton.runtime.errors`` has no ``PTXASError``, with
    ``kernels/failures.py`` not imported yet (the fallback imports it on the first error)."""
    import sys

    import triton.runtime.errors as errors

    import sorsa_kernels.kernels as kernels_pkg

    monkeypatch.delattr(errors, "PTXASError")
    monkeypatch.delitem(sys.modules, "sorsa_kernels.kernels.failures", raising=False)
    if hasattr(kernels_pkg, "failures"):
        monkeypatch.delattr(kernels_pkg, "failures")


def test_a_real_kernel_error_surfaces_on_a_triton_without_ptxaserror(monkeypatch):
    _triton_without_ptxas_error(monkeypatch)
    _fail_launches(monkeypatch, "sorsa_kernels.kernels.sorsa_linear", "_lowrank_down_kernel", ValueError("a real bug"))
    x, res, U, S, V, b = _linear_inputs()
    with pytest.raises(ValueError, match="a real bug"):
        op.sorsa_linear(x, res, U, S, V, b)


def test_out_of_resources_still_falls_back_on_a_triton_without_ptxaserror(monkeypatch):
    _triton_without_ptxas_error(monkeypatch)
    _fail_launches(monkeypatch, "sorsa_kernels.kernels.sorsa_linear", "_lowrank_down_kernel",
                   OutOfResources(131072, 101376, "shared memory"))
    x, res, U, S, V, b = _linear_inputs()
    with pytest.warns(RuntimeWarning, match="_lowrank_down_kernel"):
        op.sorsa_linear(x, res, U, S, V, b)


def test_a_real_kernel_error_surfaces_when_the_failure_classifier_cannot_import(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sorsa_kernels.kernels.failures", None)  # import raises ImportError
    _fail_launches(monkeypatch, "sorsa_kernels.kernels.sorsa_linear", "_lowrank_down_kernel", ValueError("a real bug"))
    x, res, U, S, V, b = _linear_inputs()
    with pytest.raises(ValueError, match="a real bug"):
        op.sorsa_linear(x, res, U, S, V, b)
