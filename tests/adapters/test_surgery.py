import pytest
import torch
from torch import nn

from sorsa_kernels import SORSALinear, apply_sorsa, merge_sorsa
from sorsa_kernels.adapters.surgery import find_targets, plan_sorsa, sorsa_layers
from sorsa_kernels.nn.init_spec import SORSAInit
from tests.conftest import rel_err
from tests.conftest import fresh_copy, train_steps

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_default_targets_are_llama_projections(tiny_llama):
    apply_sorsa(tiny_llama, 4, progress=False)
    adapted = {n.rsplit(".", 1)[-1] for n, m in tiny_llama.named_modules() if isinstance(m, SORSALinear)}
    assert adapted == set(PROJ)
    assert sum(isinstance(m, SORSALinear) for m in tiny_llama.modules()) == 14


def test_init_preserves_llama_logits_fp32(tiny_llama, token_ids):
    ref = tiny_llama(token_ids).logits
    apply_sorsa(tiny_llama, 8, progress=False)
    assert rel_err(tiny_llama(token_ids).logits, ref) < 1e-5


def test_randomized_init_preserves_llama_logits(tiny_llama, token_ids):
    ref = tiny_llama(token_ids).logits
    apply_sorsa(tiny_llama, 8, svd="randomized", niter=2, progress=False)
    assert rel_err(tiny_llama(token_ids).logits, ref) < 1e-5


def test_only_adapter_factors_are_trainable(tiny_llama):
    apply_sorsa(tiny_llama, 4, target_modules=["q_proj", "v_proj"], progress=False)
    trainable = {n.rsplit(".", 1)[-1] for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable == {"U", "S", "V"}
    assert sum(p.requires_grad for p in tiny_llama.parameters()) == 2 * 2 * 3


def test_regex_targets(tiny_llama):
    names = find_targets(tiny_llama, r"model\.layers\.0\..*_proj")
    assert len(names) == 7 and all(n.startswith("model.layers.0.") for n in names)


def test_no_matching_target_is_rejected(tiny_llama):
    with pytest.raises(ValueError, match="no module of the model matches"):
        apply_sorsa(tiny_llama, 4, target_modules=["c_attn"], progress=False)


def test_target_that_is_not_linear_is_rejected(tiny_llama):
    with pytest.raises(TypeError, match="embed_tokens is a Embedding, not nn.Linear"):
        apply_sorsa(tiny_llama, 4, target_modules=["embed_tokens"], progress=False)


def test_rank_too_large_names_the_layer_and_leaves_model_untouched(tiny_llama):
    with pytest.raises(ValueError, match=r"rank 65 exceeds .* = 64 for layer model.layers.0.self_attn.q_proj"):
        apply_sorsa(tiny_llama, 65, progress=False)
    assert not any(isinstance(m, SORSALinear) for m in tiny_llama.modules())


def test_merge_replaces_every_layer_and_keeps_logits(tiny_llama, token_ids):
    apply_sorsa(tiny_llama, 8, progress=False)
    train_steps(tiny_llama, token_ids)
    out = tiny_llama(token_ids).logits
    merge_sorsa(tiny_llama)
    assert not any(isinstance(m, SORSALinear) for m in tiny_llama.modules())
    assert rel_err(tiny_llama(token_ids).logits, out) < 1e-5


def test_training_moves_factors_and_changes_logits(tiny_llama, token_ids):
    base = fresh_copy(tiny_llama)
    apply_sorsa(tiny_llama, 8, progress=False)
    train_steps(tiny_llama, token_ids)
    assert rel_err(tiny_llama(token_ids).logits, base(token_ids).logits) > 1e-3


def test_generic_module_surgery():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    x = torch.randn(4, 20)
    ref = model(x)
    apply_sorsa(model, 3, target_modules=["0", "2"], progress=False)
    assert isinstance(model[0], SORSALinear) and isinstance(model[2], SORSALinear)
    assert rel_err(model(x), ref) < 1e-5


# ---- issue 30 item 1 and issue 29 items 2, 15: one plan, one matcher, checked before any change
def _untouched(model, before):
    return ({n: type(m) for n, m in model.named_modules()} == before
            and all(p.requires_grad for p in model.parameters()))


def test_plan_decides_the_layers_without_changing_the_model(tiny_llama):
    before = {n: type(m) for n, m in tiny_llama.named_modules()}
    plan = plan_sorsa(tiny_llama, 4, ["q_proj", "v_proj"], alpha=8.0)
    assert plan.linear == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert plan.init == SORSAInit(rank=4, alpha=8.0) and not plan.experts and not plan.saved
    assert _untouched(tiny_llama, before)
    plan.apply(tiny_llama)
    assert sorted(sorsa_layers(tiny_llama)) == plan.linear


def test_a_plan_is_made_on_the_meta_device(tiny_llama):
    meta = fresh_copy(tiny_llama).to("meta")
    assert plan_sorsa(meta, 4).linear == plan_sorsa(tiny_llama, 4).linear
    with pytest.raises(ValueError, match="meta device for layer model.layers.0.self_attn.q_proj"):
        plan_sorsa(meta, 4).apply(meta)


def test_apply_sorsa_takes_one_init_spec(tiny_llama, token_ids):
    ref = tiny_llama(token_ids).logits
    apply_sorsa(tiny_llama, SORSAInit(rank=4, alpha=8.0, svd="randomized"), ["q_proj"], progress=False)
    layers = sorsa_layers(tiny_llama).values()
    assert {(l.rank, l.scale) for l in layers} == {(4, 2.0)}
    assert rel_err(tiny_llama(token_ids).logits, ref) < 1e-5


def test_an_unknown_init_keyword_is_one_line_naming_it(tiny_llama):
    with pytest.raises(TypeError, match="unknown SORSA init option 'svd_iters'; allowed: alpha, dropout, svd, niter"):
        apply_sorsa(tiny_llama, 4, progress=False, svd_iters=3)


def test_a_target_entry_matching_nothing_names_it_and_the_nearest_names(tiny_llama):
    before = {n: type(m) for n, m in tiny_llama.named_modules()}
    with pytest.raises(ValueError) as e:
        apply_sorsa(tiny_llama, 4, target_modules=["q_proj", "v_prj"], progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "target_modules entry 'v_prj'" in msg and "nearest names: v_proj" in msg
    assert _untouched(tiny_llama, before)


def test_all_linear_beside_other_entries_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="'all-linear' must stand alone"):
        apply_sorsa(tiny_llama, 4, target_modules=["all-linear", "q_proj"], progress=False)


def test_modules_to_save_naming_a_target_layer_is_refused_before_any_change(tiny_llama):
    before = {n: type(m) for n, m in tiny_llama.named_modules()}
    with pytest.raises(ValueError, match=r"modules_to_save 'model.layers.1.self_attn.q_proj' overlaps the target "
                                         r"layer model.layers.1.self_attn.q_proj"):
        apply_sorsa(tiny_llama, 4, target_modules=["q_proj", "v_proj"],
                    modules_to_save=["model.layers.1.self_attn.q_proj"], progress=False)
    assert _untouched(tiny_llama, before)

