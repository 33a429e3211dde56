"""Issue 28 item 3, ``--optim`` and bf16 adapters: bitsandbytes' 8-bit AdamW with uint8 state for
every U and V (even under bitsandbytes' 4096-element threshold) and fp32 state for S; bf16-stored
adapters stepped in fp32 and stochastically rounded, so steps below half a bf16 ulp still count."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sorsa_kernels.nn.linear import SORSALinear
from sorsa_kernels.training import make_optimizer
from sorsa_kernels.training.optim import stochastic_round_


def _model(adapter_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 128))  # U, V: 96·16 ≤ 128·16 < 4096
    m[0] = SORSALinear.from_linear(m[0], 16, adapter_dtype=adapter_dtype)
    m[2] = SORSALinear.from_linear(m[2], 16, adapter_dtype=adapter_dtype)
    return m


def _step(model, opt, x):
    opt.zero_grad()
    model(x.to(model[0].U.dtype)).float().pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_adamw_keeps_uint8_state_for_every_small_U_and_V_and_fp32_for_S(name):
    model = _model()
    opt = make_optimizer(model, name, lr=1e-3)
    _step(model, opt, torch.randn(8, 128))
    for layer in (model[0], model[2]):
        for p in (layer.U, layer.V):
            assert p.numel() < 4096  # under bitsandbytes' default min_8bit_size
            assert opt.state[p]["state1"].dtype == torch.uint8 and opt.state[p]["state2"].dtype == torch.uint8
        assert opt.state[layer.S]["state1"].dtype == torch.float32


def test_paged_adamw8bit_on_cpu_warns_that_it_is_not_paged():
    model = _model()
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        _step(model, make_optimizer(model, "paged_adamw8bit", lr=1e-3), torch.randn(8, 128))


def test_unknown_optimizer_is_named_with_the_allowed_ones():
    with pytest.raises(ValueError, match="optimizer 'sgd' is not known; allowed: adamw, adamw8bit, paged_adamw8bit"):
        make_optimizer(_model(), "sgd")


def test_stochastic_rounding_to_bf16_is_unbiased():
    x = torch.full((200_000,), 1 + 2 ** -10)  # a quarter ulp above 1: nearest rounding gives 1.0
    y = stochastic_round_(torch.empty_like(x, dtype=torch.bfloat16), x, torch.Generator().manual_seed(0))
    assert set(y.float().unique().tolist()) == {1.0, 1.0078125}
    assert abs(y.float().mean().item() - x[0].item()) < 2e-5
    neg = stochastic_round_(torch.empty_like(x, dtype=torch.bfloat16), -x, torch.Generator().manual_seed(1))
    assert abs(neg.float().mean().item() + x[0].item()) < 2e-5  # symmetric for negative values


def _loss_drop(adapter_dtype, make, x, steps=40):
    model = _model(adapter_dtype)
    loss = lambda: model(x.to(adapter_dtype)).float().pow(2).mean().item()  # noqa: E731
    with torch.no_grad():
        before = loss()
    opt = make(model)
    for _ in range(steps):
        _step(model, opt, x)
    with torch.no_grad():
        return before - loss()


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_bf16_adapters_track_fp32_ones_with_steps_below_half_an_ulp(name):
    # lr 5e-5: most AdamW steps move U, S, V by less than half a bf16 ulp (2⁻⁹ relative).
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    ours = lambda model: make_optimizer(model, name, lr=5e-5)  # noqa: E731
    fp32 = _loss_drop(torch.float32, ours, x)
    bf16 = _loss_drop(torch.bfloat16, ours, x)
    nearest = _loss_drop(torch.bfloat16, lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad],
                                                                     lr=5e-5), x)
    assert fp32 > 0
    assert 0.9 < bf16 / fp32 < 1.1  # measured 0.993 (adamw) and 0.994 (adamw8bit)
    assert nearest / fp32 < 0.5  # round-to-nearest bf16 loses most steps (measured 0.15)
