"""The grouped SORSA kernels (kernels/grouped_sorsa.py) against the float64 reference.

Uneven rows per expert, experts with no rows, an expert spanning several row tiles, and
sizes no block divides; forward (y, u) and every gradient (dx, dU, dS, dV); fp32 and fp16
(the interpreter computes bf16 ``tl.dot`` wrongly).
"""
from __future__ import annotations

import pytest
import torch

from sorsa_kernels.ops import reference
from tests.conftest import rel_err, requires_cuda

pytest.importorskip("triton")

from sorsa_kernels.kernels import grouped_sorsa  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16", marks=requires_cuda),
]
# 5 experts: empty, 19 rows (two 16-row tiles under the interpreter), 3, empty, 17.
COUNTS = [0, 19, 3, 0, 17]
E, M_OUT, N_IN, R = 5, 37, 29, 5


def _case(dtype, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    M = sum(COUNTS)
    res = mk(E, M_OUT, N_IN).to(DEVICE, dtype)
    U, S, V = mk(E, M_OUT, R).to(DEVICE), (mk(E, R).abs() + 0.5).to(DEVICE), mk(E, N_IN, R).to(DEVICE)
    b = mk(E, M_OUT).to(DEVICE, dtype) if bias else None
    x = mk(M, N_IN).to(DEVICE, dtype)
    dy = mk(M, M_OUT).to(DEVICE, dtype)
    counts = torch.tensor(COUNTS, device=DEVICE)
    return x, dy, counts, res, U, S, V, b


def _d(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_grouped_forward_matches_reference(dtype, bias):
    x, _, counts, res, U, S, V, b = _case(dtype, bias)
    y, u = grouped_sorsa.grouped_forward(x, counts, res, U, S, V, b, 0.6)
    y_ref, u_ref = reference.experts_forward(_d(x), counts, _d(res), _d(U), _d(S), _d(V), _d(b), 0.6)
    assert y.dtype == dtype and u.dtype == dtype
    assert rel_err(u, u_ref) < TOL[dtype]
    assert rel_err(y, y_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_forward_without_residual_is_the_low_rank_branch(dtype):
    x, _, counts, _, U, S, V, _ = _case(dtype)
    y, _ = grouped_sorsa.grouped_forward(x, counts, None, U, S, V, None, 1.5)
    y_ref, _ = reference.experts_forward(_d(x), counts, None, _d(U), _d(S), _d(V), None, 1.5)
    assert rel_err(y, y_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_backward_matches_reference_every_gradient(dtype):
    x, dy, counts, res, U, S, V, _ = _case(dtype)
    _, u = grouped_sorsa.grouped_forward(x, counts, res, U, S, V, None, 0.6)
    got = grouped_sorsa.grouped_backward(dy, x, u, counts, res, U, S, V, 0.6, True)
    _, u_ref = reference.experts_forward(_d(x), counts, _d(res), _d(U), _d(S), _d(V), None, 0.6)
    ref = reference.experts_backward(_d(dy), _d(x), u_ref, counts, _d(res), _d(U), _d(S), _d(V), 0.6, True)
    for name, a, e in zip(("dx", "dU", "dS", "dV"), got, ref):
        assert rel_err(a, e) < TOL[dtype], name
    dx, dU, dS, dV = got
    assert (dU.dtype, dS.dtype, dV.dtype) == (U.dtype, S.dtype, V.dtype)
    for e in (0, 3):  # experts without rows
        assert dU[e].abs().max() == 0 and dS[e].abs().max() == 0 and dV[e].abs().max() == 0


def test_grouped_backward_skips_dx_when_not_needed():
    x, dy, counts, res, U, S, V, _ = _case(torch.float32)
    _, u = grouped_sorsa.grouped_forward(x, counts, res, U, S, V, None, 1.0)
    dx, dU, _, _ = grouped_sorsa.grouped_backward(dy, x, u, counts, res, U, S, V, 1.0, False)
    assert dx is None and dU.abs().max() > 0


def test_tile_table_covers_each_experts_rows_once():
    counts = torch.tensor([0, 19, 3, 0, 17])
    table = grouped_sorsa.tile_table(counts, 39, block_m=16).tolist()
    real = [t for t in table if t[0] >= 0]
    assert real == [[1, 0, 19], [1, 16, 19], [2, 19, 22], [4, 22, 39], [4, 38, 39]]
    assert len(table) == 3 + 5 and all(t[0] == -1 for t in table[len(real):])


@pytest.mark.parametrize("dtype", DTYPES)
def test_op_on_triton_backend_matches_reference_backend(dtype, backend):
    from sorsa_kernels.ops.experts import sorsa_experts

    def run():
        x, dy, counts, res, U, S, V, _ = _case(dtype, seed=3)
        x.requires_grad_()
        for p in (U, S, V):
            p.requires_grad_()
        y = sorsa_experts(x, counts, res, U, S, V, None, 0.6)
        y.backward(dy)
        return y.detach(), x.grad, U.grad, S.grad, V.grad

    backend("reference")
    want = run()
    backend("triton")
    got = run()
    for name, a, e in zip(("y", "dx", "dU", "dS", "dV"), got, want):
        assert rel_err(a, e) < TOL[dtype], name


def _gemm_args(act: torch.dtype, adapter: torch.dtype) -> dict:
    a, b = torch.empty(1, 1, dtype=act), torch.empty(1, 1, 1, dtype=adapter)
    return dict(a1_ptr=a, b1_ptr=torch.empty(1, 1, 1, dtype=act), a2_ptr=a, b2_ptr=b)


def test_gemm_prune_drops_configs_over_a_99kb_card_and_keeps_them_on_hopper():
    from sorsa_kernels.kernels import grouped_sorsa_configs as C
    from sorsa_kernels.kernels._launch import compile_target

    configs = C.gemm_configs(interpret=False)
    args = _gemm_args(torch.bfloat16, torch.float32)  # bf16 activations, fp32 adapters
    with compile_target(86):
        kept = C.prune_gemm_configs(configs, args, BLOCK_M=64)
    # 64×64 bf16 A + 64×128 fp32 B per K step, 3 buffers: 120 KB > 99 KB.
    big = configs[0]
    assert (big.kwargs["BLOCK_N"], big.kwargs["BLOCK_K"], big.num_stages) == (128, 64, 4)
    assert big not in kept and configs[-1] in kept
    with compile_target(90):
        assert C.prune_gemm_configs(configs, args, BLOCK_M=64) == configs


def test_weight_grad_prune_limits_fp32_accumulators_per_thread():
    from sorsa_kernels.kernels import grouped_sorsa_configs as C

    configs = C.weight_grad_configs(interpret=False)
    f32 = torch.empty(1, 1)
    kept = C.prune_weight_grad_configs(configs, dict(a_ptr=f32, b_ptr=f32), BLOCK_R=128, BLOCK_M=64)
    assert kept and all(c.kwargs["BLOCK_K"] * 128 // (32 * c.num_warps) <= 64 for c in kept)
    assert len(kept) < len(configs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_forward_reads_a_non_contiguous_bias_by_both_strides(dtype):
    x, _, counts, res, U, S, V, _ = _case(dtype)
    b = torch.randn(M_OUT, E, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype).T  # E×m, strides (1, E)
    assert not b.is_contiguous()
    y, _ = grouped_sorsa.grouped_forward(x, counts, res, U, S, V, b, 0.6)
    y_ref, _ = reference.experts_forward(_d(x), counts, _d(res), _d(U), _d(S), _d(V), _d(b), 0.6)
    assert rel_err(y, y_ref) < TOL[dtype]


def _record_block_r(monkeypatch) -> list:
    """The BLOCK_R of every launch of the grouped weight-gradient kernel."""
    kernel = grouped_sorsa._grouped_weight_grad_kernel
    seen, run = [], kernel.run

    def spy(*args, **kwargs):
        seen.append(kwargs["BLOCK_R"])
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", spy)
    return seen


def test_weight_grad_rank_256_splits_r_over_tiles_and_matches_reference(monkeypatch):
    # r = 256 in fp32 with small m, n: the rank tile is capped (MAX_BLOCK_R) and r runs over the
    # grid's third axis; dU and dV equal the reference's.
    from sorsa_kernels.kernels.grouped_sorsa_configs import MAX_BLOCK_R

    g = torch.Generator().manual_seed(11)
    counts = torch.tensor([5, 0, 18])
    E_, m, n, r = 3, 7, 9, 256
    x, dy = torch.randn(23, n, generator=g), torch.randn(23, m, generator=g)
    U, S = torch.randn(E_, m, r, generator=g), torch.rand(E_, r, generator=g) + 0.5
    V = torch.randn(E_, n, r, generator=g)
    res = torch.randn(E_, m, n, generator=g)
    seen = _record_block_r(monkeypatch)
    _, u = grouped_sorsa.grouped_forward(x, counts, res, U, S, V, None, 0.3)
    got = grouped_sorsa.grouped_backward(dy, x, u, counts, res, U, S, V, 0.3, True)
    assert seen and all(br <= MAX_BLOCK_R < r for br in seen)
    _, u_ref = reference.experts_forward(_d(x), counts, _d(res), _d(U), _d(S), _d(V), None, 0.3)
    ref = reference.experts_backward(_d(dy), _d(x), u_ref, counts, _d(res), _d(U), _d(S), _d(V), 0.3, True)
    for name, a, e in zip(("dx", "dU", "dS", "dV"), got, ref):
        assert rel_err(a, e) < 1e-5, name
