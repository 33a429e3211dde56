"""The regularizer op: the reference against autograd of the definition, and dispatch.

The definition is ``L = mean_i ‖A_iᵀA_i − I‖_F`` (plain Frobenius norms, ``A_i·A_iᵀ`` for a
matrix stored r×k), differentiated by ``torch.autograd.grad`` in float64.
"""
from __future__ import annotations

import pytest
import torch

from sorsa_kernels.ops import reference
from sorsa_kernels.ops import regularizer as reg_op
from tests.conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (k, r, transposed): ragged, k < r included, both orientations.
SHAPES = [(23, 4, False), (9, 3, True), (3, 5, False), (40, 17, True)]


def _matrices(seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mats = []
    for k, r, tr in SHAPES:
        a = torch.randn(k, r, generator=g) / k**0.5
        mats.append((a.T.contiguous() if tr else a).to(device=device, dtype=dtype).requires_grad_())
    return mats, [tr for _, _, tr in SHAPES]


def _definition(mats, flags):
    norms = []
    for a, tr in zip(mats, flags):
        gram = a @ a.T if tr else a.T @ a
        norms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=a.dtype, device=a.device)))
    return torch.stack(norms).mean()


# --------------------------------------------------------------------------- reference vs definition
def test_reference_value_is_mean_of_plain_frobenius_norms():
    mats, flags = _matrices(seed=0)
    expected = _definition(mats, flags)
    value = reference.ortho_value_and_grad_([a.detach().clone().requires_grad_() for a in mats], 1.0, flags)
    assert rel_err(value, expected) < 1e-6  # the reference forms G in float32


def test_reference_grad_matches_autograd_of_definition():
    mats, flags = _matrices(seed=1)
    coeff = 4e-4 / 3e-5
    expected = torch.autograd.grad(coeff * _definition(mats, flags), mats)
    copies = [a.detach().clone().requires_grad_() for a in mats]
    reference.ortho_value_and_grad_(copies, coeff, flags)
    for c, e in zip(copies, expected):
        assert rel_err(c.grad, e) < 1e-5


def test_reference_per_matrix_grad_matches_autograd_of_one_norm():
    mats, flags = _matrices(seed=2)
    for a, tr in zip(mats, flags):
        (expected,) = torch.autograd.grad(_definition([a], [tr]), [a])
        assert rel_err(reference.ortho_grad(a.detach(), tr), expected) < 1e-5


def test_reference_transposed_is_the_transpose_of_untransposed():
    mats, flags = _matrices(seed=3)
    for a, tr in zip(mats, flags):
        if tr:
            assert torch.allclose(reference.ortho_grad(a.detach(), True), reference.ortho_grad(a.detach().T, False).T)


def test_reference_grad_of_orthonormal_matrix_is_zero_not_nan():
    q = torch.eye(7, 4, dtype=torch.float64)
    g = reference.ortho_grad(q)
    assert torch.equal(g, torch.zeros_like(g, dtype=torch.float32))


def test_ortho_value_matches_definition_and_is_differentiable():
    mats, flags = _matrices(seed=4)
    value = reg_op.ortho_value(mats, flags)
    assert rel_err(value, _definition(mats, flags)) < 1e-6
    grads = torch.autograd.grad(value, mats)
    expected = torch.autograd.grad(_definition(mats, flags), mats)
    for g, e in zip(grads, expected):
        assert rel_err(g, e) < 1e-5


# --------------------------------------------------------------------------- dispatch
@pytest.fixture
def kernel_spy(monkeypatch):
    """Replace the grouped kernel by a recorder that then runs the real kernel."""
    ortho_reg = pytest.importorskip("sorsa_kernels.kernels.ortho_reg")
    calls = []
    real = ortho_reg.grouped_ortho_value_and_grad_

    def spy(mats, coeff, transposed=None, **kwargs):
        calls.append((mats, coeff, transposed))
        return real(mats, coeff, transposed, **kwargs)

    monkeypatch.setattr(ortho_reg, "grouped_ortho_value_and_grad_", spy)
    return calls


