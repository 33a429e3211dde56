"""orthonormal_regularizer / add_regularizer_grad against autograd of the definition."""
import pytest
import torch
from torch import nn

from sorsa_kernels import SORSALinear, add_regularizer_grad, orthonormal_regularizer
from tests.conftest import rel_err


def _model(seed=0, perturb=0.05):
    torch.manual_seed(seed)
    model = nn.Sequential(
        SORSALinear.from_linear(nn.Linear(40, 24), 6),
        nn.ReLU(),
        SORSALinear.from_linear(nn.Linear(24, 30), 3),
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(perturb * torch.randn_like(p))
    return model


def _definition(mats):
    norms = [torch.linalg.matrix_norm(a.T @ a - torch.eye(a.shape[1], dtype=a.dtype)) for a in mats]
    return torch.stack(norms).mean()


def _mats(model):
    return [t for m in model if isinstance(m, SORSALinear) for t in (m.U, m.V)]


def test_value_is_mean_of_plain_frobenius_norms():
    model = _model()
    expected = _definition([a.detach().double() for a in _mats(model)])
    assert rel_err(orthonormal_regularizer(model), expected) < 1e-6


def test_add_regularizer_grad_matches_autograd_of_definition():
    model = _model()
    gamma, lr_max = 4e-4, 3e-5
    mats64 = [a.detach().double().requires_grad_() for a in _mats(model)]
    (gamma / lr_max * _definition(mats64)).backward()
    value = add_regularizer_grad(model, gamma, lr_max)
    assert rel_err(value, _definition([a.detach() for a in mats64])) < 1e-6
    for a, a64 in zip(_mats(model), mats64):
        assert rel_err(a.grad, a64.grad) < 1e-5


def test_add_regularizer_grad_adds_to_existing_grad():
    model = _model()
    for a in _mats(model):
        a.grad = torch.ones_like(a)
    mats64 = [a.detach().double().requires_grad_() for a in _mats(model)]
    (2.0 * _definition(mats64)).backward()
    add_regularizer_grad(model, gamma=2.0, lr_max=1.0)
    for a, a64 in zip(_mats(model), mats64):
        assert rel_err(a.grad, a64.grad + 1.0) < 1e-5


def test_exactly_orthonormal_factors_get_zero_finite_gradient():
    model = _model(perturb=0.0)
    with torch.no_grad():
        for a in _mats(model):
            a.copy_(torch.eye(a.shape[0], a.shape[1]))
    value = add_regularizer_grad(model, 4e-4, 3e-5)
    assert float(value) == 0.0
    for a in _mats(model):
        assert torch.isfinite(a.grad).all() and not a.grad.any()


def test_model_without_adapters_is_rejected():
    with pytest.raises(ValueError, match="no SORSALinear"):
        orthonormal_regularizer(nn.Linear(3, 3))


def test_non_positive_lr_max_is_rejected():
    with pytest.raises(ValueError, match="lr_max"):
        add_regularizer_grad(_model(), 4e-4, 0.0)
