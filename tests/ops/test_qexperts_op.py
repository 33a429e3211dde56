"""``qsorsa_experts``: the SORSA experts op with each expert's residual in NF4 (QSORSA experts).

Checked against ``reference.experts_dense`` on the dequantized residual, differentiated by
PyTorch in float64, on uneven counts with empty experts (forward and every gradient); the
dequant path must dequantize at most ``expert_chunk`` experts at a time, and none without rows.
"""
from __future__ import annotations

import pytest
import torch

from sorsa_kernels.ops import experts_paths
from sorsa_kernels.ops import reference
from sorsa_kernels.ops.experts import dequantize_experts, qsorsa_experts
from sorsa_kernels.quant.nf4 import dequantize_nf4, quantize_nf4
from tests.conftest import rel_err
from tests.ops.test_experts_op import _LargestOutput

COUNTS = [4, 0, 9, 1, 0]  # uneven, two experts without rows


def _nf4_stack(E=5, m=22, n=18, seed=0):
    g = torch.Generator().manual_seed(seed)
    qs = [quantize_nf4(torch.randn(m, n, generator=g)) for _ in range(E)]
    st = lambda f: torch.stack([getattr(q, f).reshape(-1) for q in qs])  # noqa: E731
    nf4 = (st("packed"), st("absmax"), st("nested_absmax"), qs[0].nested_code, st("offset").reshape(E), qs[0].code)
    dense = torch.stack([dequantize_nf4(q, torch.float32) for q in qs])
    return nf4, dense


