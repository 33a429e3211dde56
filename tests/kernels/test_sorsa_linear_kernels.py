"""The fused SORSA linear kernels against ``ops/reference.py`` (float64 expected values).

Without a GPU these run in the Triton interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before the kernel module is imported), where every kernel uses 16-wide
tiles: the shapes below are chosen so that no tile size divides them and every loop runs
more than one tile.  bf16 and the large shapes run only on a CUDA GPU.
"""
from __future__ import annotations

import functools

import pytest
import torch

from sorsa_kernels.ops import reference
from tests.conftest import rel_err, requires_cuda

kernels = pytest.importorskip("sorsa_kernels.kernels.sorsa_linear")
gemm = pytest.importorskip("sorsa_kernels.kernels.residual_gemm")
kcfg = pytest.importorskip("sorsa_kernels.kernels.sorsa_linear_configs")
gcfg = pytest.importorskip("sorsa_kernels.kernels.residual_gemm_configs")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SCALE = 0.7

# (M, n=in, m=out, r): every value of M ∈ {1, 7, 33}, n, m ∈ {24, 72, 100}, r ∈ {1, 5, 16}
# appears at least once; none is a multiple of the 16-wide interpreter tiles except r=16.
# r = 37 runs the GEMMs' rank segment over several K steps and, in the interpreter (32-wide
# rank tiles), the skinny kernels over two rank tiles.
SHAPES = [(1, 24, 100, 16), (7, 72, 24, 1), (33, 100, 72, 5), (33, 24, 72, 16), (7, 100, 100, 37)]
SHAPE_IDS = ["M1-n24-m100-r16", "M7-n72-m24-r1", "M33-n100-m72-r5", "M33-n24-m72-r16", "M7-n100-m100-r37"]
CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [pytest.param(torch.bfloat16, marks=requires_cuda, id="bfloat16")]
DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in CPU_DTYPES] + GPU_DTYPES
GRADS = ["dx", "dU", "dS", "dV"]


