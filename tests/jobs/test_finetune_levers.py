"""Issue 28 item 3: each memory lever trains the embedded model to a held-out loss within 5 % of the
fp32-AdamW run, through ``finetune``'s options (the same fields are ``compare``'s flags)."""
from __future__ import annotations

import copy
import re

import pytest

import sorsa_kernels.jobs.finetune as F
from sorsa_kernels.jobs.finetune import model as finetune_model
from sorsa_kernels.jobs.options import ConfigError

# Few steps, but enough that the held-out loss falls by more than half (2.9 → ~1.3), so "within
# 5 %" compares two runs that learned, not two that stood still.
RUN = dict(pretrain_steps=100, max_steps=24, per_device_train_batch_size=8, logging_steps=24, eval_samples=0,
           progress=False)


@pytest.fixture(scope="module")
def cached_base():
    """The embedded base, pretrained once for the module (every run starts from a copy)."""
    built = {}
    real = finetune_model.build_embedded

    def build(pretrain_steps, seed=0, progress=True, **_):  # cache=: this fixture is the cache
        key = (pretrain_steps, seed)
        if key not in built:
            built[key] = real(pretrain_steps=pretrain_steps, seed=seed, progress=False)
        model, tokenizer = built[key]
        return copy.deepcopy(model), tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune_model, "build_embedded", build)
        yield


def _run(tmp_path_factory, **lever):
    out = tmp_path_factory.mktemp("lever") / "run"
    return F.run_finetune(F.FinetuneConfig(output_dir=str(out), **{**RUN, **lever}))


@pytest.fixture(scope="module")
def baseline(cached_base, tmp_path_factory):
    result = _run(tmp_path_factory)
    assert result.after["loss"] < 0.6 * result.before["loss"]
    return result.after["loss"]


@pytest.mark.parametrize("lever", [dict(optim="adamw8bit"), dict(gradient_release=True), dict(loss_chunk_size=7),
                                   dict(adapter_dtype="bfloat16")],
                         ids=["adamw8bit", "gradient-release", "loss-chunk-size-7", "adapter-dtype-bfloat16"])
def test_each_lever_trains_the_embedded_model_within_5_percent_of_fp32_adamw(baseline, tmp_path_factory, lever):
    result = _run(tmp_path_factory, **lever)
    assert result.after["loss"] < 0.6 * result.before["loss"]
    assert result.after["loss"] == pytest.approx(baseline, rel=0.05)


def test_gradient_release_sets_accumulation_to_one_for_a_real_model():
    cfg = F.FinetuneConfig(model="meta-llama/Llama-2-7b-hf", data="train.jsonl", gradient_release=True)
    assert cfg.resolved().gradient_accumulation_steps == 1  # the paper's default is 16


def test_gradient_release_with_accumulation_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^gradient_release steps every backward: it cannot accumulate gradients; "
                                          r"drop gradient_accumulation_steps=4$"):
        F.FinetuneConfig(gradient_release=True, gradient_accumulation_steps=4)


def test_gradient_release_with_fsdp_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^gradient_release cannot run with fsdp: its hooks see unsharded"):
        F.FinetuneConfig(gradient_release=True, fsdp=True)


@pytest.mark.parametrize("changes, message", [
    (dict(optim="sgd"), "optim must be one of 'adamw', 'adamw8bit', 'paged_adamw8bit', got 'sgd'"),
    (dict(loss_chunk_size=-1), "loss_chunk_size must be a non-negative integer"),
])
def test_bad_lever_settings_are_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        F.FinetuneConfig(**changes)


def test_gradient_release_prints_its_one_line(cached_base, tmp_path_factory, capsys):
    _run(tmp_path_factory, gradient_release=True, max_steps=1, evaluate=False)
    out = capsys.readouterr().out
    assert "gradient accumulation is 1 and clipping is per parameter" in out
    norms = re.findall(r"grad-norm (\S+)", out)  # the hooks' global norm, not the Trainer's 0
    assert norms and all(float(n) > 0 for n in norms), out


