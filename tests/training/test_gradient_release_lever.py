"""Issue 28 item 3, gradient release: every adapter steps in its post-accumulate-grad hook, with
the paper's order per parameter (clip, then add the regularizer's gradient, then step), and the
result equals the ordinary loop with per-parameter clipping."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sorsa_kernels.nn.linear import SORSALinear
from sorsa_kernels.nn.regularizer import add_regularizer_grad, orthonormal_regularizer
from sorsa_kernels.training import enable_gradient_release

GAMMA, LR = 4e-2, 1e-3


def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 24))
    m[0] = SORSALinear.from_linear(m[0], 6)
    m[2] = SORSALinear.from_linear(m[2], 5)
    return m


def _batches(n=4):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(8, 48, generator=g) for _ in range(n)]


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("clip", [0.0, 1e-3])  # 1e-3 clips every gradient: a clipped regularizer would show
def test_gradient_release_equals_clip_then_regularizer_then_step(clip):
    ref = _model()
    opt = torch.optim.AdamW(_trainable(ref), lr=LR, foreach=False)
    ref_values = []
    for x in _batches():
        opt.zero_grad()
        ref(x).pow(2).mean().backward()
        if clip:
            for p in _trainable(ref):
                torch.nn.utils.clip_grad_norm_([p], clip)
        ref_values.append(float(add_regularizer_grad(ref, GAMMA, LR)))
        opt.step()

    model = _model()
    released = enable_gradient_release(model, lambda ps: torch.optim.AdamW(ps, lr=LR, foreach=False),
                                       gamma=GAMMA, lr_max=LR, max_grad_norm=clip)
    values = []
    for x in _batches():
        model(x).pow(2).mean().backward()
        assert all(p.grad is None for p in _trainable(model))  # stepped and freed inside backward
        values.append(float(released.pop_regularizer_value()))
        released.step()
    for p, q in zip(_trainable(model), _trainable(ref)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert values == pytest.approx(ref_values, rel=1e-5, abs=1e-7)


def test_released_optimizer_learning_rate_reaches_every_parameter():
    model = _model()
    released = enable_gradient_release(model, lambda ps: torch.optim.AdamW(ps, lr=LR), gamma=0.0, lr_max=LR)
    before = [p.detach().clone() for p in _trainable(model)]
    released.param_groups[0]["lr"] = 0.0  # what a scheduler at warm-up start sets
    model(_batches(1)[0]).pow(2).mean().backward()
    for p, b in zip(_trainable(model), before):
        assert torch.equal(p.detach(), b)


def test_released_optimizer_state_round_trips_for_checkpoints():
    model = _model()
    released = enable_gradient_release(model, lambda ps: torch.optim.AdamW(ps, lr=LR), gamma=GAMMA, lr_max=LR)
    model(_batches(1)[0]).pow(2).mean().backward()
    state = released.state_dict()
    other = enable_gradient_release(_model(), lambda ps: torch.optim.AdamW(ps, lr=LR), gamma=GAMMA, lr_max=LR)
    other.load_state_dict(state)
    for a, b in zip(released.per_param.values(), other.per_param.values()):
        sa, sb = a.state_dict()["state"][0], b.state_dict()["state"][0]
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"])


def test_gradient_release_value_is_the_models_regularizer():
    model = _model()
    with torch.no_grad():
        for p in _trainable(model):
            p.add_(0.05 * torch.randn_like(p))
    expected = float(orthonormal_regularizer(model))
    released = enable_gradient_release(model, lambda ps: torch.optim.SGD(ps, lr=0.0), gamma=GAMMA, lr_max=LR)
    model(_batches(1)[0]).pow(2).mean().backward()
    assert float(released.pop_regularizer_value()) == pytest.approx(expected, rel=1e-5)
    assert released.pop_regularizer_value() is None


def test_gradient_release_without_trainable_parameters_is_refused():
    with pytest.raises(ValueError, match="no trainable parameters; call sorsa_kernels.apply_sorsa first"):
        enable_gradient_release(nn.Linear(3, 3).requires_grad_(False), lambda ps: torch.optim.SGD(ps, lr=1.0))


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_gradient_release_reports_the_global_gradient_norm_before_clipping(clip):
    """The Trainer cannot take the norm (no gradient is left when it clips): the hooks sum it, and
    it is the ordinary loop's global norm, not 0."""
    ref = _model()
    x = _batches(1)[0]
    ref(x).pow(2).mean().backward()
    expected = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in _trainable(ref)])))
    model = _model()
    released = enable_gradient_release(model, lambda ps: torch.optim.SGD(ps, lr=LR), gamma=GAMMA, lr_max=LR,
                                       max_grad_norm=clip)
    model(x).pow(2).mean().backward()
    assert float(released.pop_grad_norm()) == pytest.approx(expected, rel=1e-5)
    assert released.pop_grad_norm() is None  # one value per step
