"""The fused NF4 GEMM against plain-PyTorch dequantization + the reference math.

Runs under TRITON_INTERPRET=1 on CPU (fp32, fp16); bf16 only on a GPU (the Triton 3.9
interpreter computes bf16 tl.dot wrongly).  Shapes: m·n not a multiple of 64 and
blocks straddling row ends (n = 100), an odd element count (37×51), and M, m, n, r that
no tile size divides.
"""
import pytest
import torch

from sorsa_kernels.quant.nf4 import dequantize_nf4, quantize_nf4
from tests.conftest import rel_err, requires_cuda

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SHAPES = [(72, 100, 37, 8), (37, 51, 5, 3)]  # (m, n, M, r)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _kernels():
    from sorsa_kernels.kernels import nf4_gemm

    return nf4_gemm


def _case(m, n, M, r, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    dev = _device()
    W = torch.randn(m, n, generator=g) * (1 + torch.rand(m, 1, generator=g))
    q = quantize_nf4(W.to(dev), dtype=dtype)
    mk = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)  # noqa: E731
    return q, mk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_dequantize_plus_reference_odd_shapes(dtype, bias, shape):
    m, n, M, r = shape
    q, mk = _case(m, n, M, r, 1, dtype)
    x, t, U = mk(M, n), mk(M, r), mk(m, r)
    b = mk(m) if bias else None
    y = _kernels().nf4_lowrank_forward(x, q.tensors(), q.shape, t, U, b)
    W = dequantize_nf4(q, dtype).double()
    ref = x.double() @ W.T + t.double() @ U.double().T
    if bias:
        ref = ref + b.double()
    assert y.dtype == dtype and y.shape == (M, m)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_dx_matches_dequantize_plus_reference_odd_shapes(dtype, shape):
    m, n, M, r = shape
    q, mk = _case(m, n, M, r, 2, dtype)
    dy, s, V = mk(M, m), mk(M, r), mk(n, r)
    dx = _kernels().nf4_lowrank_dx(dy, q.tensors(), q.shape, s, V)
    ref = dy.double() @ dequantize_nf4(q, dtype).double() + s.double() @ V.double().T
    assert dx.dtype == dtype and dx.shape == (M, n)
    assert rel_err(dx, ref) < TOL[dtype]


def test_forward_without_lowrank_is_the_residual_product():
    q, mk = _case(72, 100, 19, 4, 3, torch.float32)
    x = mk(19, 100)
    y = _kernels().nf4_lowrank_forward(x, q.tensors(), q.shape)
    assert rel_err(y, x.double() @ dequantize_nf4(q).double().T) < 1e-5


def test_dx_without_lowrank_is_the_residual_product():
    q, mk = _case(72, 100, 19, 4, 4, torch.float32)
    dy = mk(19, 72)
    dx = _kernels().nf4_lowrank_dx(dy, q.tensors(), q.shape)
    assert rel_err(dx, dy.double() @ dequantize_nf4(q).double()) < 1e-5


def test_forward_reads_strided_input():
    q, mk = _case(72, 100, 11, 8, 5, torch.float32)
    x = mk(100, 11).T  # column-major view
    t, U = mk(11, 8), mk(72, 8)
    y = _kernels().nf4_lowrank_forward(x, q.tensors(), q.shape, t, U)
    ref = x.double() @ dequantize_nf4(q).double().T + t.double() @ U.double().T
    assert rel_err(y, ref) < 1e-5


def test_forward_rejects_operand_of_wrong_width():
    q, mk = _case(72, 100, 4, 8, 6, torch.float32)
    with pytest.raises(ValueError, match="operand has 99 columns but the NF4 matrix is 72×100"):
        _kernels().nf4_lowrank_forward(mk(4, 99), q.tensors(), q.shape)


def test_forward_rejects_lowrank_operands_of_wrong_shape():
    q, mk = _case(72, 100, 4, 8, 7, torch.float32)
    with pytest.raises(ValueError, match="low-rank operands"):
        _kernels().nf4_lowrank_forward(mk(4, 100), q.tensors(), q.shape, mk(4, 8), mk(71, 8))


@requires_cuda
@pytest.mark.parametrize("shape", SHAPES + [(1000, 1100, 300, 64)])
def test_forward_and_dx_match_reference_bf16_gpu(shape):
    m, n, M, r = shape
    q, mk = _case(m, n, M, r, 8, torch.bfloat16)
    x, t, U, b, dy, s, V = mk(M, n), mk(M, r), mk(m, r), mk(m), mk(M, m), mk(M, r), mk(n, r)
    W = dequantize_nf4(q, torch.bfloat16).double()
    y = _kernels().nf4_lowrank_forward(x, q.tensors(), q.shape, t, U, b)
    assert rel_err(y, x.double() @ W.T + t.double() @ U.double().T + b.double()) < 1e-2
    dx = _kernels().nf4_lowrank_dx(dy, q.tensors(), q.shape, s, V)
    assert rel_err(dx, dy.double() @ W + s.double() @ V.double().T) < 1e-2


