import pytest
import torch

from sorsa_kernels import apply_sorsa, model_singular_drift, singular_drift
from tests.conftest import build_tiny_llama, train_steps


def test_drift_of_identical_weights_is_zero():
    w = torch.randn(12, 9)
    d = singular_drift(w, w)
    assert d.delta_sigma == pytest.approx(0.0, abs=1e-12) and d.delta_d == pytest.approx(0.0, abs=1e-12)


def test_drift_matches_equations_on_a_known_case():
    # W0 = diag(3, 2, 1); Wt scales singular values and swaps the last two directions.
    w0 = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    wt = torch.diag(torch.tensor([4.0, 0.5, 1.5]))  # σ_t = (4, 1.5, 0.5); vectors e1, e3, e2
    d = singular_drift(wt, w0)
    assert d.delta_sigma == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert d.delta_d == pytest.approx(1 - (1 + 0 + 0 + 1 + 0 + 0) / 6)


def test_model_drift_covers_every_layer_and_grows_with_training():
    token_ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model = build_tiny_llama()
    apply_sorsa(model, 8, progress=False)
    before = model_singular_drift(model)
    assert len(before) == 14 and all(v.delta_sigma < 1e-5 for v in before.values())
    train_steps(model, token_ids, steps=3)
    after = model_singular_drift(model)
    assert all(after[k].delta_sigma > before[k].delta_sigma for k in after)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="one shape"):
        singular_drift(torch.randn(3, 4), torch.randn(4, 3))


def test_model_drift_of_a_merged_model_says_to_analyze_a_copy_made_before_merging():
    from sorsa_kernels import merge_sorsa

    model = build_tiny_llama()
    apply_sorsa(model, 4, progress=False)
    merge_sorsa(model)
    with pytest.raises(ValueError, match="no SORSA layers or SORSA experts to analyze .*copy made before merging"):
        model_singular_drift(model)


def _tiny_mixtral():
    import transformers

    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    return model


def test_an_experts_only_adapter_is_analyzed_per_projection_not_refused_as_merged():
    from sorsa_kernels.adapters.analysis import expert_singular_drift
    from sorsa_kernels.nn.experts import SORSAExperts

    model = _tiny_mixtral()
    apply_sorsa(model, 3, target_modules=["experts"], progress=False)
    before = model_singular_drift(model)
    assert sorted(before) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")]
    assert all(abs(d.delta_sigma) < 1e-10 for d in before.values())
    with torch.no_grad():  # move expert 1 of one projection only
        proj = model.get_submodule("model.layers.0.mlp.experts.down_proj")
        assert isinstance(proj, SORSAExperts)
        proj.S[1] *= 1.5
    per_expert = expert_singular_drift(proj)
    assert len(per_expert) == 4 and per_expert[1].delta_sigma > 0
    assert all(abs(per_expert[e].delta_sigma) < 1e-10 for e in (0, 2, 3))
    after = model_singular_drift(model)
    assert after["model.layers.0.mlp.experts.down_proj"].delta_sigma == pytest.approx(per_expert[1].delta_sigma / 4)


def test_model_drift_includes_experts_beside_linear_layers():
    model = _tiny_mixtral()
    apply_sorsa(model, 3, progress=False)
    names = set(model_singular_drift(model))
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.experts.gate_up_proj" in names
