"""Issue 24, items 5, 7 and 12 at the API: alpha and gamma bounded by what the adapter dtype can
hold (checked before any SVD or step), and generation for exact match never fed a prompt longer
than ``--max-length``."""
import re

import pytest
import torch
from torch import nn

from sorsa_kernels import SORSACallback, SORSALinear, add_regularizer_grad, apply_sorsa
from sorsa_kernels.jobs.models.embedded import build_embedded
from sorsa_kernels.jobs.finetune.evaluation import exact_match
from sorsa_kernels.nn.knobs import check_scale


# ---------------------------------------------------------------------- 7: alpha
@pytest.mark.parametrize("alpha, message", [
    (1e-38, "alpha 1e-38 gives scale alpha/rank = 2.5e-39, which float32 cannot hold"),
    (1e300, "alpha 1e+300 gives scale alpha/rank = 2.5e+299, which float32 cannot hold"),
])
def test_from_linear_refuses_an_alpha_that_makes_s_infinite_or_zero(alpha, message, monkeypatch):
    from sorsa_kernels.ops import reference

    monkeypatch.setattr(reference, "principal_split", lambda *a, **k: pytest.fail("SVD ran"))
    with pytest.raises(ValueError, match=re.escape(message)):
        SORSALinear.from_linear(nn.Linear(64, 48), 4, alpha=alpha)


def test_alpha_bounds_follow_the_adapter_dtype():
    check_scale(1e10, 8)  # float32 holds it
    with pytest.raises(ValueError, match="which float16 cannot hold"):
        SORSALinear.from_linear(nn.Linear(64, 48), 4, alpha=1e10, adapter_dtype=torch.float16)


def test_apply_sorsa_refuses_a_bad_alpha_before_touching_the_model(tiny_llama):
    with pytest.raises(ValueError, match="cannot hold"):
        apply_sorsa(tiny_llama, 4, alpha=1e300, progress=False)
    assert all(p.requires_grad for p in tiny_llama.parameters())


def test_an_alpha_inside_the_bounds_gives_finite_factors_and_outputs():
    layer = SORSALinear.from_linear(nn.Linear(64, 48), 4, alpha=1e-12)
    assert bool(torch.isfinite(layer.S).all()) and bool(torch.isfinite(layer(torch.randn(3, 64))).all())


# ---------------------------------------------------------------------- 5: gamma
def test_a_gamma_whose_gradient_overflows_the_optimizer_is_refused_by_the_callback():
    with pytest.raises(ValueError, match=r"gamma 1e\+30 with learning rate 3e-05 .* overflows float32 in the "
                                         r"optimizer's squared gradient \(U and V would stop training\)"):
        SORSACallback(gamma=1e30, lr_max=3e-5)


def test_add_regularizer_grad_refuses_it_before_touching_a_gradient(tiny_llama):
    apply_sorsa(tiny_llama, 4, ["q_proj"], progress=False)
    with pytest.raises(ValueError, match="overflows float32"):
        add_regularizer_grad(tiny_llama, 1e30, 3e-3)
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_a_large_but_representable_gamma_still_trains_u_and_v(tiny_llama):
    apply_sorsa(tiny_llama, 4, ["q_proj"], progress=False)
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    U0 = layer.U.detach().clone()
    opt = torch.optim.AdamW([layer.U, layer.S, layer.V], lr=1e-3)
    ids = torch.randint(0, 128, (2, 8))
    for _ in range(2):
        tiny_llama(ids, labels=ids).loss.backward()
        add_regularizer_grad(tiny_llama, 1e6, 1e-3)
        opt.step()
        opt.zero_grad()
    assert not torch.equal(layer.U.detach(), U0)


# ---------------------------------------------------------------------- 12: generation within --max-length
def test_exact_match_cuts_a_long_prompt_to_max_length_before_generating():
    model, tok = build_embedded(pretrain_steps=0, seed=0, progress=False)
    lengths = []
    real = model.generate

    def spy(**kw):
        lengths.append(kw["input_ids"].shape[1])
        return real(**kw)

    model.generate = spy
    rows = [{"prompt": "3+4=" * 5000, "response": "7"}, {"prompt": "1+1=", "response": "2"}]
    em = exact_match(model, tok, rows, "{prompt}", False, max_new_tokens=4, max_length=64)
    assert 0.0 <= em <= 1.0 and lengths == [60]
