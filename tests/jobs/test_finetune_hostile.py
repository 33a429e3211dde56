"""Hostile input to the API half of issue 10: the knob rule table in every entry point,
"already adapted", non-UTF-8 data, the run-folder states, default names, the base
fingerprint and the bitsandbytes noise filter.  No training here (see tests/test_cli_hostile.py)."""
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from sorsa_kernels import SORSACallback, SORSALinear, add_regularizer_grad, apply_sorsa
from sorsa_kernels.training import data as D
from sorsa_kernels.jobs.finetune import FinetuneConfig
from sorsa_kernels.jobs.finetune import config as C
from sorsa_kernels.jobs.finetune import rundir as R
from sorsa_kernels.nn import make_sorsa_linear
from sorsa_kernels.jobs.options import field_rule
from sorsa_kernels.nn.knobs import KNOBS, check_knob

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------- one rule table
@pytest.mark.parametrize("name, value, message", [
    ("alpha", 0.0, "alpha must be a positive finite number, got 0.0"),
    ("alpha", NAN, "alpha must be a positive finite number, got nan"),
    ("alpha", -INF, "alpha must be a positive finite number, got -inf"),
    ("learning_rate", INF, "learning_rate must be a positive finite number, got inf"),
    ("gamma", NAN, "gamma must be a non-negative finite number, got nan"),
    ("gamma", -1e-4, "gamma must be a non-negative finite number, got -0.0001"),
    ("num_train_epochs", NAN, "num_train_epochs must be a positive finite number, got nan"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\), got 1.0"),
    ("warmup_ratio", NAN, r"warmup_ratio must be in \[0, 1\), got nan"),
    ("max_grad_norm", -1.0, "max_grad_norm must be a non-negative finite number"),
    ("per_device_train_batch_size", 0, "per_device_train_batch_size must be a positive integer, got 0"),
    ("max_steps", 0, r"max_steps must be positive \(or -1 for epochs\), got 0"),
])
def test_rule_table_rejects_non_finite_and_out_of_range_values(name, value, message):
    with pytest.raises(ValueError, match=message):
        _check(name, value)


def _check(name, value):
    """The layers' knob of that name, else the rule a ``FinetuneConfig`` field declares."""
    if name in KNOBS:
        return check_knob(name, value)
    field_rule(FinetuneConfig.__dataclass_fields__[name]).check(value, name)


@pytest.mark.parametrize("name, value", [("rank", 2.5), ("rank", True), ("alpha", "1"), ("save_steps", 1.0)])
def test_rule_table_rejects_wrong_types(name, value):
    with pytest.raises(TypeError, match=f"{name} must be"):
        _check(name, value)


def test_rule_table_accepts_boundaries_and_none():
    for name, value in [("gamma", 0.0), ("dropout", 0.0), ("warmup_ratio", 0.0), ("max_steps", -1),
                        ("alpha", 1e-12), ("rank", 1), ("max_grad_norm", 0.0), ("alpha", None)]:
        _check(name, value)
    with pytest.raises(TypeError, match="lr_max must be"):
        check_knob("lr_max", None, required=True)


NUMERIC_FIELDS = sorted(f.name for f in FinetuneConfig.__dataclass_fields__.values()
                        if f.type in ("Optional[int]", "Optional[float]", "int", "float"))


def test_every_numeric_config_field_declares_a_rule():
    fields = FinetuneConfig.__dataclass_fields__
    assert not [n for n in NUMERIC_FIELDS if field_rule(fields[n]) is None]


def test_the_layers_rule_table_holds_only_the_adapters_and_the_regularizers_knobs():
    assert set(KNOBS) == {"rank", "alpha", "dropout", "niter", "oversample", "quant_iters", "gamma", "lr_max"}


@pytest.mark.parametrize("name", NUMERIC_FIELDS)
def test_every_numeric_config_field_is_checked_on_construction_by_its_name(name):
    with pytest.raises(ValueError, match=f"^{name} must be .*, got (float )?nan$"):
        FinetuneConfig(**{name: NAN})


@pytest.mark.parametrize("alpha", [0.0, NAN, INF, -2.0])
def test_from_linear_rejects_bad_alpha_instead_of_making_s_infinite(alpha):
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        SORSALinear.from_linear(nn.Linear(64, 48), 4, alpha=alpha)


def test_from_linear_rejects_nan_dropout():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got nan"):
        SORSALinear.from_linear(nn.Linear(64, 48), 4, dropout=NAN)


