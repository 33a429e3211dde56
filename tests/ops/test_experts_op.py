"""``sorsa_experts``: rows grouped by expert, against the dense per-expert oracle.

The reference path is checked against ``reference.experts_dense`` differentiated by PyTorch in
float64, on uneven counts with empty experts; the dense path must never allocate a tensor the
size of an expert's dense weight (let alone the E×m×n stack) in forward or backward.
"""
from __future__ import annotations

import pytest
import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

from sorsa_kernels.ops import reference
from sorsa_kernels.ops.experts import sorsa_experts
from tests.conftest import rel_err

# E = 5 experts with uneven rows, two of them empty; sizes no block divides.
COUNTS = [4, 0, 9, 1, 0]


def _stacks(E=5, m=22, n=18, r=3, dtype=torch.float64, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    res = mk(E, m, n)
    U, S, V = mk(E, m, r).requires_grad_(), (mk(E, r).abs() + 0.5).requires_grad_(), mk(E, n, r).requires_grad_()
    b = mk(E, m) if bias else None
    return res, U, S, V, b


def _grads(y, dy, *ts):
    return torch.autograd.grad(y, ts, dy)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_reference_matches_dense_oracle_float64_uneven_counts(bias):
    res, U, S, V, b = _stacks(bias=bias)
    counts = torch.tensor(COUNTS)
    M = sum(COUNTS)
    x = torch.randn(M, 18, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(M, 22, dtype=torch.float64)
    y = sorsa_experts(x, counts, res, U, S, V, b, scale=0.7)
    want = reference.experts_dense(x, counts, res, U, S, V, b, 0.7)
    assert rel_err(y, want) < 1e-12
    got = _grads(y, dy, x, U, S, V)
    ref = _grads(want, dy, x, U, S, V)
    for name, a, e in zip("x U S V".split(), got, ref):
        assert rel_err(a, e) < 1e-12, name


def test_empty_experts_get_zero_gradients():
    res, U, S, V, _ = _stacks()
    counts = torch.tensor(COUNTS)
    x = torch.randn(sum(COUNTS), 18, dtype=torch.float64)
    sorsa_experts(x, counts, res, U, S, V).sum().backward()
    for e in (1, 4):
        assert U.grad[e].abs().max() == 0 and S.grad[e].abs().max() == 0 and V.grad[e].abs().max() == 0
    assert U.grad[0].abs().max() > 0


def _flat_tensors(xs):
    for a in xs:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (tuple, list)):
            yield from _flat_tensors(a)


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of a tensor any op allocates (views of an
    argument's storage, such as ``residual[e]``, are not allocations).  The package's custom
    ops are opened: their implementations run under the mode, so what they allocate inside
    counts too (a custom op is one node to the dispatcher)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = _maybe_get_opdef(func) if func.namespace == "sorsa_kernels" else None
        if opdef is not None:
            with self:
                out = opdef._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in _flat_tensors((*args, *kwargs.values()))}
        for t in _flat_tensors(out if isinstance(out, (tuple, list)) else (out,)):
            if t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_forward_backward_allocate_no_expert_sized_tensor(dtype):
    # m·n = 48·40 = 1920 per expert; every activation (M ≤ 12 rows × 48) is far smaller, so an
    # output of m·n elements or more can only be a dense ΔW (or a cast of the residual).
    E, m, n, r = 4, 48, 40, 4
    res, U, S, V, _ = _stacks(E, m, n, r, dtype=dtype)
    res = res.detach()
    counts = torch.tensor([5, 0, 7, 0])
    x = torch.randn(12, n, dtype=dtype, requires_grad=True)
    with _LargestOutput() as mode:
        y = sorsa_experts(x, counts, res, U, S, V)
        y.backward(torch.randn_like(y))
    assert 0 < mode.largest < m * n, mode.largest
    assert U.grad is not None and x.grad is not None


def test_guard_sees_a_dense_delta_w():
    # The guard itself can fail: the obvious per-expert formula forms ΔW_e (m×n).
    E, m, n, r = 4, 48, 40, 4
    res, U, S, V, _ = _stacks(E, m, n, r, dtype=torch.float32)
    x = torch.randn(12, n)
    with _LargestOutput() as mode:
        w = res[0] + U[0] @ (S[0, :, None] * V[0].T)
        (x @ w.T).sum().backward()
    assert mode.largest >= m * n


def test_bad_counts_named():
    res, U, S, V, _ = _stacks()
    x = torch.randn(14, 18, dtype=torch.float64)
    with pytest.raises(ValueError, match="counts must be an integer vector of rows per expert with 5 entries"):
        sorsa_experts(x, torch.tensor([14, 0]), res, U, S, V)


def test_residual_requiring_grad_rejected():
    res, U, S, V, _ = _stacks()
    x = torch.randn(14, 18, dtype=torch.float64)
    with pytest.raises(ValueError, match="residual is frozen"):
        sorsa_experts(x, torch.tensor(COUNTS), res.requires_grad_(), U, S, V)


def test_principal_split_of_a_stack_matches_each_matrix():
    w = torch.randn(3, 12, 9)
    U, s, V = reference.principal_split(w, 4)
    for e in range(3):
        u, se, v = reference.principal_split(w[e], 4)
        assert torch.allclose(s[e], se, atol=1e-5)
        assert torch.allclose((U[e] * s[e]) @ V[e].T, (u * se) @ v.T, atol=1e-4)


def test_experts_ops_dispatch_each_direction_through_the_kernel_op_seam(monkeypatch):
    from sorsa_kernels.ops.kernel_op import KernelOp
    from sorsa_kernels.ops.experts import qsorsa_experts
    from sorsa_kernels.quant.nf4 import quantize_nf4

    seen, call = [], KernelOp.__call__

    def spy(self, kernel, *args):
        seen.append(self.name)
        return call(self, kernel, *args)

    monkeypatch.setattr(KernelOp, "__call__", spy)
    res, U, S, V, _ = _stacks(dtype=torch.float32)
    counts = torch.tensor(COUNTS)
    x = torch.randn(sum(COUNTS), 18)
    sorsa_experts(x, counts, res, U, S, V).sum().backward()
    assert seen == ["sorsa_experts forward", "sorsa_experts backward"]
    qs = [quantize_nf4(w) for w in res]
    st = lambda f: torch.stack([getattr(q, f).reshape(-1) for q in qs])  # noqa: E731
    nf4 = (st("packed"), st("absmax"), st("nested_absmax"), qs[0].nested_code, st("offset").reshape(-1), qs[0].code)
    qsorsa_experts(x, counts, nf4, U, S, V).sum().backward()
    assert seen[2:] == ["sorsa_experts forward", "sorsa_experts backward"]