def _inputs(M, n, m, r, dtype, *, bias=True, residual=True, seed=0, adapter_dtype=torch.float32):
    """Random non-zero inputs; x/residual/bias in ``dtype``, adapters in ``adapter_dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, n, generator=g)
    Wr = torch.randn(m, n, generator=g) / n**0.5
    U = torch.randn(m, r, generator=g) / m**0.5
    S = torch.rand(r, generator=g) + 0.5
    V = torch.randn(n, r, generator=g) / n**0.5
    b = torch.randn(m, generator=g)
    dy = torch.randn(M, m, generator=g)
    to = lambda t, d: t.to(DEVICE, d)  # noqa: E731
    return dict(
        x=to(x, dtype),
        residual=to(Wr, dtype) if residual else None,
        U=to(U, adapter_dtype),
        S=to(S, adapter_dtype),
        V=to(V, adapter_dtype),
        bias=to(b, dtype) if bias else None,
        dy=to(dy, dtype),
    )


def _f64(t):
    return None if t is None else t.double()


def _reference_forward(inp):
    return reference.linear_forward(
        _f64(inp["x"]), _f64(inp["residual"]), _f64(inp["U"]), _f64(inp["S"]), _f64(inp["V"]),
        _f64(inp["bias"]), SCALE,
    )


def _reference_backward(inp, needs_dx=True):
    _, u = _reference_forward(inp)
    return reference.linear_backward(
        _f64(inp["dy"]), _f64(inp["x"]), u, _f64(inp["residual"]), _f64(inp["U"]), _f64(inp["S"]),
        _f64(inp["V"]), SCALE, needs_dx,
    )


@functools.lru_cache(maxsize=None)
def _backward_case(shape, dtype, residual):
    """Kernel and float64-reference gradients of one case (cached: four tests read each)."""
    inp = _inputs(*shape, dtype, residual=residual, seed=sum(shape))
    _, u = kernels.fused_forward(inp["x"], inp["residual"], inp["U"], inp["S"], inp["V"], None, SCALE)
    got = kernels.fused_backward(
        inp["dy"], inp["x"], u, inp["residual"], inp["U"], inp["S"], inp["V"], SCALE, True
    )
    return dict(zip(GRADS, got)), dict(zip(GRADS, _reference_backward(inp)))


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_matches_reference_odd_shapes(shape, dtype, bias):
    inp = _inputs(*shape, dtype, bias=bias, seed=sum(shape))
    y, u = kernels.fused_forward(inp["x"], inp["residual"], inp["U"], inp["S"], inp["V"], inp["bias"], SCALE)
    y_ref, u_ref = _reference_forward(inp)
    assert y.dtype == dtype and u.dtype == dtype
    assert y.shape == y_ref.shape and u.shape == u_ref.shape
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(u, u_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[1:3], ids=SHAPE_IDS[1:3])
def test_forward_without_residual_computes_only_lowrank_branch(shape, dtype):
    inp = _inputs(*shape, dtype, residual=False, bias=True, seed=1)
    y, _ = kernels.fused_forward(inp["x"], None, inp["U"], inp["S"], inp["V"], inp["bias"], SCALE)
    y_ref, _ = _reference_forward(inp)
    assert rel_err(y, y_ref) < TOL[dtype]


def test_forward_accepts_non_contiguous_operands():
    M, n, m, r = 33, 72, 100, 5
    inp = _inputs(M, n, m, r, torch.float32, seed=2)
    x_t = inp["x"].T.contiguous().T            # column-major x
    res_t = inp["residual"].T.contiguous().T   # column-major residual
    U_t = inp["U"].T.contiguous().T
    V_t = inp["V"].T.contiguous().T
    assert not x_t.is_contiguous() and not res_t.is_contiguous()
    y, u = kernels.fused_forward(x_t, res_t, U_t, inp["S"], V_t, inp["bias"], SCALE)
    y_ref, u_ref = _reference_forward(inp)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(u, u_ref) < 1e-5


def test_forward_casts_fp32_adapters_and_residual_to_fp16_input():
    inp = _inputs(33, 100, 72, 5, torch.float16, seed=3)
    residual32 = inp["residual"].float()
    y, u = kernels.fused_forward(inp["x"], residual32, inp["U"], inp["S"], inp["V"], inp["bias"], SCALE)
    y_ref, _ = _reference_forward(inp)
    assert y.dtype == torch.float16 and u.dtype == torch.float16
    assert rel_err(y, y_ref) < 1e-2


def test_forward_empty_batch_returns_empty_outputs():
    inp = _inputs(1, 24, 72, 5, torch.float32)
    x = inp["x"][:0]
    y, u = kernels.fused_forward(x, inp["residual"], inp["U"], inp["S"], inp["V"], inp["bias"], SCALE)
    assert y.shape == (0, 72) and u.shape == (0, 5)


# ----------------------------------------------------------------------------- backward
@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_backward_matches_reference_odd_shapes(shape, dtype, grad):
    got, ref = _backward_case(shape, dtype, True)
    assert got[grad].shape == ref[grad].shape
    assert rel_err(got[grad], ref[grad]) < TOL[dtype]


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_without_residual_matches_reference(dtype, grad):
    got, ref = _backward_case((33, 100, 72, 5), dtype, False)
    assert rel_err(got[grad], ref[grad]) < TOL[dtype]


def test_backward_returns_adapter_grads_in_parameter_dtype():
    inp = _inputs(7, 72, 24, 5, torch.float16, adapter_dtype=torch.float32, seed=4)
    _, u = kernels.fused_forward(inp["x"], inp["residual"], inp["U"], inp["S"], inp["V"], None, SCALE)
    dx, dU, dS, dV = kernels.fused_backward(
        inp["dy"], inp["x"], u, inp["residual"], inp["U"], inp["S"], inp["V"], SCALE, True
    )
    assert (dx.dtype, dU.dtype, dS.dtype, dV.dtype) == (torch.float16,) + (torch.float32,) * 3


def test_backward_skips_dx_when_not_needed():
    inp = _inputs(7, 72, 24, 5, torch.float32, seed=5)
    _, u = kernels.fused_forward(inp["x"], inp["residual"], inp["U"], inp["S"], inp["V"], None, SCALE)
    dx, dU, _, _ = kernels.fused_backward(
        inp["dy"], inp["x"], u, inp["residual"], inp["U"], inp["S"], inp["V"], SCALE, False
    )
    assert dx is None
    assert rel_err(dU, _reference_backward(inp)[1]) < 1e-5


def test_backward_accepts_non_contiguous_operands():
    inp = _inputs(33, 72, 100, 5, torch.float32, seed=6)
    nc = lambda t: t.T.contiguous().T  # noqa: E731
    _, u = kernels.fused_forward(inp["x"], inp["residual"], inp["U"], inp["S"], inp["V"], None, SCALE)
    got = kernels.fused_backward(
        nc(inp["dy"]), nc(inp["x"]), nc(u), nc(inp["residual"]), nc(inp["U"]), inp["S"], nc(inp["V"]),
        SCALE, True,
    )
    for g, r in zip(got, _reference_backward(inp)):
        assert rel_err(g, r) < 1e-5


def test_weight_grads_reduce_over_split_row_chunks():
    # M = 33 is reduced in two chunks in the interpreter (one on a GPU is also fine);
    # the gradients must equal the one-pass reduction.
    if DEVICE == "cpu":
        assert kcfg.num_m_splits(33, 100, 5, torch.device("cpu")) == 2
    got, ref = _backward_case((33, 100, 72, 5), torch.float32, True)
    assert rel_err(got["dU"], ref["dU"]) < 1e-5
    assert rel_err(got["dV"], ref["dV"]) < 1e-5


def _adapter_grads_with_weight_grad_config(monkeypatch, cfg, shape=(100, 72, 40, 37)):
    """(dU, dV, dS) with the weight-grad kernel forced to the single config ``cfg``."""
    monkeypatch.setattr(kernels._lowrank_weight_grad_kernel, "configs", [cfg])
    monkeypatch.setattr(kernels._lowrank_weight_grad_kernel, "cache", {})
    inp = _inputs(*shape, torch.float32, seed=11)
    _, u = kernels.fused_forward(inp["x"], inp["residual"], inp["U"], inp["S"], inp["V"], None, SCALE)
    _, dU, dS, dV = kernels.fused_backward(
        inp["dy"], inp["x"], u, inp["residual"], inp["U"], inp["S"], inp["V"], SCALE, False
    )
    return dU, dV, dS


def test_adapter_grads_are_bitwise_independent_of_the_tuned_weight_grad_config(monkeypatch, k_sequential_dot):
    # Every GPU config (and the interpreter's) must give the same bits: the split boundaries
    # and the step over M come from the launcher, the config only picks the output tile.
    # M = 100 reduces in two splits of several steps; r = 37 spans two interpreter rank tiles.
    configs = kcfg.weight_grad_configs(interpret=True) + kcfg.weight_grad_configs(interpret=False)
    first = _adapter_grads_with_weight_grad_config(monkeypatch, configs[0])
    ref = _reference_backward(_inputs(100, 72, 40, 37, torch.float32, seed=11), needs_dx=False)
    assert rel_err(first[0], ref[1]) < 1e-5 and rel_err(first[1], ref[3]) < 1e-5
    for cfg in configs[1:]:
        got = _adapter_grads_with_weight_grad_config(monkeypatch, cfg)
        for name, a, b in zip(("dU", "dV", "dS"), got, first):
            assert torch.equal(a, b), f"{name} differs under {cfg}"


def test_the_bitwise_check_sees_a_change_of_the_split_boundaries(monkeypatch, k_sequential_dot):
    # The test above can fail: splits that depend on a tuned block (the old kernel rounded
    # them to the tuned BLOCK_M) change the bits of dU and dV.  Here: 48-row instead of
    # 64-row splits of M = 100.
    cfg = kcfg.weight_grad_configs(interpret=True)[0]
    base = _adapter_grads_with_weight_grad_config(monkeypatch, cfg)
    assert kcfg.rows_per_split(100, 40, 37, torch.device("cpu")) == 64
    monkeypatch.setattr(kcfg, "rows_per_split", lambda M, K, r, device: 48)
    other = _adapter_grads_with_weight_grad_config(monkeypatch, cfg)
    assert not torch.equal(base[0], other[0]) or not torch.equal(base[1], other[1])
    assert rel_err(other[0], base[0]) < 1e-5


# ----------------------------------------------------------------------------- split-K (skinny kernels)
def test_skinny_kernels_split_k_in_the_interpreter():
    # Off a GPU, x·V and dy·U always split K in two 16-aligned chunks when K > 16, so the
    # tests above run the split-K path; K ≤ 16 is one chunk.
    if DEVICE != "cpu":
        pytest.skip("the interpreter's split rule")
    cpu = torch.device("cpu")
    assert kcfg.k_splits(7, 100, 37, 128, cpu) == (64, 2)
    assert kcfg.k_splits(33, 24, 5, 16, cpu) == (16, 2)
    assert kcfg.k_splits(33, 16, 5, 16, cpu) == (16, 1)


def test_split_k_rule_on_an_h100_at_the_7b_shapes(monkeypatch):
    # The GPU rule (132 SMs, 256-aligned chunks, one rank tile up to r = 128): at M = 4096,
    # K = 4096 a 128-row grid (the down kernel's nominal tile, the up-grad kernel's fixed
    # one) is 32 CTAs → 8 chunks of 512 (256 CTAs); at K = 11008 8 chunks of 1536 (256
    # CTAs); a 64-row grid (64 CTAs) gets 4 chunks of 1024.  A grid that already fills two
    # waves is not split; the rule never sees the tuned config.
    monkeypatch.setattr(kcfg, "num_sms", lambda index: 132)
    monkeypatch.setattr(kcfg, "K_SPLIT_ALIGN", 256)
    monkeypatch.setattr(kcfg, "MAX_BLOCK_R", 128)
    gpu = torch.device("cuda", 0)
    for r in (64, 128):
        assert kcfg.k_splits(4096, 4096, r, 128, gpu) == (512, 8)
        assert kcfg.k_splits(4096, 4096, r, 64, gpu) == (1024, 4)
        assert kcfg.k_splits(4096, 11008, r, 128, gpu) == (1536, 8)
    assert kcfg.k_splits(65536, 4096, 128, 64, gpu) == (4096, 1)
    assert kcfg.k_splits(4096, 256, 64, 128, gpu) == (256, 1)  # K below one chunk


@pytest.mark.parametrize("kps", [None, 16, 32], ids=["one-chunk", "16-col-chunks", "32-col-chunks"])
def test_forward_and_backward_match_reference_for_any_k_split(monkeypatch, kps):
    # None: K in one chunk (the in-kernel epilogue); otherwise several fp32 partials.
    monkeypatch.setattr(kcfg, "k_per_split", lambda M, K, r, row, device: kps or max(K, 1))
    shape = (33, 100, 72, 37)
    inp = _inputs(*shape, torch.float32, seed=5)
    y, u = kernels.fused_forward(inp["x"], inp["residual"], inp["U"], inp["S"], inp["V"], inp["bias"], SCALE)
    ref_y, ref_u = _reference_forward(inp)
    assert rel_err(y, ref_y) < 1e-5 and rel_err(u, ref_u) < 1e-5
    got = kernels.fused_backward(inp["dy"], inp["x"], u, inp["residual"], inp["U"], inp["S"], inp["V"], SCALE, True)
    for name, g, r in zip(GRADS, got, _reference_backward(inp)):
        assert rel_err(g, r) < 1e-5, name


def _outputs_with_skinny_configs(monkeypatch, down_cfg, up_cfg, shape=(100, 72, 40, 37)):
    """(y, u, dx, dU, dS, dV) with the down / up-grad kernels forced to one config each."""
    for kern, cfg in ((kernels._lowrank_down_kernel, down_cfg), (kernels._lowrank_up_grad_kernel, up_cfg)):
        monkeypatch.setattr(kern, "configs", [cfg])
        monkeypatch.setattr(kern, "cache", {})
    inp = _inputs(*shape, torch.float32, seed=12)
    y, u = kernels.fused_forward(inp["x"], inp["residual"], inp["U"], inp["S"], inp["V"], None, SCALE)
    dx, dU, dS, dV = kernels.fused_backward(
        inp["dy"], inp["x"], u, inp["residual"], inp["U"], inp["S"], inp["V"], SCALE, True
    )
    return dict(y=y, u=u, dx=dx, dU=dU, dS=dS, dV=dV)


def test_split_k_outputs_are_bitwise_independent_of_the_tuned_skinny_configs(monkeypatch, k_sequential_dot):
    # n = 72 and m = 40 are each reduced in two K chunks (asserted); every skinny / up-grad
    # config (row tile, K step) must give the same bits: the chunks come from the launcher.
    cpu = torch.device("cpu")
    assert kcfg.k_splits(100, 72, 37, kcfg.SKINNY_NOMINAL_M, cpu)[1] == 2
    assert kcfg.k_splits(100, 40, 37, kcfg.UP_BLOCK_M, cpu)[1] == 2
    downs = kcfg.skinny_configs(interpret=True) + kcfg.skinny_configs(interpret=False)
    ups = kcfg.up_grad_configs(interpret=True) + kcfg.up_grad_configs(interpret=False)
    first = _outputs_with_skinny_configs(monkeypatch, downs[0], ups[0])
    inp = _inputs(100, 72, 40, 37, torch.float32, seed=12)
    ref = _reference_backward(inp)
    assert rel_err(first["dU"], ref[1]) < 1e-5 and rel_err(first["dS"], ref[2]) < 1e-5
    for i in range(1, max(len(downs), len(ups))):
        dc, uc = downs[i % len(downs)], ups[i % len(ups)]
        got = _outputs_with_skinny_configs(monkeypatch, dc, uc)
        for name in first:
            assert torch.equal(got[name], first[name]), f"{name} differs under {dc} / {uc}"


def test_the_bitwise_check_sees_a_change_of_the_k_split_boundaries(monkeypatch, k_sequential_dot):
    # The test above can fail: other chunk boundaries (32- instead of 48-column chunks of
    # n = 72, 16- instead of 32-column chunks of m = 40) change the bits.
    cfg = (kcfg.skinny_configs(interpret=True)[0], kcfg.up_grad_configs(interpret=True)[0])
    base = _outputs_with_skinny_configs(monkeypatch, *cfg)
    monkeypatch.setattr(kcfg, "k_per_split", lambda M, K, r, row, device: 32 if K == 72 else 16)
    other = _outputs_with_skinny_configs(monkeypatch, *cfg)
    assert not torch.equal(base["u"], other["u"])
    assert not all(torch.equal(base[k], other[k]) for k in ("dU", "dS", "dV"))
    assert rel_err(other["u"], base["u"]) < 1e-5


def test_backward_empty_batch_returns_zero_adapter_grads():
    inp = _inputs(1, 24, 72, 5, torch.float32)
    x, dy = inp["x"][:0], inp["dy"][:0]
    u = x.new_empty(0, 5)
    dx, dU, dS, dV = kernels.fused_backward(dy, x, u, inp["residual"], inp["U"], inp["S"], inp["V"], SCALE, True)
    assert dx.shape == (0, 24)
    assert not dU.any() and not dS.any() and not dV.any()


# ----------------------------------------------------------------------------- bad inputs
def _bad_forward_cases():
    def base():
        return _inputs(7, 24, 72, 5, torch.float32)

    def call(**over):
        def run():
            inp = base()
            inp.update(over)
            return kernels.fused_forward(inp["x"], inp["residual"], inp["U"], inp["S"], inp["V"], inp["bias"], SCALE)

        return run

    b = base()
    return [
        pytest.param(call(x=b["x"][None]), ValueError, "2-D input", id="x-3d"),
        pytest.param(call(x=b["x"].double()), TypeError, "input dtype float64", id="x-float64"),
        pytest.param(call(S=b["S"][:4]), ValueError, "rank mismatch", id="rank-mismatch"),
        pytest.param(call(V=b["V"][:20]), ValueError, "V has 20 rows", id="V-rows"),
        pytest.param(call(residual=b["residual"][:, :20]), ValueError, "residual has shape (72, 20)", id="residual-shape"),
        pytest.param(call(bias=b["bias"][:70]), ValueError, "bias has shape (70,)", id="bias-shape"),
        pytest.param(call(U=b["U"].to("meta")), ValueError, "U is on meta", id="U-device"),
        pytest.param(call(V=b["V"].to(torch.int32)), TypeError, "V dtype int32", id="V-dtype"),
    ]


@pytest.mark.parametrize("run, exc, message", _bad_forward_cases())
def test_forward_rejects_bad_input_with_message_naming_it(run, exc, message):
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        run()


def _bad_backward_cases():
    inp = _inputs(7, 24, 72, 5, torch.float32)
    u = torch.zeros(7, 5, device=DEVICE)

    def call(**over):
        def run():
            a = dict(inp, u=u)
            a.update(over)
            return kernels.fused_backward(
                a["dy"], a["x"], a["u"], a["residual"], a["U"], a["S"], a["V"], SCALE, True
            )

        return run

    return [
        pytest.param(call(dy=inp["dy"][:, :70]), ValueError, "dy has shape (7, 70)", id="dy-shape"),
        pytest.param(call(u=u[:, :4]), ValueError, "u has shape (7, 4)", id="u-shape"),
        pytest.param(call(dy=inp["dy"].half()), TypeError, "dy dtype float16 differs", id="dy-dtype"),
        pytest.param(call(u=u.half()), TypeError, "u dtype float16 differs", id="u-dtype"),
    ]


@pytest.mark.parametrize("run, exc, message", _bad_backward_cases())
def test_backward_rejects_bad_input_with_message_naming_it(run, exc, message):
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        run()


# ----------------------------------------------------------------------------- GPU only
LARGE = [
    pytest.param((64, 11008, 256, 16), id="long-K-n11008"),
    pytest.param((8192, 512, 384, 64), id="large-M-8192"),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("shape", LARGE)
def test_forward_matches_reference_large_shapes_gpu(shape, dtype):
    inp = _inputs(*shape, dtype, seed=7)
    y, u = kernels.fused_forward(inp["x"], inp["residual"], inp["U"], inp["S"], inp["V"], inp["bias"], SCALE)
    y_ref, u_ref = _reference_forward(inp)
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(u, u_ref) < 1e-2


@requires_cuda
@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("shape", LARGE)
def test_backward_matches_reference_large_shapes_gpu(shape, dtype, grad):
    got, ref = _backward_case(shape, dtype, True)
    assert rel_err(got[grad], ref[grad]) < 1e-2


@requires_cuda
def test_fp32_is_ieee_accurate_under_highest_matmul_precision_gpu():
    inp = _inputs(256, 1024, 512, 16, torch.float32, bias=False, seed=8)
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        y_ieee, _ = kernels.fused_forward(inp["x"], inp["residual"], inp["U"], inp["S"], inp["V"], None, SCALE)
        torch.set_float32_matmul_precision("high")
        y_tf32, _ = kernels.fused_forward(inp["x"], inp["residual"], inp["U"], inp["S"], inp["V"], None, SCALE)
    finally:
        torch.set_float32_matmul_precision(prev)
    y_ref, _ = _reference_forward(inp)
    assert rel_err(y_ieee, y_ref) < 1e-5
    assert rel_err(y_tf32, y_ref) < 3e-3


# ----------------------------------------------------------------------------- compiled (no GPU needed)
_COMPILE_SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sorsa_kernels.kernels import residual_gemm as G
from sorsa_kernels.kernels import sorsa_linear as K
from sorsa_kernels.kernels import sorsa_linear_configs as KC
from sorsa_kernels.kernels import residual_gemm_configs as GC

def compile_for(kernel, ptrs, consts, cfg, arch):
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    consts = {**consts, **cfg.kwargs}
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in fn.arg_names}
    triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                   options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))

bf, f16, f32 = "*bf16", "*fp16", "*fp32"
prec = dict(INPUT_PRECISION="tf32")
for split in (False, True):
    compile_for(K._lowrank_down_kernel,
                dict(x_ptr=bf, v_ptr=f32, sigma_ptr=f32, u_ptr=bf, t_ptr=bf, part_ptr=f32),
                dict(prec, SPLIT_K=split, BLOCK_R=128), KC.skinny_configs()[0], 90)
for arch, cd, res in ((90, bf, True), (90, bf, False), (80, f16, True)):
    compile_for(G._fused_residual_lowrank_gemm_kernel,
                dict(a1_ptr=cd, b1_ptr=cd, a2_ptr=cd, b2_ptr=f32, bias_ptr=cd, c_ptr=cd),
                dict(prec, HAS_RESIDUAL=res, HAS_BIAS=res), GC.gemm_configs()[2], arch)
for split in (False, True):
    compile_for(K._lowrank_up_grad_kernel,
                dict(dy_ptr=bf, up_ptr=f32, u_ptr=bf, sigma_ptr=f32, ss_ptr=bf, dsp_ptr=f32, part_ptr=f32),
                dict(prec, SPLIT_K=split, BLOCK_R=32, BLOCK_M=64), KC.up_grad_configs()[0], 90)
compile_for(K._lowrank_weight_grad_kernel, dict(a_ptr=bf, b_ptr=bf, out_ptr=f32),
            dict(prec, BLOCK_R=16, BLOCK_M=KC.WG_STEP_M), KC.weight_grad_configs()[0], 90)
print("compiled")
'''


def test_kernels_compile_to_cubin_for_hopper_and_ampere(tmp_path):
    """The interpreter never runs Triton's compiler; this does (sm_90 / sm_80, no GPU needed)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold cache: really compile
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- config pruning
def test_gemm_prune_drops_narrow_rows_at_large_M_and_spilling_fp32_tiles():
    configs = gcfg.gemm_configs(interpret=False)
    bf = torch.empty(1, dtype=torch.bfloat16)
    f32 = torch.empty(1, dtype=torch.float32)
    assert gcfg.prune_gemm_configs(configs, dict(M=512, a2_ptr=bf)) == configs
    large = gcfg.prune_gemm_configs(configs, dict(M=4096, a2_ptr=bf))
    assert large and all(c.kwargs["BLOCK_M"] >= 64 for c in large)
    assert any(c.kwargs["BLOCK_M"] < 64 for c in configs)
    fp32 = gcfg.prune_gemm_configs(configs, dict(M=4096, a2_ptr=f32))
    assert fp32 and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps for c in fp32)
    assert len(fp32) < len(large)


