"""Issue 24, the adapter half: an adapter applied to a base it was not fitted to, non-finite
weights written by merge/export, half-done surgery, shared modules, cast models, raw errors.
Tiny two-layer Llama (tests/conftest.py), no training beyond three AdamW steps."""
import copy

import pytest
import torch

from sorsa_kernels import SORSALinear, apply_sorsa, export_peft_lora, load_adapter, merge_sorsa, save_adapter
from sorsa_kernels.adapters.base_match import BaseMismatchError
from sorsa_kernels.adapters.surgery import sorsa_layers
from sorsa_kernels.distributed.meta import empty_model
from sorsa_kernels.jobs.finetune import jobs

from ..conftest import build_tiny_llama, train_steps

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def trained(tmp_path, token_ids):
    """(base, trained adapted model, adapter folder)."""
    base = build_tiny_llama(0)
    model = train_steps(apply_sorsa(copy.deepcopy(base), 4, progress=False), token_ids)
    save_adapter(model, tmp_path / "adapter")
    return base, model, tmp_path / "adapter"


def _max_diff(a, b, ids):
    with torch.no_grad():
        return float((a(ids).logits - b(ids).logits).abs().max())


# ---------------------------------------------------------------------- 4: the base an adapter was fitted to
def test_load_adapter_onto_its_own_base_reproduces_the_model(trained, token_ids):
    base, model, adapter = trained
    assert _max_diff(load_adapter(copy.deepcopy(base), adapter), model, token_ids) < 1e-5


def test_load_adapter_onto_the_same_base_cast_to_bf16_is_accepted(trained):
    base, _, adapter = trained
    load_adapter(copy.deepcopy(base).to(torch.bfloat16), adapter)


def test_load_adapter_onto_an_already_merged_model_is_refused(trained):
    _, model, adapter = trained
    merged = merge_sorsa(copy.deepcopy(model))
    with pytest.raises(BaseMismatchError, match=r"was not fitted to this base: layer model\.layers\.0\.self_attn\."
                                                 r"q_proj's weight does not match .*--allow-base-mismatch"):
        load_adapter(merged, adapter)
    assert not sorsa_layers(merged)  # refused before any layer changed


def test_load_adapter_onto_a_base_from_another_seed_is_refused(trained):
    _, _, adapter = trained
    with pytest.raises(BaseMismatchError, match="not fitted to this base"):
        load_adapter(build_tiny_llama(1), adapter)


def test_allow_base_mismatch_applies_the_adapter_to_another_base_on_purpose(trained):
    _, _, adapter = trained
    other = load_adapter(build_tiny_llama(1), adapter, allow_base_mismatch=True)
    assert len(sorsa_layers(other)) == 14


@pytest.mark.parametrize("job", ["merge", "analyze", "export"])
def test_merge_analyze_and_export_refuse_a_merged_base(trained, tmp_path, monkeypatch, job):
    _, model, adapter = trained
    merged = merge_sorsa(copy.deepcopy(model))
    monkeypatch.setattr(jobs, "load_base", lambda *a, **k: (copy.deepcopy(merged), None))
    run = {"merge": lambda: jobs.merge_job("m", str(adapter), str(tmp_path / "out")),
           "analyze": lambda: jobs.analyze_job("m", [str(adapter)]),
           "export": lambda: jobs.export_lora_job("m", str(adapter), str(tmp_path / "out"))}[job]
    with pytest.raises(BaseMismatchError, match="not fitted to this base"):
        run()
    assert not (tmp_path / "out").exists()


