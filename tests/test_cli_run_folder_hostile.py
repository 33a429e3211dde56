"""Issue 24 on the command line: a run folder owned by one run, cleanup that deletes only what the
run wrote, output-folder problems found before the model loads, knobs bounded by the arithmetic,
records dropped by --max-length counted, and compare keeping the methods that finished.
In-process runs on the embedded model with 2 steps and no pretraining."""
import hashlib
import json
import os
from pathlib import Path

import pytest

from sorsa_kernels import apply_sorsa, save_adapter
from sorsa_kernels.jobs.compare import run as CMP
from sorsa_kernels.jobs.finetune import rundir as R
from sorsa_kernels.jobs.finetune import training as T

from .conftest import build_tiny_llama
from tests.cli_helpers import FAST, one_line_error, run_cli


def _sha1(path):
    return hashlib.sha1(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- 1: cleanup deletes only what the run wrote
def _plain_trainer_checkpoint(out, step=100):
    ck = out / "checkpoints" / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{}")
    (ck / "optimizer.pt").write_bytes(b"adam state")
    return ck


def test_a_plain_trainer_checkpoint_is_refused_before_the_model_loads_and_kept(tmp_path, capsys, no_model_load):
    ck = _plain_trainer_checkpoint(tmp_path / "o")
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", tmp_path / "o", *FAST)
    assert "it holds checkpoints/checkpoint-100 (no sorsa_run.json)" in one_line_error(rc, err)
    assert (ck / "optimizer.pt").read_bytes() == b"adam state"


def test_a_failed_run_keeps_the_checkpoints_that_were_there_before_it(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    old = out / "checkpoints" / "checkpoint-7"  # an earlier run's cut-off checkpoint, in a folder a run owned
    old.mkdir(parents=True)
    (old / "optimizer.pt").write_bytes(b"partial")
    (out / R.LOCK_FILE).write_text("1")

    def diverge(model, losses, step):
        raise ValueError(f"training diverged: the loss is nan at step {step}; nothing was saved")

    monkeypatch.setattr(T, "_check_finite", diverge)
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", out, "--save-steps", "1", *FAST)
    assert "training diverged" in one_line_error(rc, err)
    assert (old / "optimizer.pt").read_bytes() == b"partial"
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-1", "checkpoint-2", "checkpoint-7"]


def test_cleanup_removes_only_checkpoints_created_after_the_snapshot(tmp_path):
    out = tmp_path / "o"
    (out / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-3" / "optimizer.pt").write_bytes(b"x")
    existing = R.checkpoint_names(out)
    (out / "checkpoints" / "checkpoint-4").mkdir()
    R.cleanup_failed_run(out, created=False, existing=existing)
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-3"]


# ---------------------------------------------------------------------- 2: one run per folder
def test_a_second_run_into_a_folder_in_use_is_refused_in_one_line(tmp_path, capsys, no_model_load):
    lock = R.claim_run_folder(tmp_path / "o")  # run A, still running
    try:
        rc, _, err = run_cli(capsys, "finetune", "--output-dir", tmp_path / "o", *FAST)
        assert f"output folder {tmp_path / 'o'} is in use by another run (pid {os.getpid()})" in \
            one_line_error(rc, err)
        assert os.listdir(tmp_path / "o") == [R.LOCK_FILE]  # run B wrote nothing
    finally:
        lock.release()


def test_the_lock_is_free_again_after_a_run_and_the_folder_holds_only_its_artifacts(tmp_path, capsys):
    assert run_cli(capsys, "finetune", "--output-dir", tmp_path / "o", *FAST)[0] == 0
    assert sorted(os.listdir(tmp_path / "o")) == ["adapter", "base", "merged", "metrics.json"]
    R.claim_run_folder(tmp_path / "o").release()


# ---------------------------------------------------------------------- 3: run-named entries of someone else
def test_a_folder_holding_a_save_adapter_output_is_not_overwritten(tmp_path, capsys, no_model_load):
    out = tmp_path / "o"
    save_adapter(apply_sorsa(build_tiny_llama(), 2, ["q_proj"], progress=False), out / "adapter")
    before = _sha1(out / "adapter" / "adapter.safetensors")
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", out, *FAST)
    assert "it holds adapter/ (not written by a run)" in one_line_error(rc, err)
    assert _sha1(out / "adapter" / "adapter.safetensors") == before


# ---------------------------------------------------------------------- 13: bad run entries found before loading
@pytest.mark.parametrize("entry, make, problem", [
    ("adapter", lambda p, t: p.symlink_to(t, target_is_directory=True), "adapter is a symbolic link"),
    ("merged", lambda p, t: p.write_text("x"), "merged is not a folder"),
    ("metrics.json", lambda p, t: p.mkdir(), "metrics.json is not a regular file"),
])
def test_a_symlinked_or_file_typed_run_entry_is_refused_before_the_model_loads(tmp_path, capsys, no_model_load,
                                                                              entry, make, problem):
    out = tmp_path / "o"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    make(out / entry, tmp_path / "elsewhere")
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", out, *FAST)
    assert problem in one_line_error(rc, err)
    assert os.listdir(tmp_path / "elsewhere") == []


# ---------------------------------------------------------------------- 5, 7: knobs bounded by the arithmetic
@pytest.mark.parametrize("flags, message", [
    (("--gamma", "1e30"), "gamma 1e+30 with learning rate 0.003 scales the regularizer gradient"),
    (("--alpha", "1e300"), "alpha 1e+300 gives scale alpha/rank = 6.25e+298, which float32 cannot hold"),
    (("--alpha", "1e-38"), "alpha 1e-38 gives scale alpha/rank = 6.25e-40, which float32 cannot hold"),
])
def test_gamma_and_alpha_the_arithmetic_cannot_hold_are_refused_before_the_model_loads(
        tmp_path, capsys, no_model_load, flags, message):
    rc, _, err = run_cli(capsys, "finetune", "--output-dir", tmp_path / "o", *FAST, *flags)
    assert message in one_line_error(rc, err)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- 6: records dropped by --max-length
def _data(path, n_long, n_short):
    rows = [{"prompt": "x" * 200, "response": "1"}] * n_long + [{"prompt": "1+1?", "response": "2"}] * n_short
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_run_that_would_drop_most_of_its_data_stops_with_advice(tmp_path, capsys):
    data = _data(tmp_path / "d.jsonl", 90, 10)
    rc, _, err = run_cli(capsys, "finetune", "--data", data, "--eval-fraction", "0", "--max-length", "64",
                      "--output-dir", tmp_path / "o", *FAST)
    line = one_line_error(rc, err)
    assert "90 of 100 training examples would be dropped: their prompt fills --max-length 64" in line
    assert "raise --max-length (the longest training example is" in line
    assert not (tmp_path / "o").exists()


def test_dropped_and_truncated_records_are_counted_and_reported(tmp_path, capsys):
    data = _data(tmp_path / "d.jsonl", 3, 17)
    rc, out, err = run_cli(capsys, "finetune", "--data", data, "--eval-fraction", "0", "--max-length", "64",
                        "--output-dir", tmp_path / "o", *FAST)
    assert rc == 0, err
    assert "training data: 3 of 20 examples dropped (prompt fills --max-length 64), 0 truncated" in out
    counts = json.loads((tmp_path / "o" / "metrics.json").read_text())["data"]["training"]
    assert counts["records"] == 20 and counts["kept"] == 17 and counts["dropped"] == 3


# ---------------------------------------------------------------------- 17: a lone surrogate in the data
def test_a_lone_surrogate_in_a_record_names_file_record_and_field(tmp_path, capsys, no_model_load):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "ok", "response": "1"}\n{"prompt": "a\\ud800b", "response": "2"}\n')
    rc, _, err = run_cli(capsys, "finetune", "--data", data, "--output-dir", tmp_path / "o", *FAST)
    assert "d.jsonl: record 1 field 'prompt' holds a lone surrogate '\\ud800' at character 1" in \
        one_line_error(rc, err)


# ---------------------------------------------------------------------- 15, 16: compare
TINY = ("--max-steps", "2", "--record-every", "1", "--pretrain-steps", "0", "--eval-samples", "2", "--rank", "2",
        "--quiet", "--no-plots")


def test_compare_keeps_the_finished_methods_and_names_the_one_that_diverged(tmp_path, capsys, monkeypatch):
    import torch

    real = CMP.prepare

    def poison_lora(method, model, cfg, targets, *rest):
        model = real(method, model, cfg, targets, *rest)
        if method == "lora":
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))
        return model

    monkeypatch.setattr(CMP, "prepare", poison_lora)
    out = tmp_path / "cmp"
    rc, stdout, err = run_cli(capsys, "compare", *TINY, "--methods", "sorsa", "lora", "--output-dir", out)
    line = one_line_error(rc, err)
    assert "compare: method lora failed at step" in line and str(out / "compare.json") in line
    report = json.loads((out / "compare.json").read_text())
    assert list(report["methods"]) == ["sorsa"] and "lora" in report["failed"]
    assert any(l.startswith("SORSA") for l in stdout.splitlines())