def test_up_grad_and_weight_grad_prune_keep_only_fitting_non_spilling_fp32_configs():
    bf = torch.empty(1, dtype=torch.bfloat16)
    f32 = torch.empty(1, dtype=torch.float32)
    up = kcfg.up_grad_configs(interpret=False)
    assert kcfg.prune_up_grad_configs(up, dict(dy_ptr=bf), BLOCK_R=128) == up
    kept = kcfg.prune_up_grad_configs(up, dict(dy_ptr=f32), BLOCK_R=128)
    assert kept and len(kept) < len(up) and all(c.kwargs["BLOCK_K"] <= 64 for c in kept)
    wg = kcfg.weight_grad_configs(interpret=False)
    assert kcfg.prune_weight_grad_configs(wg, dict(a_ptr=bf), BLOCK_R=128) == wg
    kept = kcfg.prune_weight_grad_configs(wg, dict(a_ptr=f32), BLOCK_R=128)
    assert kept and len(kept) < len(wg)
    assert all(c.kwargs["BLOCK_K"] * 128 <= 64 * 32 * c.num_warps for c in kept)


def test_skinny_prune_keeps_only_non_spilling_fp32_configs():
    configs = kcfg.skinny_configs(interpret=False)
    bf = torch.empty(1, dtype=torch.bfloat16)
    f32 = torch.empty(1, dtype=torch.float32)
    assert kcfg.prune_skinny_configs(configs, dict(x_ptr=bf), BLOCK_R=128) == configs
    kept = kcfg.prune_skinny_configs(configs, dict(x_ptr=f32), BLOCK_R=128)
    assert kept and len(kept) < len(configs)
    assert all(c.kwargs["BLOCK_K"] <= 64 for c in kept)


