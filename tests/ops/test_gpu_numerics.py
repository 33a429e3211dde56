"""bf16 numerics on a CUDA GPU that the other files leave out: the grouped experts at a real MoE
layer's ragged shape, and the NF4 (QSORSA) experts op, each against the float64 reference.

The Triton interpreter computes bf16 ``tl.dot`` wrongly, so these run only on a GPU (skipped
elsewhere; ``bash bench/run_gpu.sh --quick`` selects them with ``-m gpu``).
"""
from __future__ import annotations

import pytest
import torch

from sorsa_kernels.ops import reference
from tests.conftest import rel_err, requires_cuda

pytestmark = requires_cuda
BF16_TOL = 1e-2


def _ragged_counts(E: int, rows: int, seed: int) -> torch.Tensor:
    """Uneven rows per expert summing to ``rows``, every fourth expert without rows."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(E, generator=g) ** 3
    weights[::4] = 0
    counts = torch.floor(weights / weights.sum() * rows).long()
    counts[1] += rows - int(counts.sum())
    return counts


def test_grouped_experts_bf16_qwen3_layer_ragged_match_float64_oracle_gpu():
    # Qwen3-30B-A3B's down projection (in 768, out 2048) over 128 experts, 1024 tokens × top-8.
    from sorsa_kernels.kernels import grouped_sorsa

    E, m, n, r = 128, 2048, 768, 64
    counts = _ragged_counts(E, 1024 * 8, seed=0)
    g = torch.Generator(device="cuda").manual_seed(1)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    res = (mk(E, m, n) / n**0.5).bfloat16()
    U, S, V = mk(E, m, r) / m**0.5, mk(E, r).abs() + 0.5, mk(E, n, r) / n**0.5
    x, dy = mk(int(counts.sum()), n).bfloat16(), mk(int(counts.sum()), m).bfloat16()
    counts = counts.cuda()
    y, u = grouped_sorsa.grouped_forward(x, counts, res, U, S, V, None, 0.5)
    got = grouped_sorsa.grouped_backward(dy, x, u, counts, res, U, S, V, 0.5, True)
    d = torch.Tensor.double
    y_ref, u_ref = reference.experts_forward(d(x), counts, d(res), d(U), d(S), d(V), None, 0.5)
    want = reference.experts_backward(d(dy), d(x), u_ref, counts, d(res), d(U), d(S), d(V), 0.5, True)
    assert rel_err(y, y_ref) < BF16_TOL
    for name, a, e in zip(("dx", "dU", "dS", "dV"), got, want):
        assert rel_err(a, e) < BF16_TOL, name


@pytest.mark.parametrize("chunk", [1, 8], ids=["chunk1", "chunk8"])
def test_qsorsa_experts_bf16_matches_float64_oracle_gpu(chunk, monkeypatch):
    from sorsa_kernels.ops.experts import qsorsa_experts
    from sorsa_kernels.quant.nf4 import dequantize_nf4, quantize_nf4

    monkeypatch.setenv("SORSA_KERNELS_BACKEND", "triton")
    E, m, n, r = 12, 200, 136, 16  # sizes no block divides
    g = torch.Generator().manual_seed(2)
    qs = [quantize_nf4(torch.randn(m, n, generator=g) / n**0.5) for _ in range(E)]
    st = lambda f: torch.stack([getattr(q, f).reshape(-1) for q in qs]).cuda()  # noqa: E731
    nf4 = (st("packed"), st("absmax"), st("nested_absmax"), qs[0].nested_code.cuda(),
           st("offset").reshape(E), qs[0].code.cuda())
    dense = torch.stack([dequantize_nf4(q, torch.float32) for q in qs]).cuda().double()
    counts = _ragged_counts(E, 300, seed=3)
    mk = lambda *s: torch.randn(*s, generator=g).cuda()  # noqa: E731
    U = (mk(E, m, r) / m**0.5).requires_grad_()
    S = (mk(E, r).abs() + 0.5).requires_grad_()
    V = (mk(E, n, r) / n**0.5).requires_grad_()
    x = mk(int(counts.sum()), n).bfloat16().requires_grad_()
    dy = mk(int(counts.sum()), m).bfloat16()
    counts = counts.cuda()
    y = qsorsa_experts(x, counts, nf4, U, S, V, None, scale=0.5, expert_chunk=chunk)
    got = torch.autograd.grad(y, (x, U, S, V), dy)
    x64, U64, S64, V64 = (t.detach().double().requires_grad_() for t in (x, U, S, V))
    want_y = reference.experts_dense(x64, counts, dense, U64, S64, V64, None, 0.5)
    want = torch.autograd.grad(want_y, (x64, U64, S64, V64), dy.double())
    assert y.dtype == torch.bfloat16
    assert rel_err(y, want_y) < BF16_TOL
    for name, a, e in zip(("dx", "dU", "dS", "dV"), got, want):
        assert rel_err(a, e) < BF16_TOL, name
