"""The kernel-op seam (ops/kernel_op.py) on a toy op described from outside the package:
the one decision per call, the kernel or the reference, the fallback on a launch failure,
and the bfloat16 rule under the Triton interpreter."""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from sorsa_kernels.ops.kernel_op import KernelOp

pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

dispatch = importlib.import_module("sorsa_kernels.ops.dispatch")


@pytest.fixture(autouse=True)
def fresh_fallbacks(monkeypatch):
    monkeypatch.setattr(dispatch, "_FALLEN_BACK", set())


def _toy(kernel, interpreter_bf16=False) -> KernelOp:
    """``y = s·x`` with the kernel given; keyed by device, dtype and length."""
    return KernelOp(
        name="toy forward",
        key=lambda x, s: (x.device, x.dtype, x.shape[0]),
        shape=lambda x, s: f"x {tuple(x.shape)}",
        kernel=kernel,
        reference=lambda x, s: x * s,
        tensors=lambda x, s: (x,),
        interpreter_bf16=interpreter_bf16,
    )


def test_triton_backend_decides_the_kernel_and_runs_it(backend):
    backend("triton")
    calls = []
    op = _toy(lambda x, s: calls.append(x.shape) or x * s + 1)
    x = torch.randn(5)
    assert op.decide(x, 2.0) is True
    assert torch.equal(op(True, x, 2.0), x * 2.0 + 1) and calls == [(5,)]


def test_reference_backend_decides_the_reference_and_never_calls_the_kernel(backend):
    backend("reference")
    op = _toy(lambda x, s: pytest.fail("kernel called"))
    x = torch.randn(5)
    assert op.decide(x, 2.0) is False
    assert torch.equal(op(False, x, 2.0), x * 2.0)


def test_float64_is_decided_to_the_reference(backend):
    backend("triton")
    assert _toy(lambda x, s: x).decide(torch.randn(5, dtype=torch.float64), 2.0) is False


def test_a_launch_failure_warns_once_and_sends_that_key_to_the_reference(backend):
    backend("triton")
    calls = []

    def kernel(x, s):
        calls.append(1)
        raise OutOfResources(131072, 101376, "shared memory")

    op = _toy(kernel)
    x = torch.randn(5)
    with pytest.warns(RuntimeWarning, match=r"toy forward with x \(5,\)"):
        assert torch.equal(op(op.decide(x, 2.0), x, 2.0), x * 2.0)
    assert op.decide(x, 2.0) is False  # this key runs the reference from now on
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(op(True, x, 2.0), x * 2.0)  # even a stale True decision: no second try
    assert len(calls) == 1
    assert op.decide(torch.randn(6), 2.0) is True  # another key still takes the kernel


def test_an_error_that_is_no_launch_failure_is_raised(backend):
    backend("triton")

    def kernel(x, s):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        _toy(kernel)(True, torch.randn(5), 2.0)


def test_bfloat16_under_the_interpreter_is_refused_unless_the_op_upcasts(backend, monkeypatch):
    backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(5).bfloat16()
    with pytest.raises(TypeError, match="computes bfloat16 tl.dot wrongly"):
        _toy(lambda x, s: x).decide(x, 2.0)
    assert _toy(lambda x, s: x, interpreter_bf16=True).decide(x, 2.0) is True