def _factors(E=5, m=22, n=18, r=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return mk(E, m, r).requires_grad_(), (mk(E, r).abs() + 0.5).requires_grad_(), mk(E, n, r).requires_grad_()


def test_dequantize_experts_equals_each_experts_bitsandbytes_dequantization():
    nf4, dense = _nf4_stack()
    got = dequantize_experts(nf4, (22, 18), [4, 0, 2], torch.float32)
    assert torch.equal(got, dense[[4, 0, 2]])


@pytest.mark.parametrize("chunk", [1, 2, 8])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_forward_and_every_gradient_match_dense_oracle_float64_uneven_counts(chunk, bias):
    nf4, dense = _nf4_stack()
    U, S, V = _factors()
    b = torch.randn(5, 22, dtype=torch.float64) if bias else None
    counts = torch.tensor(COUNTS)
    x = torch.randn(14, 18, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(14, 22, dtype=torch.float64)
    y = qsorsa_experts(x, counts, nf4, U, S, V, b, scale=0.7, expert_chunk=chunk)
    got = torch.autograd.grad(y, (x, U, S, V), dy)
    want_y = reference.experts_dense(x, counts, dense.double(), U, S, V, b, 0.7)
    want = torch.autograd.grad(want_y, (x, U, S, V), dy)
    assert rel_err(y, want_y) < 1e-12
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12
    assert float(got[1][1].abs().sum()) == 0.0 and float(got[3][4].abs().sum()) == 0.0  # empty experts


def test_float32_matches_float64_oracle():
    nf4, dense = _nf4_stack()
    U, S, V = _factors(dtype=torch.float32)
    counts = torch.tensor(COUNTS)
    x = torch.randn(14, 18, requires_grad=True)
    dy = torch.randn(14, 22)
    y = qsorsa_experts(x, counts, nf4, U, S, V)
    got = torch.autograd.grad(y, (x, U, S, V), dy)
    x64, U64, S64, V64 = (t.detach().double().requires_grad_() for t in (x, U, S, V))
    want_y = reference.experts_dense(x64, counts, dense.double(), U64, S64, V64, None, 1.0)
    want = torch.autograd.grad(want_y, (x64, U64, S64, V64), dy.double())
    assert rel_err(y, want_y) < 1e-5
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_dequant_path_holds_one_expert_at_a_time_and_skips_empty_experts(monkeypatch):
    nf4, _ = _nf4_stack(E=4, m=48, n=40)
    U, S, V = _factors(E=4, m=48, n=40, r=4, dtype=torch.float32)
    seen = []
    deq = experts_paths.dequantize_experts

    def spy(nf4_, shape, experts, *a, **kw):
        seen.append(list(experts))
        return deq(nf4_, shape, experts, *a, **kw)

    monkeypatch.setattr(experts_paths, "dequantize_experts", spy)
    x = torch.randn(12, 40, requires_grad=True)
    with _LargestOutput() as mode:
        y = qsorsa_experts(x, torch.tensor([5, 0, 7, 0]), nf4, U, S, V, expert_chunk=1)
        y.backward(torch.randn_like(y))
    assert seen == [[0], [2], [0], [2]]  # forward, then backward for dx; experts 1 and 3 never
    assert mode.largest <= 48 * 40 < 2 * 48 * 40  # one expert's matrix, never the stack


def test_chunk_of_experts_dequantized_together():
    nf4, _ = _nf4_stack(E=4, m=48, n=40)
    U, S, V = _factors(E=4, m=48, n=40, r=4, dtype=torch.float32)
    x = torch.randn(16, 40)
    with _LargestOutput() as mode:
        qsorsa_experts(x, torch.tensor([4, 4, 4, 4]), nf4, U, S, V, expert_chunk=2)
    assert mode.largest == 2 * 48 * 40


def test_bad_expert_chunk_named():
    nf4, _ = _nf4_stack()
    U, S, V = _factors()
    with pytest.raises(ValueError, match="expert_chunk must be a positive int"):
        qsorsa_experts(torch.randn(14, 18, dtype=torch.float64), torch.tensor(COUNTS), nf4, U, S, V, expert_chunk=0)


def test_packed_storage_of_the_wrong_shape_named():
    nf4, _ = _nf4_stack()
    U, S, V = _factors(E=4)
    with pytest.raises(ValueError, match=r"packed NF4 experts have shape \(5, 198\), expected \(4, 198\)"):
        qsorsa_experts(torch.randn(14, 18, dtype=torch.float64), torch.tensor([4, 0, 9, 1]), nf4, U, S, V)


def test_triton_backend_runs_the_grouped_kernels_on_each_chunk_like_the_reference(backend):
    nf4, _ = _nf4_stack()
    U, S, V = _factors(dtype=torch.float32)
    counts = torch.tensor(COUNTS)
    x = torch.randn(14, 18)
    dy = torch.randn(14, 22)
    out = {}
    for name in ("reference", "triton"):
        backend(name)
        xx = x.clone().requires_grad_()
        y = qsorsa_experts(xx, counts, nf4, U, S, V, scale=0.5, expert_chunk=2)
        out[name] = (y, *torch.autograd.grad(y, (xx, U, S, V), dy))
    for g, w in zip(out["triton"], out["reference"]):
        assert rel_err(g, w) < 1e-5


# --------------------------------------------------------------------------- kernel path: E = 8
class _Watch(_LargestOutput):
    """:class:`_LargestOutput` that also counts host syncs (``.item()`` / ``.tolist()`` reach
    ``aten._local_scalar_dense``; ``nonzero``, ``bincount``, ``unique`` and ``masked_select``
    size their output on the host; ``repeat_interleave`` without ``output_size`` too)."""

    SYNCS = ("_local_scalar_dense", "nonzero", "bincount", "_unique", "unique_dim", "masked_select")

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNCS or (name == "repeat_interleave" and (kwargs or {}).get("output_size") is None):
            self.syncs.append(name)
        return super().__torch_dispatch__(func, types, args, kwargs)


def _host_reads(monkeypatch) -> list:
    """Every ``tolist`` / ``item`` / ``bool`` / ``int`` / ``float`` / ``numpy`` of a tensor called
    from the package's own code (on a GPU each is a device→host sync; ``tolist`` does not pass
    through the dispatcher, so a dispatch mode alone would miss it)."""
    import sys

    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **kw):
            caller = sys._getframe(1).f_code.co_filename
            if "sorsa_kernels" in caller:
                reads.append(f"{_name} in {caller}")
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


def _bnb_calls(monkeypatch) -> list:
    import bitsandbytes.functional as F

    calls, deq = [], F.dequantize_4bit

    def spy(*a, **kw):
        calls.append(1)
        return deq(*a, **kw)

    monkeypatch.setattr(F, "dequantize_4bit", spy)
    return calls


def _routed_step(E=8, m=40, n=36, tokens=14, k=2, seed=3):
    """A routed QSORSA projection (gather, routing weights, scatter) forward and backward on
    fp32, with experts 2 and 6 receiving no rows."""
    nf4, _ = _nf4_stack(E=E, m=m, n=n, seed=seed)
    U, S, V = _factors(E=E, m=m, n=n, r=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    ids[ids == 2], ids[ids == 6] = 0, 7
    flat = ids.reshape(-1)
    _, slots = torch.sort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int64).index_add_(0, flat, torch.ones_like(flat))
    x = torch.randn(tokens, n, generator=g, requires_grad=True)
    w = torch.rand(tokens * k, generator=g, requires_grad=True)

    def step():
        y = qsorsa_experts(x, counts, nf4, U, S, V, scale=0.5, slots=slots, top_k=k, gather=True, scatter=True,
                           weights=w)
        y.backward(torch.randn_like(y))

    return step, int((counts > 0).sum())


def test_kernel_path_creates_no_tensor_of_a_quarter_stack_and_syncs_nothing(backend, monkeypatch):
    # E = 8, m·n = 1440: E·m·n/4 = 2880 elements; every activation (≤ 28 rows × 40) is smaller, so
    # a tensor that large can only be (part of) a dequantized stack.  No host sync, no bitsandbytes.
    backend("triton")
    step, _ = _routed_step()
    bnb = _bnb_calls(monkeypatch)
    reads = _host_reads(monkeypatch)
    with _Watch() as mode:
        step()
    assert 0 < mode.largest < 8 * 40 * 36 // 4, mode.largest
    assert mode.syncs == [] and reads == []
    assert bnb == []


def test_host_read_watch_sees_the_reference_paths_counts_on_the_host(backend, monkeypatch):
    # The watch itself can fail: the reference path reads counts on the host (counts_list).
    backend("reference")
    step, _ = _routed_step()
    reads = _host_reads(monkeypatch)
    step()
    assert any(r.startswith("tolist") for r in reads)


def test_reference_path_dequantizes_at_most_half_the_experts_once_per_active_expert_per_pass(backend, monkeypatch):
    # The reference path's own bound: at most E/2 experts' residuals at once even when
    # expert_chunk (default 8) covers the stack; bitsandbytes runs once per expert with rows in
    # forward and once in backward (for dx).
    backend("reference")
    step, active = _routed_step()
    bnb = _bnb_calls(monkeypatch)
    with _LargestOutput() as mode:
        step()
    assert mode.largest <= 4 * 40 * 36 < 8 * 40 * 36
    assert len(bnb) == 2 * active