@pytest.mark.parametrize("spec", [[".+q_proj"], ["model.layers.0.self_attn.q_proj", "v_proj"]])
def test_compare_reads_target_modules_as_finetune_does(tmp_path, monkeypatch, spec):
    from sorsa_kernels.jobs.finetune import FinetuneConfig
    from sorsa_kernels.jobs.finetune.config import target_spec

    seen = []

    def stop(model, rank, targets, **_):
        seen.append(targets)
        raise KeyboardInterrupt  # enough: the targets are what this test is about

    monkeypatch.setattr(CMP, "plan_sorsa", stop)
    cfg = FinetuneConfig(target_modules=spec, pretrain_steps=0, progress=False, output_dir=str(tmp_path / "c"))
    with pytest.raises(KeyboardInterrupt):
        CMP.run_compare(CMP.CompareConfig(cfg, methods=("sorsa",)))
    assert seen == [target_spec(cfg.resolved())]


@pytest.mark.skipif(not Path("/proc/self/mounts").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize("folder, fs", [("/proc/x", "proc"), ("/sys/x", "sysfs")])
def test_output_dir_on_a_kernel_file_system_names_the_folder_and_what_is_wrong(folder, fs, capsys, no_model_load):
    rc, _, err = run_cli(capsys, "finetune", *FAST, "--output-dir", folder)
    line = one_line_error(rc, err)
    assert line.startswith(f"sorsa-kernels: error: output folder {folder} cannot be created: ")
    assert f"is on {fs}, a virtual file system of the kernel" in line


def test_output_folder_that_cannot_be_created_names_it_and_the_reason(tmp_path, monkeypatch):
    from sorsa_kernels.jobs.finetune import rundir

    def refuse(self, *a, **k):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(ValueError, match=r"^output folder .*/x cannot be created: Operation not permitted$"):
        rundir.claim_run_folder(tmp_path / "x")