def test_nf4_factory_checks_alpha_before_the_svd():
    with pytest.raises(ValueError, match="alpha must be a positive finite number, got 0.0"):
        make_sorsa_linear(nn.Linear(128, 64), 4, alpha=0.0, quantize="nf4")


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0.0), "alpha must be a positive"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(quant_iters=-1, quantize="nf4"), "quant_iters must be a non-negative integer"),
])
def test_apply_sorsa_rejects_bad_knobs_before_touching_the_model(tiny_llama, kwargs, message):
    before = {n: type(m) for n, m in tiny_llama.named_modules()}
    with pytest.raises(ValueError, match=message):
        apply_sorsa(tiny_llama, 4, progress=False, **kwargs)
    assert {n: type(m) for n, m in tiny_llama.named_modules()} == before
    assert all(p.requires_grad for p in tiny_llama.parameters())


@pytest.mark.parametrize("gamma, lr_max, message", [
    (NAN, 1e-3, "gamma must be a non-negative finite number, got nan"),
    (4e-4, INF, "lr_max must be a positive finite number, got inf"),
    (4e-4, 0.0, "lr_max must be a positive finite number, got 0.0"),
])
def test_add_regularizer_grad_rejects_bad_gamma_and_lr_max(tiny_llama, gamma, lr_max, message):
    apply_sorsa(tiny_llama, 4, ["q_proj"], progress=False)
    with pytest.raises(ValueError, match=message):
        add_regularizer_grad(tiny_llama, gamma, lr_max)
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_callback_rejects_bad_gamma_at_construction():
    with pytest.raises(ValueError, match="gamma must be a non-negative finite number, got nan"):
        SORSACallback(gamma=NAN)


# ---------------------------------------------------------------------- surgery
def test_apply_sorsa_twice_says_already_adapted(tiny_llama):
    apply_sorsa(tiny_llama, 4, progress=False)
    with pytest.raises(ValueError, match=r"already adapted: model\.layers\.0\.self_attn\.q_proj is a SORSA layer"):
        apply_sorsa(tiny_llama, 4, progress=False)


def test_apply_sorsa_on_other_modules_of_an_adapted_model_still_works(tiny_llama):
    apply_sorsa(tiny_llama, 4, ["q_proj"], progress=False)
    apply_sorsa(tiny_llama, 4, ["v_proj"], progress=False)
    assert isinstance(tiny_llama.model.layers[0].self_attn.v_proj, SORSALinear)


def test_bad_target_regex_is_a_value_error_naming_it(tiny_llama):
    with pytest.raises(ValueError, match=r"target_modules '\(' is not a valid regular expression"):
        apply_sorsa(tiny_llama, 4, "(", progress=False)


# ---------------------------------------------------------------------- data
def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(D.DataError, match=r"d\.jsonl: line 2 is not UTF-8 text \(byte 0xff"):
        D.load_records(p)


def test_non_utf8_json_names_file_and_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_bytes(b'[{"prompt": "a",\n "response": "\xe9"}]')
    with pytest.raises(D.DataError, match=r"d\.json: line 2 is not UTF-8 text \(byte 0xe9"):
        D.load_records(p)


# ---------------------------------------------------------------------- config checks
@pytest.mark.parametrize("template, message", [
    ("{prompt} {x}", r"unknown placeholder \{x\}"),
    ("{prompt} {", "not a valid format string"),
    ("{prompt} {0}", "not a valid format string"),
])
def test_bad_prompt_template_is_one_value_error(template, message):
    with pytest.raises(ValueError, match=message):
        C.check_prompt_template(template)


def test_missing_model_folder_is_named():
    with pytest.raises(ValueError, match="no such model folder: /no/such/path"):
        C.check_model_path("/no/such/path")
    C.check_model_path("org/name")  # a Hub id is left to the loader


# ---------------------------------------------------------------------- run-folder states
def _complete_checkpoint(folder, step=1):
    ck = folder / "checkpoints" / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{}")
    (ck / R.RUN_FILE).write_text(json.dumps({"settings": R.run_settings(FinetuneConfig().resolved())}))
    return ck


def test_folder_states(tmp_path):
    assert R.inspect_output_dir(tmp_path / "none").kind == "absent"
    (tmp_path / "a" / "checkpoints" / "checkpoint-3").mkdir(parents=True)  # cut off while saving
    (tmp_path / "a" / ".merged.tmp-1-ab12").mkdir()
    assert R.inspect_output_dir(tmp_path / "a").kind == "fresh"
    (tmp_path / "b" / "adapter").mkdir(parents=True)
    assert R.inspect_output_dir(tmp_path / "b").kind == "foreign"  # not a run's: save_adapter's, say
    (tmp_path / "b" / R.LOCK_FILE).write_text("1")  # a run's (it owned the folder)
    assert R.inspect_output_dir(tmp_path / "b").kind == "unfinished"
    _complete_checkpoint(tmp_path / "c")
    assert R.inspect_output_dir(tmp_path / "c").kind == "resumable"
    (tmp_path / "c" / "metrics.json").write_text("{}")
    assert R.inspect_output_dir(tmp_path / "c").kind == "finished"
    (tmp_path / "c" / "notes.txt").write_text("mine")
    state = R.inspect_output_dir(tmp_path / "c")
    assert state.kind == "foreign" and state.foreign == ["notes.txt"]


