"""Every kernel launch runs under ``torch.cuda.device(<the input's device>)``.

Triton launches on the *current* CUDA device; a model spread over several GPUs must not
launch a layer's kernels on another GPU.  Without a GPU the guard is checked on CPU: the
test makes the launch helpers treat CPU tensors as CUDA ones (``_launch._on_cuda``),
replaces ``torch.cuda.device`` by a recorder, and wraps every kernel of the module so that
each launch records whether it happened inside an entered guard.
"""
from __future__ import annotations

import pytest
import torch

from sorsa_kernels.quant.nf4 import quantize_nf4

pytest.importorskip("triton")
from sorsa_kernels.kernels import _launch, nf4_gemm, nf4_gemm_configs, ortho_reg, residual_gemm  # noqa: E402
from sorsa_kernels.kernels import sorsa_linear as sl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Recorder:
    """Stands in for ``torch.cuda.device``: records the device and the nesting depth."""

    def __init__(self):
        self.entered = []
        self.depth = 0
        self.launches = []

    def __call__(self, device):
        rec = self

        class _Ctx:
            def __enter__(self):
                rec.entered.append(torch.device(device))
                rec.depth += 1

            def __exit__(self, *exc):
                rec.depth -= 1
                return False

        return _Ctx()


class _KernelSpy:
    """Wraps a kernel object: ``spy[grid](...)`` records the guard depth, then launches."""

    def __init__(self, kernel, name, rec):
        self.kernel, self.name, self.rec = kernel, name, rec

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.rec.launches.append((self.name, self.rec.depth))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def guard(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(_launch, "_on_cuda", lambda device: True)
    monkeypatch.setattr(torch.cuda, "device", rec)
    for module in (sl, residual_gemm, nf4_gemm, ortho_reg):
        for name in dir(module):
            if name.endswith("_kernel") and hasattr(getattr(module, name), "__getitem__"):
                monkeypatch.setattr(module, name, _KernelSpy(getattr(module, name), name, rec))
    return rec


def _assert_guarded(rec, device, expected_kernels):
    assert rec.entered and all(d == torch.device(device) for d in rec.entered), rec.entered
    launched = {name for name, _ in rec.launches}
    assert expected_kernels <= launched, launched
    outside = [name for name, depth in rec.launches if depth == 0]
    assert not outside, f"launched outside the device guard: {outside}"


def _sorsa_inputs(M=9, n=40, m=24, r=5):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    return mk(M, n), mk(m, n), mk(m, r), mk(r).abs() + 0.5, mk(n, r), mk(m), mk(M, m)


def test_fused_forward_launches_under_the_input_device_guard(guard):
    x, Wr, U, S, V, b, _ = _sorsa_inputs()
    sl.fused_forward(x, Wr, U, S, V, b, 0.5)
    _assert_guarded(guard, x.device, {"_lowrank_down_kernel", "_fused_residual_lowrank_gemm_kernel"})


def test_fused_backward_launches_under_the_input_device_guard(guard):
    x, Wr, U, S, V, _, dy = _sorsa_inputs()
    u = x @ V
    sl.fused_backward(dy, x, u, Wr, U, S, V, 0.5, True)
    _assert_guarded(guard, x.device, {
        "_lowrank_up_grad_kernel", "_lowrank_weight_grad_kernel", "_fused_residual_lowrank_gemm_kernel",
    })


@pytest.mark.parametrize("M", [5, 300], ids=["fused-small-M", "dequant-large-M"])
def test_nf4_launchers_run_under_the_input_device_guard(guard, M):
    g = torch.Generator().manual_seed(1)
    m, n, r = 24, 40, 4
    q = quantize_nf4(torch.randn(m, n, generator=g).to(DEVICE))
    x, t, U = (torch.randn(*s, generator=g).to(DEVICE) for s in ((M, n), (M, r), (m, r)))
    nf4_gemm.nf4_lowrank_forward(x, q.tensors(), q.shape, t, U)
    dy, s_, V = (torch.randn(*s, generator=g).to(DEVICE) for s in ((M, m), (M, r), (n, r)))
    nf4_gemm.nf4_lowrank_dx(dy, q.tensors(), q.shape, s_, V)
    expected = ({"_fused_nf4_lowrank_gemm_kernel"} if M < nf4_gemm_configs.DEQUANT_MIN_M
                else {"_nf4_dequant_kernel", "_fused_residual_lowrank_gemm_kernel"})
    _assert_guarded(guard, x.device, expected)


def test_regularizer_launches_under_the_matrices_device_guard(guard):
    g = torch.Generator().manual_seed(2)
    mats = [torch.randn(30, 6, generator=g).to(DEVICE).requires_grad_() for _ in range(2)]
    ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0)
    _assert_guarded(guard, mats[0].device, {
        "_ortho_gram_partial_kernel", "_ortho_norm_kernel", "_ortho_grad_update_kernel",
    })


def test_guard_is_a_no_op_context_off_cuda():
    assert not _launch._on_cuda(torch.device("cpu"))
    with _launch.device_guard(torch.zeros(1)):
        pass
