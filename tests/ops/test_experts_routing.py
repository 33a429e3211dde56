"""Routed experts (row gather, routing-weight multiply, scatter back into tokens) and the grouped
NF4 experts kernel, against the per-(token, choice) dense oracle and ``ops/reference.py``.

Reference path: float64 against PyTorch's own gradients of the obvious formula.  Kernel path
(Triton interpreter, fp32 / fp16; the interpreter's bf16 ``tl.dot`` is wrong): against the
reference upcast to float64, forward and every gradient (x, U, S, V, routing weights), ragged
counts with experts that get no rows, sizes no block divides.
"""
from __future__ import annotations

import pytest
import torch

from sorsa_kernels.ops import reference
from sorsa_kernels.ops.experts import qsorsa_experts, sorsa_experts
from sorsa_kernels.quant.nf4 import dequantize_nf4, quantize_nf4
from tests.conftest import rel_err

pytest.importorskip("triton")

# 7 tokens × top-2 over 6 experts; experts 1 and 4 get no rows, expert 3 gets 5 (sizes no
# 16-row tile divides).  m = 21, n = 19, r = 3.
IDS = [[0, 3], [3, 2], [5, 3], [2, 0], [3, 5], [0, 2], [3, 5]]
E, M_OUT, N_IN, R, K = 6, 21, 19, 3, 2
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _case(dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ids = torch.tensor(IDS)
    x = mk(len(IDS), N_IN).to(dtype)
    res = mk(E, M_OUT, N_IN).to(dtype)
    U, S, V = mk(E, M_OUT, R), mk(E, R).abs() + 0.5, mk(E, N_IN, R)
    b = mk(E, M_OUT).to(dtype) if bias else None
    w = mk(len(IDS), K).softmax(-1).to(dtype)
    dy = mk(len(IDS), M_OUT).to(dtype)
    return x, ids, res, U, S, V, b, w, dy


def _routing(ids):
    flat = ids.reshape(-1)
    _, slots = torch.sort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int64).index_add_(0, flat, torch.ones_like(flat))
    return slots, counts


def _oracle(x, ids, res, U, S, V, b, w, scale):
    """``y[t] = Σ_j w[t, j]·(x_t·W_eᵀ + scale·((x_t·V_e)·S_e)·U_eᵀ + b_e)``, e = ids[t, j]: the
    formula written per (token, choice)."""
    rows = []
    for t in range(ids.shape[0]):
        acc = 0
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            lin = reference.linear_dense(x[t:t + 1], res[e], U[e], S[e], V[e], None if b is None else b[e], scale)
            acc = acc + w[t, j] * lin
        rows.append(acc)
    return torch.cat(rows)


def _run(x, ids, res, U, S, V, b, w, dy, scale=0.7, nf4=None):
    """y and the gradients of x, U, S, V and the routing weights through one routed projection."""
    slots, counts = _routing(ids)
    leaves = [t.detach().clone().requires_grad_() for t in (x, U, S, V, w)]
    xx, UU, SS, VV, ww = leaves
    kw = dict(slots=slots, top_k=K, gather=True, scatter=True, weights=ww.reshape(-1))
    if nf4 is None:
        y = sorsa_experts(xx, counts, res, UU, SS, VV, b, scale, **kw)
    else:
        y = qsorsa_experts(xx, counts, nf4, UU, SS, VV, b, scale, **kw)
    return (y.detach(), *torch.autograd.grad(y, leaves, dy))


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_routed_reference_matches_per_choice_oracle_float64(bias, backend):
    backend("reference")
    x, ids, res, U, S, V, b, w, dy = _case(bias=bias)
    got = _run(x, ids, res, U, S, V, b, w, dy)
    leaves = [t.clone().requires_grad_() for t in (x, U, S, V, w)]
    want_y = _oracle(leaves[0], ids, res, *leaves[1:4], b, leaves[4], 0.7)
    want = (want_y.detach(), *torch.autograd.grad(want_y, leaves, dy))
    for name, a, e in zip(("y", "dx", "dU", "dS", "dV", "dw"), got, want):
        assert rel_err(a, e) < 1e-12, name


