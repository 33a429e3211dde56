"""The ``sorsa_kernels::linear_fwd/linear_bwd`` ops end to end through ``SORSALinear``.

Each case runs autograd with the Triton backend (the interpreter on CPU) and with the
reference backend, and checks both against the float64 ``reference.linear_dense`` oracle
differentiated by PyTorch.  ``torch.compile`` must trace the layer without graph breaks.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sorsa_kernels import SORSALinear
from sorsa_kernels.ops import reference
from tests.conftest import rel_err, requires_cuda

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16", marks=requires_cuda),
]


def _layer(n=100, m=72, r=5, bias=True, dtype=torch.float32, alpha=16.0, seed=0, **kw):
    """A SORSALinear with residual/bias in ``dtype`` and fp32 adapters moved off the SVD point."""
    torch.manual_seed(seed)
    lin = nn.Linear(n, m, bias=bias)
    if bias:
        with torch.no_grad():
            lin.bias.normal_()  # a bias large enough that dropping it would fail the checks
    layer = SORSALinear.from_linear(lin, r, alpha=alpha, residual_dtype=dtype, **kw).to(DEVICE)
    with torch.no_grad():
        layer.U.add_(0.1 * torch.randn_like(layer.U))
        layer.S.mul_(1.5)
        layer.V.add_(0.1 * torch.randn_like(layer.V))
    return layer


def _run(layer, x, dy):
    """Forward + backward; returns (y, x.grad, U.grad, S.grad, V.grad) and clears the grads."""
    x = x.detach().requires_grad_()
    y = layer(x)
    y.backward(dy)
    out = (y.detach(), x.grad, layer.U.grad.clone(), layer.S.grad.clone(), layer.V.grad.clone())
    layer.zero_grad(set_to_none=True)
    return out


def _oracle(layer, x, dy):
    """The same quantities from the float64 dense formula and PyTorch autograd."""
    x64 = x.detach().double().requires_grad_()
    U, S, V = (p.detach().double().requires_grad_() for p in (layer.U, layer.S, layer.V))
    b = None if layer.bias is None else layer.bias.double()
    y = reference.linear_dense(x64, layer.residual.double(), U, S, V, b, layer.scale)
    y.backward(dy.double())
    return y.detach(), x64.grad, U.grad, S.grad, V.grad


NAMES = ("y", "dx", "dU", "dS", "dV")
CASES = [  # (leading shape, n, m, r, bias): 2-D and 3-D inputs, with and without bias
    pytest.param((7,), 100, 72, 5, True, id="2d-bias"),
    pytest.param((2, 17), 72, 24, 16, False, id="3d-nobias"),
    pytest.param((3, 11), 24, 100, 1, True, id="3d-bias"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead, n, m, r, bias", CASES)
def test_triton_backend_autograd_matches_float64_oracle(backend, lead, n, m, r, bias, dtype):
    backend("triton")
    layer = _layer(n, m, r, bias=bias, dtype=dtype)
    g = torch.Generator().manual_seed(n + m + r)
    x = torch.randn(*lead, n, generator=g).to(DEVICE, dtype)
    dy = torch.randn(*lead, m, generator=g).to(DEVICE, dtype)
    got = _run(layer, x, dy)
    ref = _oracle(layer, x, dy)
    assert got[0].shape == (*lead, m) and got[1].shape == x.shape
    assert got[1].dtype == dtype and got[2].dtype == torch.float32  # adapter grads in param dtype
    errors = {name: rel_err(a, b) for name, a, b in zip(NAMES, got, ref)}
    assert max(errors.values()) < TOL[dtype], errors


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_and_reference_backends_agree(backend, dtype):
    layer = _layer(72, 100, 5, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 72, generator=g).to(DEVICE, dtype)
    dy = torch.randn(2, 9, 100, generator=g).to(DEVICE, dtype)
    backend("triton")
    tri = _run(layer, x, dy)
    backend("reference")
    ref = _run(layer, x, dy)
    errors = {name: rel_err(a, b) for name, a, b in zip(NAMES, tri, ref)}
    assert max(errors.values()) < TOL[dtype], errors


def test_triton_backend_calls_the_fused_kernels(backend, monkeypatch):
    from sorsa_kernels.kernels import sorsa_linear as kernels

    calls = []
    for name in ("fused_forward", "fused_backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=real, _n=name: calls.append(_n) or _f(*a))
    backend("triton")
    layer = _layer(24, 24, 5)
    layer(torch.randn(3, 24, device=DEVICE, requires_grad=True)).sum().backward()
    assert calls == ["fused_forward", "fused_backward"]


def test_float64_runs_the_reference_under_triton_backend(backend, monkeypatch):
    from sorsa_kernels.kernels import sorsa_linear as kernels

    def fail(*a):
        raise AssertionError("float64 must not reach the Triton kernels")

    monkeypatch.setattr(kernels, "fused_forward", fail)
    monkeypatch.setattr(kernels, "fused_backward", fail)
    backend("triton")
    layer = _layer(24, 24, 5, dtype=torch.float64).double()
    x = torch.randn(3, 24, dtype=torch.float64, device=DEVICE)
    dy = torch.randn(3, 24, dtype=torch.float64, device=DEVICE)
    got = _run(layer, x, dy)
    ref = _oracle(layer, x, dy)
    # float64 throughout, except that reference.linear_backward reduces dS in float32
    assert max(rel_err(a, b) for a, b in zip(got, ref)) < 1e-6


def test_dropout_path_matches_reference_backend(backend):
    # Dropout sends the low-rank branch through the op with residual=None.
    layer = _layer(72, 24, 5, dropout=0.25).train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 72, generator=g).to(DEVICE)
    dy = torch.randn(2, 7, 24, generator=g).to(DEVICE)
    results = {}
    for name in ("triton", "reference"):
        backend(name)
        torch.manual_seed(123)  # same dropout mask for both backends
        results[name] = _run(layer, x, dy)
    errors = {n: rel_err(a, b) for n, a, b in zip(NAMES, results["triton"], results["reference"])}
    assert max(errors.values()) < 1e-5, errors


def test_backward_without_input_grad_returns_adapter_grads_only(backend):
    backend("triton")
    layer = _layer(72, 24, 5)
    x = torch.randn(7, 72, device=DEVICE)  # no requires_grad: dx is skipped
    dy = torch.randn(7, 24, device=DEVICE)
    layer(x).backward(dy)
    _, _, dU, dS, dV = _oracle(layer, x, dy)
    assert rel_err(layer.U.grad, dU) < 1e-5
    assert rel_err(layer.S.grad, dS) < 1e-5
    assert rel_err(layer.V.grad, dV) < 1e-5


# ----------------------------------------------------------------------------- torch.compile
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = _layer(24, 40, 4)
        self.down = _layer(40, 24, 4, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x))) + x


@pytest.mark.parametrize("name", ["reference", "triton"])
def test_compile_has_no_graph_breaks(backend, name):
    backend(name)
    torch._dynamo.reset()
    model = _Block()
    x = torch.randn(2, 5, 24, device=DEVICE)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", ["reference", "triton"])
def test_compiled_model_matches_eager_forward_and_grads(backend, name):
    backend(name)
    torch._dynamo.reset()
    model = _Block()
    x = torch.randn(2, 5, 24, device=DEVICE)
    eager_y = model(x)
    eager_y.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert rel_err(y, eager_y) < 1e-6
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(grads, eager_grads))


# ----------------------------------------------------------------------------- trainable bias / frozen residual
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["triton", "reference"])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["fused", "dropout"])
def test_trainable_bias_gets_the_row_sum_gradient(backend, name, dtype, dropout):
    backend(name)
    layer = _layer(40, 24, 5, dtype=dtype, dropout=dropout).train()
    layer.bias.requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 40, generator=g).to(DEVICE, dtype)
    dy = torch.randn(2, 9, 24, generator=g).to(DEVICE, dtype)
    torch.manual_seed(7)
    layer(x).backward(dy)
    assert layer.bias.grad is not None and layer.bias.grad.dtype == dtype
    # float64 oracle: PyTorch autograd through the dense formula with a trainable bias
    # (dropout does not touch the bias branch, so its gradient is the same formula).
    b64 = layer.bias.detach().double().requires_grad_()
    y = reference.linear_dense(x.double(), layer.residual.double(), layer.U.double(), layer.S.double(),
                               layer.V.double(), b64, layer.scale)
    y.backward(dy.double())
    assert rel_err(layer.bias.grad, b64.grad) < TOL[dtype]
    assert rel_err(layer.bias.grad, dy.double().sum((0, 1))) < TOL[dtype]


def test_frozen_bias_still_gets_no_gradient(backend):
    backend("triton")
    layer = _layer(40, 24, 5)
    layer(torch.randn(4, 40, device=DEVICE)).sum().backward()
    assert layer.bias.grad is None and layer.U.grad is not None


@pytest.mark.parametrize("name", ["triton", "reference"])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["fused", "dropout"])
def test_residual_that_requires_grad_is_rejected_with_message(backend, name, dropout):
    backend(name)
    layer = _layer(40, 24, 5, dropout=dropout).train()
    layer.residual.requires_grad_(True)
    with pytest.raises(ValueError, match="residual is frozen but was given with requires_grad=True"):
        layer(torch.randn(4, 40, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_eager_reference_function_matches_the_custom_op(dtype, bias, monkeypatch):
    """The eager reference Function (no custom-op dispatch) gives the op's output and every gradient."""
    import importlib

    op = importlib.import_module("sorsa_kernels.ops.sorsa_linear")
    monkeypatch.setenv("SORSA_KERNELS_BACKEND", "reference")
    torch.manual_seed(3)
    M, n, m, r = 37, 29, 23, 5
    x = torch.randn(2, M, n, dtype=dtype, requires_grad=True)
    res = torch.randn(m, n, dtype=dtype)
    U, S, V = (torch.randn(*s, dtype=dtype, requires_grad=True) for s in ((m, r), (r,), (n, r)))
    b = torch.randn(m, dtype=dtype, requires_grad=True) if bias else None
    inputs = [t for t in (x, U, S, V, b) if t is not None]
    dy = torch.randn(2, M, m, dtype=dtype)

    def run(fn):
        y = fn()
        return [y, *torch.autograd.grad(y, inputs, dy)]

    calls = []
    monkeypatch.setattr(op, "linear_fwd", lambda *a: calls.append(1) or op.torch.ops.sorsa_kernels.linear_fwd(*a))
    eager = run(lambda: op.sorsa_linear(x, res, U, S, V, b, scale=0.7))
    assert not calls, "the eager reference path went through the custom op's dispatch"
    custom = run(lambda: op.linear_fwd(x, res, U, S, V, b, 0.7)[0])
    assert calls
    for a, e in zip(eager, custom):
        assert rel_err(a, e) < 1e-12