def test_only_an_empty_checkpoints_folder_does_not_block_a_rerun(tmp_path):
    (tmp_path / "o" / "checkpoints").mkdir(parents=True)
    assert R.check_run_folder(tmp_path / "o", None) is None


def test_rerun_over_a_resumable_folder_gives_advice_that_works(tmp_path):
    ck = _complete_checkpoint(tmp_path / "o", 2)
    with pytest.raises(ValueError, match="checkpoint-2; continue it with --resume-from-checkpoint last"):
        R.check_run_folder(tmp_path / "o", None)
    assert R.check_run_folder(tmp_path / "o", "last") == ck


def test_resume_last_without_a_complete_checkpoint_is_refused(tmp_path):
    (tmp_path / "o" / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    with pytest.raises(ValueError, match="no complete checkpoint under .*checkpoints to resume from"):
        R.check_run_folder(tmp_path / "o", "last")


def test_resume_from_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "bogus").mkdir()
    with pytest.raises(ValueError, match="bogus is not a complete checkpoint"):
        R.check_run_folder(tmp_path / "o", str(tmp_path / "bogus"))


def test_resume_into_another_finished_run_is_refused_but_into_its_own_is_allowed(tmp_path):
    mine = _complete_checkpoint(tmp_path / "a")
    (tmp_path / "a" / "metrics.json").write_text("{}")
    other = _complete_checkpoint(tmp_path / "b")
    with pytest.raises(ValueError, match="holds a finished run; resuming from .* writes only into"):
        R.check_run_folder(tmp_path / "a", str(other))
    assert R.check_run_folder(tmp_path / "a", str(mine)) == mine
    assert R.check_run_folder(tmp_path / "new", str(other)) == other


def test_resume_with_other_settings_names_the_setting(tmp_path):
    ck = _complete_checkpoint(tmp_path / "o")
    with pytest.raises(ValueError, match="trained with --rank 16, this run has --rank 8"):
        R.check_resume_matches(ck, FinetuneConfig(rank=8).resolved())
    R.check_resume_matches(ck, FinetuneConfig().resolved())


def test_resume_onto_another_base_is_refused(tmp_path, tiny_llama):
    ck = tmp_path / "ck"
    ck.mkdir()
    cfg = FinetuneConfig().resolved()
    (ck / R.RUN_FILE).write_text(json.dumps({"settings": R.run_settings(cfg),
                                             "base_fingerprint": R.base_fingerprint(tiny_llama)}))
    R.check_resume_matches(ck, cfg, R.base_fingerprint(tiny_llama))
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight[3, 5] += 1.0
    with pytest.raises(ValueError, match="the base model's weights differ"):
        R.check_resume_matches(ck, cfg, R.base_fingerprint(tiny_llama))


def test_default_output_names_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = {R.claim_default_output_dir("sorsa-output-x") for _ in range(3)}
    assert sorted(map(str, names)) == ["sorsa-output-x", "sorsa-output-x-2", "sorsa-output-x-3"]


def test_cleanup_of_a_failed_run_leaves_nothing_or_a_resumable_checkpoint(tmp_path):
    (tmp_path / "o" / "checkpoints" / "checkpoint-1").mkdir(parents=True)  # incomplete
    R.cleanup_failed_run(tmp_path / "o", created=True)
    assert not (tmp_path / "o").exists()
    ck = _complete_checkpoint(tmp_path / "p", 1)
    (tmp_path / "p" / "checkpoints" / "checkpoint-2").mkdir()
    R.cleanup_failed_run(tmp_path / "p", created=True)
    assert sorted(os.listdir(tmp_path / "p" / "checkpoints")) == ["checkpoint-1"] and ck.is_dir()


# ---------------------------------------------------------------------- bitsandbytes noise
def test_bitsandbytes_kernel_warning_is_dropped(caplog):
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure", "x")
        log.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


def test_importing_the_package_and_cli_does_not_import_bitsandbytes():
    code = ("import sys, sorsa_kernels, sorsa_kernels.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'bitsandbytes'))")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert "gemm_4bit_forward" not in out.stderr
