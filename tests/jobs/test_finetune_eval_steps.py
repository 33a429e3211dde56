"""``--eval-steps`` logs the job's one held-out loss (the mean over every response token), the
number the summary reports, not the Trainer's mean of per-batch means."""
from __future__ import annotations

import re

import pytest

import sorsa_kernels.jobs.finetune as F


def test_a_mid_training_held_out_loss_is_the_summarys_held_out_loss(tmp_path, capsys):
    steps = 6
    result = F.run_finetune(F.FinetuneConfig(
        output_dir=str(tmp_path / "run"), pretrain_steps=30, max_steps=steps, per_device_train_batch_size=8,
        eval_steps=steps, logging_steps=steps, eval_samples=0, eval_batch_size=7, progress=False))
    out = capsys.readouterr().out
    logged = [float(v) for v in re.findall(r"step +\d+/\d+ .*held-out loss (\d+\.\d+)", out)]
    assert logged, out
    # the evaluation at the last step sees the final weights, as the summary's evaluation does;
    # batches of 7 over 100 examples of unequal length make a mean of batch means differ.
    assert logged[-1] == pytest.approx(result.after["loss"], abs=1e-4)