def test_ieee_fp32_prunes_keep_only_32_deep_k_steps():
    # fp32 under "highest" runs FMA dots: 64-deep K steps spilled 3.9-60 KB per thread on sm_80.
    f32 = torch.empty(1, dtype=torch.float32)
    gemm_cfgs = gcfg.gemm_configs(interpret=False)
    tf32 = gcfg.prune_gemm_configs(gemm_cfgs, dict(M=4096, a2_ptr=f32), INPUT_PRECISION="tf32")
    ieee = gcfg.prune_gemm_configs(gemm_cfgs, dict(M=4096, a2_ptr=f32), INPUT_PRECISION="ieee")
    assert ieee and all(c.kwargs["BLOCK_K"] <= 32 for c in ieee) and any(c.kwargs["BLOCK_K"] > 32 for c in tf32)
    bf = torch.empty(1, dtype=torch.bfloat16)  # the NF4 path passes "ieee" for 16-bit operands: ignored
    assert gcfg.prune_gemm_configs(gemm_cfgs, dict(M=512, a2_ptr=bf), INPUT_PRECISION="ieee") == gemm_cfgs
    skinny = kcfg.prune_skinny_configs(kcfg.skinny_configs(interpret=False), dict(x_ptr=f32), BLOCK_R=128,
                                       INPUT_PRECISION="ieee")
    assert skinny and all(c.kwargs["BLOCK_K"] <= 32 for c in skinny)
    wg = kcfg.prune_weight_grad_configs(kcfg.weight_grad_configs(interpret=False), dict(a_ptr=f32), BLOCK_R=128,
                                        INPUT_PRECISION="ieee")
    assert wg and all(c.kwargs["BLOCK_K"] * 128 <= 32 * 32 * c.num_warps for c in wg)