def test_cli_merge_onto_a_merged_base_is_one_line_and_the_flag_overrides(trained, tmp_path, monkeypatch, capsys):
    from sorsa_kernels.cli import main

    _, model, adapter = trained
    merged = merge_sorsa(copy.deepcopy(model))

    class Tok:
        def save_pretrained(self, path):
            pass

    monkeypatch.setattr(jobs, "load_base", lambda *a, **k: (copy.deepcopy(merged), Tok()))
    argv = ["merge", "--base", "m", "--adapter", str(adapter), "--output", str(tmp_path / "twice")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sorsa-kernels: error: adapter" in err and "not fitted to this base" in err
    assert main(argv + ["--allow-base-mismatch"]) == 0 and (tmp_path / "twice" / "config.json").is_file()


# ---------------------------------------------------------------------- issue 29, item 10: a small merged update
def _decaying_linear(m=48, n=40, seed=0):
    """An ``nn.Linear`` whose weight has the decaying spectrum of a pretrained projection (σ_i = e^{-i/6})."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    k = min(m, n)
    lin = torch.nn.Linear(n, m, bias=False)
    with torch.no_grad():
        lin.weight.copy_((q1[:, :k] * torch.exp(-torch.arange(k) / 6.0)) @ q2[:, :k].T)
    return lin


@pytest.fixture
def small_update(tmp_path):
    """(base, adapted model, adapter folder) of an adapter whose update is lr-1e-5 sized: ~20 Adam steps of
    1e-5 per factor entry, a merged update of relative size ~1e-3 (9e-4), below the fixed tolerance of 1e-2."""
    base = torch.nn.Sequential(_decaying_linear())
    model = apply_sorsa(copy.deepcopy(base), 8, ["0"], progress=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (model[0].U, model[0].S, model[0].V):
            p.add_(2e-4 * torch.randn(p.shape, generator=g))
    save_adapter(model, tmp_path / "adapter")
    return base, model, tmp_path / "adapter"


def test_a_merged_base_with_an_lr_1e5_sized_update_is_refused(small_update):
    from sorsa_kernels.adapters.base_match import DENSE_TOLERANCE, base_mismatch

    _, model, adapter = small_update
    merged = merge_sorsa(copy.deepcopy(model))
    U0, S0, V0 = model[0].init_factors
    assert 1e-4 < base_mismatch(merged[0].weight, U0, S0, V0, 1.0) < DENSE_TOLERANCE  # the fixed tolerance passes it
    with pytest.raises(BaseMismatchError, match=r"layer 0's weight does not match the adapter's initial factors "
                                                 r"U0, S0, V0 but holds the adapter's own update .*already merged"):
        load_adapter(merged, adapter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_right_base_of_an_adapter_with_a_small_update_is_accepted(small_update, dtype):
    base, model, adapter = small_update
    load_adapter(copy.deepcopy(base).to(dtype), adapter)


# ---------------------------------------------------------------------- 8: non-finite weights are never written
def _poison(model):
    with torch.no_grad():
        model.get_submodule(Q).U[0, 0] = float("nan")
    return model


def test_export_peft_lora_refuses_a_nan_factor_and_writes_nothing(trained, tmp_path):
    _, model, _ = trained
    with pytest.raises(ValueError, match=r"refusing to export a PEFT LoRA adapter: tensor base_model\.model\."
                                         r"model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight holds \d+ non-finite"):
        export_peft_lora(_poison(model), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_export_refuses_an_overflow_in_the_export_dtype(trained, tmp_path):
    _, model, _ = trained
    with torch.no_grad():
        model.get_submodule(Q).S.mul_(1e6)
    with pytest.raises(ValueError, match="non-finite .* the export dtype overflows"):
        export_peft_lora(model, tmp_path / "lora", dtype=torch.float16)


def test_merge_sorsa_refuses_a_nan_factor_and_leaves_the_model_adapted(trained):
    _, model, _ = trained
    _poison(model)
    with pytest.raises(ValueError, match=r"refusing to merge: the merged weight of layer model\.layers\.0\."
                                         r"self_attn\.q_proj holds \d+ non-finite .*allow_non_finite=True"):
        merge_sorsa(model)
    assert len(sorsa_layers(model)) == 14  # all or nothing: no layer was merged


def test_merge_sorsa_allow_non_finite_merges_anyway(trained):
    _, model, _ = trained
    merged = merge_sorsa(_poison(model), allow_non_finite=True)
    assert not sorsa_layers(merged) and not bool(torch.isfinite(merged.get_submodule(Q).weight).all())


# ---------------------------------------------------------------------- 9: apply_sorsa is all or nothing
def test_apply_sorsa_with_a_nan_weight_changes_nothing_and_a_retry_works(tiny_llama):
    w = tiny_llama.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        keep = w[2, 3].clone()
        w[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"weight contains NaN values for layer model\.layers\.1\.mlp\.down_proj"):
        apply_sorsa(tiny_llama, 4, progress=False)
    assert not sorsa_layers(tiny_llama) and all(p.requires_grad for p in tiny_llama.parameters())
    with torch.no_grad():
        w[2, 3] = keep
    assert len(sorsa_layers(apply_sorsa(tiny_llama, 4, progress=False))) == 14


def test_apply_sorsa_failing_part_way_puts_every_layer_back(tiny_llama, monkeypatch):
    from sorsa_kernels.adapters import plan  # where apply_sorsa's plan builds each layer

    real, calls = plan.make_sorsa_linear, []

    def flaky(linear, rank, **kw):
        calls.append(kw["name"])
        if len(calls) == 5:
            raise RuntimeError("out of memory")
        return real(linear, rank, **kw)

    monkeypatch.setattr(plan, "make_sorsa_linear", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        apply_sorsa(tiny_llama, 4, progress=False)
    assert not sorsa_layers(tiny_llama) and all(p.requires_grad for p in tiny_llama.parameters())


# ---------------------------------------------------------------------- 10: a module shared by two parents
def _shared(model):
    model.model.layers[1].self_attn.q_proj = model.model.layers[0].self_attn.q_proj
    return model


def test_apply_sorsa_adapts_a_shared_module_once_everywhere_it_appears(tiny_llama):
    apply_sorsa(_shared(tiny_llama), 4, ["q_proj"], progress=False)
    a, b = tiny_llama.model.layers[0].self_attn.q_proj, tiny_llama.model.layers[1].self_attn.q_proj
    assert isinstance(a, SORSALinear) and a is b


def test_merge_and_load_adapter_replace_a_shared_module_everywhere(tmp_path):
    model = apply_sorsa(_shared(build_tiny_llama(0)), 4, ["q_proj"], progress=False)
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(_shared(build_tiny_llama(0)), tmp_path / "a")
    assert loaded.model.layers[1].self_attn.q_proj is loaded.model.layers[0].self_attn.q_proj
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, SORSALinear)
    merge_sorsa(loaded)
    assert type(loaded.model.layers[1].self_attn.q_proj) is torch.nn.Linear


# ---------------------------------------------------------------------- 14: a cast model saves in its new dtype
@pytest.mark.parametrize("cast, dtype", [(lambda m: m.to(torch.bfloat16), torch.bfloat16),
                                         (lambda m: m.half(), torch.float16)])
def test_cast_adapted_model_saves_and_loads_in_its_new_dtype(tiny_llama, tmp_path, cast, dtype):
    model = cast(apply_sorsa(tiny_llama, 4, progress=False))
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(build_tiny_llama(0).to(dtype), tmp_path / "a")
    assert loaded.get_submodule(Q).U.dtype == dtype and loaded.get_submodule(Q).init_factors[0].dtype == dtype


# ---------------------------------------------------------------------- 17: raw errors become one line
def test_apply_sorsa_with_a_none_target_names_it(tiny_llama):
    with pytest.raises(TypeError, match=r"target_modules must be module names \(non-empty strings\) or one "
                                        r"regular expression; got None in \[None\]"):
        apply_sorsa(tiny_llama, 4, [None], progress=False)


def test_load_adapter_onto_a_meta_device_base_is_one_clear_error(trained):
    _, _, adapter = trained
    meta = empty_model(build_tiny_llama(0).config)
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj of the base model is on the "
                                         r"meta device \(it has no weights\)"):
        load_adapter(meta, adapter)