def test_reference_backend_never_calls_the_kernel(backend, kernel_spy):
    backend("reference")
    mats, flags = _matrices(seed=5, dtype=torch.float32, device=DEVICE)
    reg_op.ortho_value_and_grad_(mats, 2.0, flags)
    assert kernel_spy == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU routing of the auto backend")
def test_auto_backend_sends_cpu_tensors_to_the_reference(backend, kernel_spy):
    backend("auto")
    mats, flags = _matrices(seed=6, dtype=torch.float32)
    reg_op.ortho_value_and_grad_(mats, 2.0, flags)
    assert kernel_spy == []


def test_triton_backend_calls_the_grouped_kernel_with_flags(backend, kernel_spy):
    backend("triton")
    mats, flags = _matrices(seed=7, dtype=torch.float32, device=DEVICE)
    reg_op.ortho_value_and_grad_(tuple(mats), 3, flags)
    assert len(kernel_spy) == 1
    called_mats, coeff, transposed = kernel_spy[0]
    assert all(x is y for x, y in zip(called_mats, mats)) and len(called_mats) == len(mats)
    assert coeff == 3.0 and isinstance(coeff, float)
    assert transposed == flags


def test_triton_backend_matches_reference_backend(backend):
    pytest.importorskip("sorsa_kernels.kernels.ortho_reg")
    mats, flags = _matrices(seed=8, dtype=torch.float32, device=DEVICE)
    for a in mats[::2]:
        a.grad = torch.randn_like(a)
    copies = [a.detach().clone().requires_grad_() for a in mats]
    for a, c in zip(mats, copies):
        c.grad = None if a.grad is None else a.grad.clone()
    backend("reference")
    expected = reg_op.ortho_value_and_grad_(copies, 5.0, flags)
    backend("triton")
    value = reg_op.ortho_value_and_grad_(mats, 5.0, flags)
    assert rel_err(value, expected) < 1e-5
    for a, c in zip(mats, copies):
        assert rel_err(a.grad, c.grad) < 1e-5


def test_op_rejects_empty_list():
    with pytest.raises(ValueError, match="at least one adapter matrix"):
        reg_op.ortho_value_and_grad_([], 1.0)


def test_op_rejects_transposed_flags_of_wrong_length(backend):
    backend("reference")
    mats, _ = _matrices(seed=9, dtype=torch.float32)
    with pytest.raises(ValueError, match="transposed has 2 flags for 4 matrices"):
        reg_op.ortho_value_and_grad_(mats, 1.0, [True, False])


# --------------------------------------------------------------------------- custom ops
def test_ortho_value_op_passes_opcheck():
    """Schema, fake kernel and registered autograd of ``sorsa_kernels::ortho_value``."""
    mats, flags = _matrices(seed=10, dtype=torch.float32)
    torch.library.opcheck(torch.ops.sorsa_kernels.ortho_value.default, (list(mats), flags))


@pytest.mark.parametrize("name", ["reference", "triton"])
def test_ortho_value_and_grad_op_passes_opcheck_and_declares_its_gradient_writes(backend, name):
    """``sorsa_kernels::ortho_value_and_grad_`` writes only the grads it declares mutated."""
    if name == "triton":
        pytest.importorskip("sorsa_kernels.kernels.ortho_reg")
    backend(name)
    mats, flags = _matrices(seed=11, dtype=torch.float32, device=DEVICE)
    mats = [a.detach() for a in mats]
    grads = [torch.randn_like(a) for a in mats]
    torch.library.opcheck(torch.ops.sorsa_kernels.ortho_value_and_grad_.default,
                          (mats, grads, 2.0, flags, name == "triton"),
                          test_utils=("test_schema", "test_faketensor"))


def test_ortho_value_compiles_to_one_graph():
    mats, flags = _matrices(seed=12, dtype=torch.float32)
    explained = torch._dynamo.explain(lambda ms: reg_op.ortho_value(ms, flags))(list(mats))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