# ----------------------------------------------------------------------------- persistent TMA GEMM
TMA_SHAPES = [(33, 24, 72, 16), (70, 40, 72, 24), (5, 104, 40, 8)]


@pytest.fixture
def tma_spy(monkeypatch):
    """Let the TMA GEMM run in the interpreter (it is Hopper-only) and count its launches."""
    monkeypatch.setattr(gemm, "_tma_device_ok", lambda device: True)
    calls = []
    real = gemm._launch_gemm_tma
    monkeypatch.setattr(gemm, "_launch_gemm_tma", lambda *a: calls.append(real(*a)) or calls[-1])
    return calls


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "lowrank-only"])
@pytest.mark.parametrize("shape", TMA_SHAPES)
def test_tma_gemm_forward_and_dx_match_reference(tma_spy, shape, residual):
    inp = _inputs(*shape, torch.float16, residual=residual, adapter_dtype=torch.float16, seed=sum(shape))
    y, u = kernels.fused_forward(inp["x"], inp["residual"], inp["U"], inp["S"], inp["V"], inp["bias"], SCALE)
    got = kernels.fused_backward(inp["dy"], inp["x"], u, inp["residual"], inp["U"], inp["S"], inp["V"], SCALE, True)
    assert tma_spy == [True, True]  # forward GEMM and dx GEMM both took the TMA kernel
    y_ref, _ = _reference_forward(inp)
    assert rel_err(y, y_ref) < 1e-2
    for g, r in zip(got, _reference_backward(inp)):
        assert rel_err(g, r) < 1e-2


def test_tma_gemm_is_skipped_for_unsuitable_operands(tma_spy):
    # fp32 operands (tf32, no TMA path) and an fp32 residual under fp16 input fall back.
    for dtype, res_dtype in ((torch.float32, torch.float32), (torch.float16, torch.float32)):
        inp = _inputs(33, 24, 72, 16, dtype, seed=3)
        y, _ = kernels.fused_forward(inp["x"], inp["residual"].to(res_dtype), inp["U"], inp["S"], inp["V"],
                                     inp["bias"], SCALE)
        assert rel_err(y, _reference_forward(inp)[0]) < TOL[dtype]
    assert tma_spy == [False, False]
