"""What ``sorsa-kernels`` prints and where it writes, as a person and a log file see it.

One tiny run (no pretraining, 2 steps, no evaluation) is shared: its captured output is what
a redirected run writes (not a terminal, so no bars), and its folder feeds analyze/export-lora.
"""
import contextlib
import io
import json
from pathlib import Path

import pytest

from sorsa_kernels.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["finetune", "--pretrain-steps", "0", "--max-steps", "2", "--logging-steps", "1", "--no-eval",
                   "--output-dir", str(out)])
    assert rc == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


def test_redirected_run_has_no_bars_and_one_plain_line_per_logging_step(tiny_run):
    _, stdout, stderr = tiny_run
    assert "\r" not in stdout + stderr
    steps = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/2", "2/2"]
    assert "loss " in steps[-1] and "orthonormality " in steps[-1]
    assert "{'" not in stdout  # not the Trainer's dicts of strings


def test_no_eval_prints_no_empty_before_after_table(tiny_run):
    _, stdout, _ = tiny_run
    assert "before" not in stdout and "after" not in stdout


def test_finetune_ends_with_a_next_step_that_runs(tiny_run, capsys, monkeypatch):
    out, stdout, _ = tiny_run
    hint = stdout.strip().splitlines()[-1]
    assert hint == f"next: sorsa-kernels analyze --base {out / 'base'} --adapter {out / 'adapter'}"
    monkeypatch.chdir(out.parent)
    assert main(hint.split()[2:]) == 0
    assert f"plot: {out / 'singular_drift.png'}" in capsys.readouterr().out


def test_analyze_writes_its_png_next_to_the_adapter_not_in_the_working_folder(tiny_run, tmp_path, monkeypatch,
                                                                               capsys):
    out, _, _ = tiny_run
    monkeypatch.chdir(tmp_path)
    (out / "singular_drift.png").unlink(missing_ok=True)
    assert main(["analyze", "--base", str(out / "base"), "--adapter", str(out / "adapter")]) == 0
    assert (out / "singular_drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.iterdir()) == []


def test_export_lora_records_the_local_base_as_an_absolute_path(tiny_run, tmp_path, monkeypatch, capsys):
    out, _, _ = tiny_run
    monkeypatch.chdir(out)
    assert main(["export-lora", "--base", "base", "--adapter", "adapter", "--output", str(tmp_path / "lora")]) == 0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    assert Path(config["base_model_name_or_path"]).is_absolute()


def test_sorsa_init_bar_counts_every_layer_the_summary_counts_on_tiny_mixtral(monkeypatch):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    import sorsa_kernels as sk
    from sorsa_kernels.adapters import plan as surgery  # the surgery plan draws the bar

    totals = []
    real = surgery.tqdm
    monkeypatch.setattr(surgery, "tqdm", lambda *a, **k: totals.append(k.get("total")) or real(*a, **k))
    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2))
    sk.apply_sorsa(moe, rank=4, progress=False)
    assert totals == [12] and sk.adaptation_summary(moe).line().startswith("SORSA: 12 layers adapted")


def test_finetune_with_bars_draws_no_writing_model_shards_bar_but_one_saving_line(tmp_path, capsys):
    from sorsa_kernels.jobs.finetune import FinetuneConfig, run_finetune

    run_finetune(FinetuneConfig(output_dir=str(tmp_path / "run"), pretrain_steps=2, max_steps=1,
                                per_device_train_batch_size=2, evaluate=False, progress=True))
    out, err = capsys.readouterr()
    assert "Writing model shards" not in err
    assert out.count("saving the adapter and the merged model to") == 1
