"""The QSORSA custom op: forward and every gradient against a float64 oracle, both backends."""
import pytest
import torch

from sorsa_kernels.ops import reference
from sorsa_kernels.ops.qsorsa_linear import qlinear_fwd, qsorsa_linear
from sorsa_kernels.quant.nf4 import dequantize_nf4, quantize_nf4
from tests.conftest import rel_err, requires_cuda

pytest.importorskip("bitsandbytes")
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _case(m=72, n=100, r=8, seed=0, device="cpu", bias=True):
    g = torch.Generator().manual_seed(seed)
    q = quantize_nf4(torch.randn(m, n, generator=g).to(device))
    U = (torch.randn(m, r, generator=g) / 3).to(device).requires_grad_()
    S = (torch.rand(r, generator=g) + 0.5).to(device).requires_grad_()
    V = (torch.randn(n, r, generator=g) / 3).to(device).requires_grad_()
    b = torch.randn(m, generator=g).to(device) if bias else None
    return q, U, S, V, b


def _oracle(x, q, U, S, V, b, scale, dy, dtype):
    """Float64 autograd through the dense formula, with deq(Q) rounded to the compute dtype."""
    x64 = x.detach().double().requires_grad_()
    P = [p.detach().to(dtype).double().requires_grad_() for p in (U, S, V)]
    W = dequantize_nf4(q, dtype).double()
    y = reference.linear_dense(x64, W, *P, None if b is None else b.to(dtype).double(), scale)
    y.backward(dy.double())
    return y, x64.grad, [p.grad for p in P]


def _check(backend_name, backend, dtype, shape, bias, scale, device="cpu"):
    backend(backend_name)
    q, U, S, V, b = _case(seed=10 * len(shape) + 2 * bias + (dtype == torch.float16), device=device, bias=bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()
    y = qsorsa_linear(x, q, U, S, V, b, scale)
    dy = torch.randn(y.shape, generator=g).to(device, dtype)
    y.backward(dy)
    y64, dx64, (dU64, dS64, dV64) = _oracle(x, q, U, S, V, b, scale, dy, dtype)
    tol = TOL[dtype]
    assert y.dtype == dtype
    assert rel_err(y, y64) < tol
    assert rel_err(x.grad, dx64) < tol
    assert rel_err(U.grad, dU64) < tol
    assert rel_err(S.grad, dS64) < tol
    assert rel_err(V.grad, dV64) < tol


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 100), (2, 3, 100)])
def test_reference_backend_matches_float64_oracle_fp32(backend, shape, bias):
    _check("reference", backend, torch.float32, shape, bias, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 100), (2, 5, 100)])
def test_triton_backend_matches_float64_oracle(backend, dtype, shape):
    _check("triton", backend, dtype, shape, True, 2.0)


@requires_cuda
@pytest.mark.parametrize("name", ["triton", "reference"])
def test_backends_match_float64_oracle_bf16_gpu(backend, name):
    _check(name, backend, torch.bfloat16, (4, 33, 100), True, 1.0, device="cuda")


@pytest.mark.parametrize("name", ["triton", "reference"])
def test_dropout_applies_to_lowrank_branch_only_with_matching_grads(backend, name):
    backend(name)
    q, U, S, V, b = _case(seed=3)
    x = torch.randn(9, 100, requires_grad=True)
    torch.manual_seed(7)
    y = qsorsa_linear(x, q, U, S, V, b, 1.0, dropout_p=0.3, training=True)
    dy = torch.randn_like(y)
    y.backward(dy)

    torch.manual_seed(7)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.3, True)
    x64 = x.detach().double().requires_grad_()
    P = [p.detach().double().requires_grad_() for p in (U, S, V)]
    W = dequantize_nf4(q).double()
    y64 = x64 @ W.T + ((x64 * mask.double()) @ P[2] * P[1]) @ P[0].T + b.double()
    y64.backward(dy.double())
    assert rel_err(y, y64) < 1e-5
    assert rel_err(x.grad, x64.grad) < 1e-5
    assert rel_err(V.grad, P[2].grad) < 1e-5


def test_no_input_grad_is_computed_when_input_is_frozen(backend):
    backend("reference")
    q, U, S, V, b = _case(seed=4)
    x = torch.randn(5, 100)
    qsorsa_linear(x, q, U, S, V, b).sum().backward()
    assert x.grad is None and U.grad is not None


def test_op_passes_torch_library_opcheck(backend):
    backend("reference")
    q, U, S, V, b = _case(m=24, n=64, r=4, seed=5)
    x = torch.randn(3, 64, requires_grad=True)
    args = (x, None, list(q.tensors()), 24, 64, 256, U, S, V, b, 1.0)
    torch.library.opcheck(qlinear_fwd, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("name", ["triton", "reference"])
def test_op_compiles_to_one_graph_without_breaks(backend, name):
    backend(name)
    q, U, S, V, b = _case(m=24, n=64, r=4, seed=8)
    U.requires_grad_()
    x = torch.randn(3, 5, 64)
    explained = torch._dynamo.explain(lambda t: qsorsa_linear(t, q, U, S, V, b, 0.5))(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_rejects_input_with_wrong_feature_count():
    q, U, S, V, b = _case(seed=6)
    with pytest.raises(ValueError, match="input has 99 features in its last dimension, expected 100"):
        qsorsa_linear(torch.randn(2, 99), q, U, S, V, b)


@pytest.mark.parametrize("name", ["triton", "reference"])
def test_float64_input_runs_the_reference_and_matches_oracle(backend, name):
    backend(name)
    q, U, S, V, b = _case(seed=7)
    x = torch.randn(6, 100, dtype=torch.float64, requires_grad=True)
    y = qsorsa_linear(x, q, U, S, V, b, 1.0)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, dx64, _ = _oracle(x, q, U, S, V, b, 1.0, dy, torch.float64)
    assert y.dtype == torch.float64
    assert rel_err(y, y64) < 1e-12 and rel_err(x.grad, dx64) < 1e-12
