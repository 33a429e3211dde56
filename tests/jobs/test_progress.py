"""What a run prints: one compact line of numbers per logging step, and no bar where none is wanted."""
from types import SimpleNamespace

from transformers.utils import logging as hf_logging

from sorsa_kernels.jobs.progress import LogLines, library_bars, log_line


def test_log_line_prints_the_trainers_numbers_as_numbers_in_one_line():
    line = log_line({"loss": 1.63812, "grad_norm": 3.1894, "learning_rate": 0.0029681, "epoch": 0.6579,
                     "orthonormality": 0.21753}, 25, 250)
    assert line == "step  25/250  loss 1.6381  grad-norm 3.19  lr 2.97e-03  orthonormality 0.218  epoch 0.66"


def test_log_line_names_held_out_loss_and_drops_timings():
    line = log_line({"eval_loss": 0.93, "eval_runtime": 1.2, "eval_samples_per_second": 80.0, "epoch": 1.0}, 50, 250)
    assert line == "step  50/250  held-out loss 0.9300  epoch 1.00"


def test_log_line_skips_the_end_of_training_summary():
    assert log_line({"train_runtime": 48.4, "train_loss": 0.89, "epoch": 6.6}, 250, 250) is None


def test_log_lines_without_bars_prints_plain_lines_while_training_only(capsys):
    cb = LogLines(bars=False)
    state = SimpleNamespace(is_world_process_zero=True, max_steps=4, global_step=0)
    cb.on_log(None, state, None, logs={"heldout_loss": 2.0})  # an evaluation before training: not printed
    cb.on_train_begin(None, state, None)
    state.global_step = 2
    cb.on_step_end(None, state, None)
    cb.on_log(None, state, None, logs={"loss": 1.5, "epoch": 0.5})
    cb.on_train_end(None, state, None)
    out, err = capsys.readouterr()
    assert out == "step 2/4  loss 1.5000  epoch 0.50\n"
    assert err == ""  # no bar drawn, not even an empty one


def test_library_bars_off_silences_transformers_bars_and_restores_them():
    assert hf_logging.is_progress_bar_enabled()
    with library_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()


def test_finetune_without_bars_prints_one_plain_line_per_phase(capsys, tmp_path):
    from tests.cli_helpers import run_cli

    rc, out, err = run_cli(capsys, "finetune", "--pretrain-steps", "2", "--max-steps", "1", "--batch-size", "2",
                           "--eval-samples", "2", "--quiet", "--output-dir", tmp_path / "run")
    assert rc == 0, err
    phases = ["pretraining the embedded model: 2 steps", "pretraining finished in", "SORSA init: rank 16, full SVD",
              "SORSA init finished in", "evaluation before fine-tuning: held-out loss on",
              "evaluation after fine-tuning: held-out loss on", "saving the adapter and the merged model to"]
    lines = out.splitlines()
    at = [next((i for i, line in enumerate(lines) if line.startswith(p)), None) for p in phases]
    assert None not in at and at == sorted(at), out


def test_phase_line_is_silent_when_a_bar_shows_the_phase(capsys):
    from sorsa_kernels.jobs.progress import phase_line

    phase_line("SORSA init", bars=True)
    phase_line("evaluation", bars=False)
    assert capsys.readouterr().out == "evaluation\n"