def test_routed_down_projection_on_grouped_rows_matches_oracle(backend):
    # down: grouped rows in (no gather), weights multiplied and rows added into tokens (scatter)
    backend("reference")
    x, ids, res, U, S, V, b, w, dy = _case()
    slots, counts = _routing(ids)
    xg = x[slots // K].clone().requires_grad_()
    ww = w.clone().requires_grad_()
    y = sorsa_experts(xg, counts, res, U, S, V, b, 0.7, slots=slots, top_k=K, scatter=True, weights=ww.reshape(-1))
    want = _oracle(x, ids, res, U, S, V, b, ww, 0.7)
    assert rel_err(y, want) < 1e-12
    assert rel_err(torch.autograd.grad(y, ww, dy)[0], torch.autograd.grad(want, ww, dy)[0]) < 1e-12


def _as(dtype, *ts):
    return [None if t is None else t.to(dtype) for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_routed_kernels_match_reference_forward_and_every_gradient(dtype, bias, backend):
    x, ids, res, U, S, V, b, w, dy = _case(bias=bias, seed=1)
    x, res, b, dy = _as(dtype, x, res, b, dy)
    U, S, V, w = _as(torch.float32, U, S, V, w)
    backend("reference")
    want = _run(*_as(torch.float64, x), ids, *_as(torch.float64, res, U, S, V, b, w, dy))
    backend("triton")
    got = _run(x, ids, res, U, S, V, b, w, dy)
    for name, a, e in zip(("y", "dx", "dU", "dS", "dV", "dw"), got, want):
        assert rel_err(a, e) < TOL[dtype], name


def _nf4_stack(m=M_OUT, n=N_IN, seed=5):
    g = torch.Generator().manual_seed(seed)
    qs = [quantize_nf4(torch.randn(m, n, generator=g)) for _ in range(E)]
    st = lambda f: torch.stack([getattr(q, f).reshape(-1) for q in qs])  # noqa: E731
    nf4 = (st("packed"), st("absmax"), st("nested_absmax"), qs[0].nested_code, st("offset").reshape(E), qs[0].code)
    return nf4, torch.stack([dequantize_nf4(q, torch.float32) for q in qs])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_grouped_nf4_kernel_matches_reference_on_the_dequantized_stack_routed(dtype, backend):
    nf4, dense = _nf4_stack()
    x, ids, _, U, S, V, b, w, dy = _case(seed=2)
    x, b, dy = _as(dtype, x, b, dy)
    U, S, V, w = _as(torch.float32, U, S, V, w)
    backend("reference")
    want = _run(*_as(torch.float64, x), ids, *_as(torch.float64, dense, U, S, V, b, w, dy))
    backend("triton")
    got = _run(x, ids, None, U, S, V, b, w, dy, nf4=nf4)
    for name, a, e in zip(("y", "dx", "dU", "dS", "dV", "dw"), got, want):
        assert rel_err(a, e) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_grouped_nf4_kernel_matches_reference_on_grouped_rows(dtype, backend):
    nf4, dense = _nf4_stack()
    counts = torch.tensor([4, 0, 19, 3, 0, 7])  # 19 rows: two 16-row tiles
    g = torch.Generator().manual_seed(3)
    x = torch.randn(33, N_IN, generator=g)
    dy = torch.randn(33, M_OUT, generator=g)
    U, S, V = torch.randn(E, M_OUT, R, generator=g), torch.rand(E, R, generator=g) + 0.5, \
        torch.randn(E, N_IN, R, generator=g)

    def run(xx, res, UU, SS, VV, dyy, nf4_=None):
        leaves = [t.clone().requires_grad_() for t in (xx, UU, SS, VV)]
        y = (sorsa_experts(leaves[0], counts, res, *leaves[1:], None, 0.5) if nf4_ is None else
             qsorsa_experts(leaves[0], counts, nf4_, *leaves[1:], None, 0.5))
        return (y.detach(), *torch.autograd.grad(y, leaves, dyy))

    backend("reference")
    want = run(x.double(), dense.double(), U.double(), S.double(), V.double(), dy.double())
    backend("triton")
    got = run(x.to(dtype), None, U, S, V, dy.to(dtype), nf4)
    for name, a, e in zip(("y", "dx", "dU", "dS", "dV"), got, want):
        assert rel_err(a, e) < TOL[dtype], name


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_counts_that_do_not_sum_to_the_rows_are_refused_on_the_device(path, backend):
    backend(path)
    x, ids, res, U, S, V, _, _, _ = _case(torch.float32, bias=False)
    counts = torch.tensor([2, 0, 3, 1, 0, 2])  # 8 rows counted, x has 7
    with pytest.raises(RuntimeError, match="counts must be non-negative and sum to the 7 grouped rows"):
        sorsa_experts(x, counts, res, U.float(), S.float(), V.float())


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_routing_weight_gradient_alone_leaves_x_without_gradient(path, backend):
    # x frozen, only the routing weights (and adapters) need gradients: dw is still right and
    # the op returns no dx (its fake kernel promises an empty one).
    backend(path)
    x, ids, res, U, S, V, b, w, dy = _case(torch.float32, seed=4)
    res, b = res.float(), b.float()
    U, S, V, w = (t.float() for t in (U, S, V, w))
    slots, counts = _routing(ids)
    ww = w.clone().requires_grad_()
    y = sorsa_experts(x, counts, res, U, S, V, b, 0.7, slots=slots, top_k=K, gather=True, scatter=True,
                      weights=ww.reshape(-1))
    got = torch.autograd.grad(y, ww, dy)[0]
    want_y = _oracle(x.double(), ids, res.double(), U.double(), S.double(), V.double(), b.double(),
                     ww.double(), 0.7)
    want = torch.autograd.grad(want_y, ww, dy.double())[0]
    assert rel_err(got, want) < 1e-5
    from sorsa_kernels.ops.experts import experts_bwd
    u = torch.zeros(slots.numel(), R)
    dx, *_ = experts_bwd(dy, x, u, counts, res, U, S, V, b, 0.7, slots, w.reshape(-1), K, True, True, False, True,
                         path == "triton")
    assert dx.numel() == 0


@pytest.mark.parametrize("routed", [False, True], ids=["grouped", "routed"])
@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_custom_ops_pass_torch_library_opcheck(routed, quantized):
    # schema, fake kernel against the real one, autograd registration, AOT dispatch with dynamic shapes
    from sorsa_kernels.ops.experts import experts_fwd, qexperts_fwd

    x, ids, res, U, S, V, b, w, _ = _case(torch.float32, seed=6)
    slots, counts = _routing(ids)
    U, S, V = (t.float().requires_grad_() for t in (U, S, V))
    if routed:
        route = (slots, w.reshape(-1).float().requires_grad_(), K, True, True)
        x = x.requires_grad_()
    else:
        route = (None, None, 1, False, False)
        x = x[slots // K].requires_grad_()
    if quantized:
        nf4, _ = _nf4_stack()
        args = (x, counts, *nf4, [M_OUT, N_IN, 64, 256, 2], U, S, V, b, 0.7, *route, False)
        torch.library.opcheck(qexperts_fwd, args)
    else:
        torch.library.opcheck(experts_fwd, (x, counts, res, U, S, V, b, 0.7, *route, False))
