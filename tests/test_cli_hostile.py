"""Hostile use of ``sorsa-kernels`` (issue 10): bad knobs caught before the model loads,
interrupted / diverged / full-disk runs that leave nothing or a resumable checkpoint, refused
resumes, and one-line errors.  Runs are in-process on the embedded model with 2 steps and no
pretraining; only the kill test starts a subprocess, because killing is its point."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sorsa_kernels.cli import main
from sorsa_kernels.jobs.finetune import rundir as R
from sorsa_kernels.training.callbacks import SORSACallback
from tests.cli_helpers import FAST, one_line_error, run_cli


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main(["finetune", "--output-dir", str(out), "--save-steps", "1", *FAST]) == 0
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _hidden(folder):
    """Hidden leftovers (temporaries); the run's lock file, which marks an unfinished run's artifacts, is not one."""
    return [n for n in os.listdir(folder) if n.startswith(".") and n != R.LOCK_FILE]


# ---------------------------------------------------------------------- knobs, before the model loads
@pytest.mark.parametrize("flag, value, message", [
    ("--alpha", "0", "alpha must be a positive finite number, got 0.0"),
    ("--alpha", "nan", "alpha must be a positive finite number, got nan"),
    ("--lr", "inf", "learning-rate must be a positive finite number, got inf"),
    ("--lr", "nan", "learning-rate must be a positive finite number, got nan"),
    ("--gamma", "nan", "gamma must be a non-negative finite number, got nan"),
    ("--epochs", "nan", "epochs must be a positive finite number, got nan"),
    ("--warmup-ratio", "nan", r"warmup-ratio must be in [0, 1), got nan"),
    ("--max-grad-norm", "-1", "max-grad-norm must be a non-negative finite number"),
    ("--weight-decay", "inf", "weight-decay must be a non-negative finite number, got inf"),
    ("--batch-size", "0", "batch-size must be a positive integer, got 0"),
])
def test_bad_knob_is_one_line_before_the_model_loads(flag, value, message, tmp_path, capsys, no_model_load):
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", tmp_path / "o", *FAST, flag, value)
    assert message in one_line_error(rc, err)
    assert not no_model_load and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (("--target-modules", "("), "--target-modules '(' is not a valid regular expression: missing )"),
    (("--prompt-template", "{prompt} {x}"), "prompt template '{prompt} {x}' has the unknown placeholder {x}"),
    (("--model", "/no/such/path", "--data", "x.jsonl"), "no such model folder: /no/such/path"),
])
def test_bad_regex_template_or_model_path_is_one_line(args, message, tmp_path, capsys, no_model_load):
    rc, _, err = run_cli(capsys, "finetune", *args, "--output-dir", tmp_path / "o", *FAST)
    assert message in one_line_error(rc, err)
    assert not no_model_load and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (("--scheduler", "zigzag"), "scheduler must be one of 'linear', 'cosine', "),
    (("--lr", "-1"), "learning-rate must be a positive"),
    (("--rank", "0"), "rank must be a positive"),
    (("--warmup-ratio", "1.5"), "warmup-ratio must be in [0, 1)"),
    (("--max-steps", "0"), "max-steps must be positive"),
    (("--model", "some/model"), "--model some/model needs --data FILE"),
    (("--eval-data", "x.jsonl"), "--eval-data needs --data (the embedded data set brings its own held-out split)"),
    (("--prompt-template", "no placeholder"), "must contain {prompt}"),
    (("--model", "org/some-model", "--data", "d.jsonl", "--fsdp", "--quantize", "nf4"),
     "--fsdp --quantize nf4 streams the checkpoint from a local folder; download org/some-model first"),
])
def test_config_errors_name_the_flags_on_the_command_line(args, message, tmp_path, capsys, no_model_load):
    """The config names its fields (tests/jobs/test_finetune.py); the CLI shows flags."""
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", tmp_path / "o", *FAST, *args)
    assert message in one_line_error(rc, err)
    assert not no_model_load and not (tmp_path / "o").exists()


def test_unknown_dtype_is_refused_by_the_parser_listing_the_names(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--residual-dtype", "int8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'int8' (choose from 'float32', 'fp32', 'bfloat16', 'bf16'" in err


def test_non_utf8_data_names_file_and_line(tmp_path, capsys, no_model_load):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    rc, _, err = run_cli(capsys, "finetune", "--data", data, "--output-dir", tmp_path / "o", *FAST)
    assert f"{data}: line 2 is not UTF-8 text" in one_line_error(rc, err)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="alpha must be a positive"):
        main(["finetune", "--alpha", "0", "--output-dir", str(tmp_path / "o"), "--debug", *FAST])


# ---------------------------------------------------------------------- failed runs do not block a rerun
def _interrupt_at(monkeypatch, step):
    real = SORSACallback.on_pre_optimizer_step

    def hook(self, args, state, control, **kwargs):
        if state.global_step == step:
            raise KeyboardInterrupt
        return real(self, args, state, control, **kwargs)

    monkeypatch.setattr(SORSACallback, "on_pre_optimizer_step", hook)


def test_interrupted_run_leaves_nothing_and_the_same_command_reruns(tmp_path, capsys, monkeypatch):
    argv = ("finetune", "--output-dir", tmp_path / "o", *FAST)
    _interrupt_at(monkeypatch, 1)
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()
    assert run_cli(capsys, *argv)[0] == 0
    assert (tmp_path / "o" / "metrics.json").is_file()


def test_interrupted_run_with_a_checkpoint_resumes_with_the_advice_given(tmp_path, capsys, monkeypatch):
    argv = ("finetune", "--output-dir", tmp_path / "o", "--save-steps", "1", *FAST)
    _interrupt_at(monkeypatch, 1)  # after checkpoint-1 is saved
    assert run_cli(capsys, *argv)[0] == 130
    assert os.listdir(tmp_path / "o" / "checkpoints") == ["checkpoint-1"]
    monkeypatch.undo()
    rc, _, err = run_cli(capsys, *argv)
    assert "continue it with --resume-from-checkpoint last" in one_line_error(rc, err)
    assert run_cli(capsys, *argv, "--resume-from-checkpoint", "last")[0] == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert max(s for s, _ in m["train_losses"]) == 2


def test_diverged_run_saves_nothing_and_says_so(tmp_path, capsys, monkeypatch):
    real = SORSACallback.on_pre_optimizer_step

    def poison(self, args, state, control, model=None, **kwargs):
        out = real(self, args, state, control, model=model, **kwargs)
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.U.fill_(float("nan"))
        return out

    monkeypatch.setattr(SORSACallback, "on_pre_optimizer_step", poison)
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", tmp_path / "o", *FAST)
    assert "training diverged: model.layers.0.self_attn.q_proj.U holds NaN/Inf after step" in one_line_error(rc, err)
    assert not (tmp_path / "o").exists()


def test_bogus_resume_folder_is_one_line_and_writes_nothing(tmp_path, capsys, no_model_load):
    (tmp_path / "bogus").mkdir()
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", tmp_path / "o", "--resume-from-checkpoint",
                      tmp_path / "bogus", *FAST)
    assert "bogus is not a complete checkpoint (no trainer_state.json)" in one_line_error(rc, err)
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", tmp_path / "o", "--resume-from-checkpoint", "last", *FAST)
    assert "no complete checkpoint under" in one_line_error(rc, err)
    assert not (tmp_path / "o").exists()


def _full_disk_in(monkeypatch, artifact):
    """Make the write of ``artifact`` (base, merged or metrics.json) fail with ENOSPC part-way."""
    from transformers import PreTrainedModel

    def hit(path):
        return Path(path).name.startswith(f".{artifact}.tmp-")

    real_save = PreTrainedModel.save_pretrained

    def save(self, directory, *a, **k):
        if hit(directory):
            (Path(directory) / "config.json").write_text("{}")  # a first file made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, directory, *a, **k)

    real_write = Path.write_text

    def write_text(self, *a, **k):
        if hit(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, *a, **k)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)
    monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("artifact", ["base", "merged", "metrics.json"])
def test_full_disk_while_saving_is_one_line_and_leaves_whole_artifacts(artifact, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from sorsa_kernels import load_adapter

    out = tmp_path / "o"
    _full_disk_in(monkeypatch, artifact)
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", out, *FAST)
    line = one_line_error(rc, err)
    assert f"cannot write {out / artifact}: No space left on device" in line
    assert not (out / artifact).exists() and _hidden(out) == []
    earlier = {"base": ["adapter"], "merged": ["adapter", "base"], "metrics.json": ["adapter", "base", "merged"]}
    assert sorted(os.listdir(out)) == [R.LOCK_FILE] + earlier[artifact]  # the lock marks them as a run's
    if "base" in earlier[artifact]:
        load_adapter(AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter")
    monkeypatch.undo()
    if artifact == "merged":  # an unfinished folder does not block the same command
        assert run_cli(capsys, "finetune", "--output-dir", out, *FAST)[0] == 0
        assert (out / "metrics.json").is_file()


def test_full_disk_while_resuming_keeps_the_published_merged_model(finished, tmp_path, capsys, monkeypatch):
    out = _copy(finished, tmp_path / "o")
    before = (out / "merged" / "model.safetensors").read_bytes()
    _full_disk_in(monkeypatch, "merged")
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", out, "--resume-from-checkpoint", "last", *FAST)
    assert "No space left on device" in one_line_error(rc, err)
    assert (out / "merged" / "model.safetensors").read_bytes() == before
    assert R.inspect_output_dir(out).kind == "resumable"  # not "finished" with a mix of old and new


def test_kill_while_writing_merged_leaves_the_previous_merged_loadable(finished, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _copy(finished, tmp_path / "o")
    before = (out / "merged" / "model.safetensors").read_bytes()
    ready = tmp_path / "ready"
    child = (
        "import pathlib, sys, time, transformers\n"
        "from sorsa_kernels.cli import main\n"
        "real = transformers.PreTrainedModel.save_pretrained\n"
        "def save(self, d, *a, **k):\n"
        "    real(self, d, *a, **k)\n"
        "    if pathlib.Path(d).name.startswith('.merged.tmp-'):\n"
        "        pathlib.Path(sys.argv[2]).write_text('ready')\n"
        "        time.sleep(600)\n"
        "transformers.PreTrainedModel.save_pretrained = save\n"
        f"main(['finetune', '--output-dir', sys.argv[1], '--resume-from-checkpoint', 'last', *{FAST!r}])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", child, str(out), str(ready)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "child never reached the merged save"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert (out / "merged" / "model.safetensors").read_bytes() == before
    AutoModelForCausalLM.from_pretrained(out / "merged")  # still loads
    assert any(n.startswith(".merged.tmp-") for n in _hidden(out))  # the killed writer's temporary
    assert R.inspect_output_dir(out).kind == "resumable"
    assert main(["finetune", "--output-dir", str(out), "--resume-from-checkpoint", "last", *FAST]) == 0
    assert _hidden(out) == [] and (out / "metrics.json").is_file()


# ---------------------------------------------------------------------- resume refusals
def test_rerun_or_foreign_resume_into_a_finished_run_is_refused(finished, tmp_path, capsys, no_model_load):
    a, b = _copy(finished, tmp_path / "a"), _copy(finished, tmp_path / "b")
    metrics = (a / "metrics.json").read_bytes()
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", a, "--save-steps", "1", *FAST)
    assert "holds a finished run (metrics.json)" in one_line_error(rc, err)
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", a, "--resume-from-checkpoint",
                      b / "checkpoints" / "checkpoint-1", *FAST)
    assert "holds a finished run; resuming from" in one_line_error(rc, err)
    assert (a / "metrics.json").read_bytes() == metrics


def test_resume_with_another_rank_is_refused_before_the_model_loads(finished, tmp_path, capsys, no_model_load):
    out = _copy(finished, tmp_path / "o")
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", out, "--resume-from-checkpoint", "last", "--rank", "8", *FAST)
    assert "it was trained with --rank 16, this run has --rank 8" in one_line_error(rc, err)


def test_resume_onto_another_base_is_refused(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "o")
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", out, "--resume-from-checkpoint", "last",
                      *FAST, "--pretrain-steps", "1")
    assert "the base model's weights differ from those it was trained on" in one_line_error(rc, err)
    assert R.inspect_output_dir(out).kind == "finished"


def test_two_runs_in_the_same_second_get_different_default_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(R.time, "strftime", lambda fmt: "sorsa-output-same")
    for _ in range(2):
        assert run_cli(capsys, "finetune", *FAST)[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["sorsa-output-same", "sorsa-output-same-2"]
    for name in os.listdir(tmp_path):
        assert (tmp_path / name / "adapter" / "adapter.safetensors").is_file()


# ---------------------------------------------------------------------- merge / export-lora / corrupt base
def test_full_disk_in_merge_leaves_no_folder(finished, tmp_path, capsys, monkeypatch):
    _full_disk_in(monkeypatch, "m")
    rc, _, err = run_cli(capsys, "merge", "--base", finished / "base", "--adapter", finished / "adapter",
                      "--output", tmp_path / "m")
    assert f"cannot write {tmp_path / 'm'}: No space left on device" in one_line_error(rc, err)
    assert os.listdir(tmp_path) == []


def test_full_disk_in_export_lora_leaves_no_folder(finished, tmp_path, capsys, monkeypatch):
    from sorsa_kernels.adapters import peft_export

    def export(model, directory):
        (Path(directory) / "adapter_config.json").write_text("{}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(peft_export, "export_peft_lora", export)
    rc, _, err = run_cli(capsys, "export-lora", "--base", finished / "base", "--adapter", finished / "adapter",
                      "--output", tmp_path / "lora")
    assert "No space left on device" in one_line_error(rc, err)
    assert os.listdir(tmp_path) == []


def test_truncated_base_weights_are_one_line(finished, tmp_path, capsys):
    base = _copy(finished / "base", tmp_path / "base")
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rc, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", finished / "adapter", "--output", tmp_path / "m")
    assert f"cannot load model '{base}'" in one_line_error(rc, err)
    assert not (tmp_path / "m").exists()