@requires_cuda
def test_forward_matches_reference_fp32_large_gpu():
    m, n, M, r = 1000, 1100, 300, 64
    q, mk = _case(m, n, M, r, 9, torch.float32)
    x, t, U = mk(M, n), mk(M, r), mk(m, r)
    y = _kernels().nf4_lowrank_forward(x, q.tensors(), q.shape, t, U)
    ref = x.double() @ dequantize_nf4(q).double().T + t.double() @ U.double().T
    assert rel_err(y, ref) < 1e-5


# --------------------------------------------------------------------------- large-M path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(72, 100), (37, 51), (5, 130)], ids=["72x100", "37x51-odd", "5x130"])
def test_dequantize_kernel_matches_reference_dequantization(dtype, shape):
    q, _ = _case(*shape, 1, 1, 10, dtype)
    W = _kernels().nf4_dequantize(q.tensors(), q.shape, dtype)
    ref = dequantize_nf4(q, dtype)
    assert W.shape == ref.shape and W.dtype == dtype
    assert torch.equal(W, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_large_M_forward_dequantizes_once_and_matches_reference(dtype, bias, monkeypatch):
    k = _kernels()
    M = k.configs.DEQUANT_MIN_M + 11
    q, mk = _case(72, 100, M, 5, 11, dtype)
    x, t, U = mk(M, 100), mk(M, 5), mk(72, 5)
    b = mk(72) if bias else None
    calls = []
    real = k.nf4_dequantize
    monkeypatch.setattr(k, "nf4_dequantize", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    y = k.nf4_lowrank_forward(x, q.tensors(), q.shape, t, U, b)
    ref = x.double() @ dequantize_nf4(q, dtype).double().T + t.double() @ U.double().T
    if bias:
        ref = ref + b.double()
    assert calls == [1]
    assert y.dtype == dtype and y.shape == (M, 72)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("lowrank", [True, False])
def test_large_M_dx_matches_reference(lowrank):
    M = _kernels().configs.DEQUANT_MIN_M
    q, mk = _case(37, 51, M, 3, 12, torch.float32)
    dy, s, V = mk(M, 37), mk(M, 3), mk(51, 3)
    args = (s, V) if lowrank else ()
    dx = _kernels().nf4_lowrank_dx(dy, q.tensors(), q.shape, *args)
    ref = dy.double() @ dequantize_nf4(q).double()
    if lowrank:
        ref = ref + s.double() @ V.double().T
    assert dx.shape == (M, 51)
    assert rel_err(dx, ref) < 1e-5


def test_small_M_keeps_the_fused_dequant_kernel(monkeypatch):
    k = _kernels()
    monkeypatch.setattr(k, "nf4_dequantize", lambda *a, **kw: pytest.fail("small M must not dequantize"))
    q, mk = _case(72, 100, 9, 4, 13, torch.float32)
    x = mk(9, 100)
    y = k.nf4_lowrank_forward(x, q.tensors(), q.shape)
    assert rel_err(y, x.double() @ dequantize_nf4(q).double().T) < 1e-5


def test_nf4_prune_keeps_only_32x32_a_tiles_for_ieee_fp32():
    # fp32 under "highest" (FMA dots): 64×32 and 16×64 A tiles spilled 0.8-1.4 KB per thread on sm_80.
    cfgs = pytest.importorskip("sorsa_kernels.kernels.nf4_gemm_configs")
    f32 = torch.empty(1, dtype=torch.float32)
    every = cfgs.GPU_CONFIGS
    assert cfgs.prune_nf4_configs(every, dict(a_ptr=f32), INPUT_PRECISION="tf32") == every
    kept = cfgs.prune_nf4_configs(every, dict(a_ptr=f32), INPUT_PRECISION="ieee")
    assert kept and all(c.kwargs["BLOCK_M"] <= 32 and c.kwargs["BLOCK_K"] <= 32 for c in kept)
    bf16 = torch.empty(1, dtype=torch.bfloat16)  # the launcher passes "ieee" for 16-bit operands too
    assert cfgs.prune_nf4_configs(every, dict(a_ptr=bf16), INPUT_PRECISION="ieee") == every
