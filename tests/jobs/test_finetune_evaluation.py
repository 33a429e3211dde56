"""finetune's evaluation tells the same truth as compare's: ``--eval-steps`` logs the job's one
held-out loss (the mean over every response token, the number the summary reports, not the
Trainer's mean of per-batch means), and exact match generates beside a whole prompt (the budget
fitted within ``--max-length``; a prompt that leaves no room is refused before the surgery)."""
from __future__ import annotations

import json
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


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_finetune_fits_generation_beside_a_long_held_out_prompt_instead_of_cutting_it(tmp_path, recwarn):
    """As ``compare`` does: ``max_new_tokens`` is what ``--max-length`` leaves beside the longest
    prompt; the prompt stays whole (the old default, longest answer + 4, cut it to fit)."""
    from sorsa_kernels.jobs.finetune.encoding import prompt_ids
    from sorsa_kernels.jobs.models.embedded import build_tokenizer

    tok = build_tokenizer()
    cfg = F.FinetuneConfig(data="x.jsonl")
    prompt = "Ann has 3 apples and gets 4 more. How many apples does Ann have now?"
    length = len(prompt_ids(tok, prompt, cfg.resolved().prompt_template, False))
    train = _write(tmp_path / "train.jsonl", [{"prompt": "1 plus 2?", "response": "3"}] * 16)
    held = _write(tmp_path / "held.jsonl", [{"prompt": prompt, "response": "7"}] * 4)
    result = F.run_finetune(F.FinetuneConfig(
        data=train, eval_data=held, output_dir=str(tmp_path / "run"), pretrain_steps=10, max_steps=1,
        per_device_train_batch_size=4, max_length=length + 3, eval_samples=4, progress=False))
    assert not [w for w in recwarn if "cut" in str(w.message)], [str(w.message) for w in recwarn]
    assert "exact_match" in result.after


def test_finetune_refuses_a_held_out_prompt_that_leaves_no_room_before_the_surgery(tmp_path, monkeypatch):
    from sorsa_kernels.jobs.finetune import training

    prompt = "Ann has 3 apples and gets 4 more. How many apples does Ann have now?"
    train = _write(tmp_path / "train.jsonl", [{"prompt": "1 plus 2?", "response": "3"}] * 16)
    held = _write(tmp_path / "held.jsonl", [{"prompt": "2 plus 2?", "response": "4"}] * 3
                  + [{"prompt": prompt, "response": "7"}])
    monkeypatch.setattr(training, "apply_config_sorsa", lambda *a: pytest.fail("the surgery ran"))
    with pytest.raises(ValueError, match=r"longest held-out prompt has \d+ tokens and --max-length is 24"):
        F.run_finetune(F.FinetuneConfig(data=train, eval_data=held, output_dir=str(tmp_path / "run"),
                                        pretrain_steps=10, max_steps=1, max_length=24, progress=False))