def test_compare_trains_every_method_with_the_levers(tmp_path, monkeypatch):
    import math

    from sorsa_kernels.jobs.compare.run import CompareConfig, run_compare
    from sorsa_kernels.training import loss, optim

    calls = {"optimizers": [], "chunked": 0}
    make, chunked = optim.optimizer_for_params, loss.chunked_causal_lm_loss

    def spy_make(params, name, *a, **k):
        calls["optimizers"].append(name)
        return make(params, name, *a, **k)

    def spy_chunked(*a, **k):
        calls["chunked"] += 1
        return chunked(*a, **k)

    monkeypatch.setattr(optim, "optimizer_for_params", spy_make)
    monkeypatch.setattr(loss, "chunked_causal_lm_loss", spy_chunked)
    small = dict(max_steps=2, pretrain_steps=5, eval_samples=4, rank=4, progress=False)
    result = run_compare(CompareConfig(
        F.FinetuneConfig(output_dir=str(tmp_path / "cmp"), optim="adamw8bit", gradient_release=True,
                         loss_chunk_size=5, **small), methods=("sorsa", "lora"), record_every=1, plots=False))
    for method in ("sorsa", "lora"):
        assert all(math.isfinite(r["train_loss"]) for r in result.report["methods"][method]["records"]
                   if r.get("train_loss") is not None)
    assert calls["optimizers"] and set(calls["optimizers"]) == {"adamw8bit"}
    assert calls["chunked"] >= 4  # two methods × two steps


def test_finetune_optimizer_for_bf16_adapters_keeps_steps_below_half_an_ulp(tmp_path):
    import torch
    from torch import nn

    from sorsa_kernels.jobs.finetune.training import optimizer_spec, training_arguments
    from sorsa_kernels.nn.linear import SORSALinear

    cfg = F.FinetuneConfig(adapter_dtype="bfloat16").resolved()
    args = training_arguments(cfg, tmp_path, has_eval=False)
    factory, kwargs = optimizer_spec(cfg, args)
    layer = SORSALinear.from_linear(nn.Linear(64, 64), 8, adapter_dtype=torch.bfloat16)
    with torch.no_grad():
        layer.S.fill_(5.0)  # a bf16 ulp is 2⁻⁵ here: an AdamW step of lr = 3e-3 is a tenth of it
    opt = factory()(layer, **kwargs)
    for _ in range(10):
        for p in (layer.U, layer.S, layer.V):
            p.grad = torch.ones_like(p)
        opt.step()
    assert layer.S.dtype == torch.bfloat16
    assert layer.S.float().mean().item() == pytest.approx(5.0 - 10 * args.learning_rate, abs=0.01)


@pytest.mark.parametrize("lever", [dict(gradient_release=True, optim="adamw8bit"), dict(adapter_dtype="bfloat16"),
                                   dict(adapter_dtype="bfloat16", optim="adamw8bit")],
                         ids=["release-8bit", "bf16", "bf16-8bit"])
def test_a_run_with_levers_resumes_from_its_checkpoint_with_the_same_losses(cached_base, tmp_path, lever):
    fast = dict(pretrain_steps=20, max_steps=4, logging_steps=1, per_device_train_batch_size=4, evaluate=False,
                progress=False, **lever)
    full = F.run_finetune(F.FinetuneConfig(output_dir=str(tmp_path / "a"), save_steps=2, **fast))
    ckpt = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    resumed = F.run_finetune(F.FinetuneConfig(output_dir=str(tmp_path / "a"), resume_from_checkpoint=str(ckpt),
                                              **fast))
    tail = dict(full.train_losses)
    assert [s for s, _ in resumed.train_losses if s > 2] == [3, 4]
    for step, loss in resumed.train_losses:
        if step > 2:
            assert loss == pytest.approx(tail[step], rel=1e-5, abs=1e-6)