def test_dropout_path_casts_a_frozen_residual_once_not_every_step(monkeypatch):
    """The dropout path's residual in the compute dtype is reused while the residual is
    unchanged (no m×n copy per step) and re-cast when it changes in place."""
    import importlib

    op = importlib.import_module("sorsa_kernels.ops.sorsa_linear")
    monkeypatch.setenv("SORSA_KERNELS_BACKEND", "reference")
    torch.manual_seed(4)
    res = torch.randn(6, 8, dtype=torch.float64)
    first = op._residual_as(res, torch.float32)
    assert op._residual_as(res, torch.float32) is first
    assert torch.equal(first, res.float())
    with torch.no_grad():
        res.mul_(2.0)
    again = op._residual_as(res, torch.float32)
    assert again is not first and torch.equal(again, res.float())
    x = torch.randn(3, 8, requires_grad=True)
    U, S, V = torch.randn(6, 2), torch.rand(2), torch.randn(8, 2)
    torch.manual_seed(5)
    y = op.sorsa_linear(x, res, U, S, V, dropout_p=0.5, training=True)
    torch.manual_seed(5)
    base = torch.nn.functional.linear(x, res.float())
    want = base + op.sorsa_linear(torch.nn.functional.dropout(x, 0.5, True), None, U, S, V)
    assert torch.equal(y, want)
