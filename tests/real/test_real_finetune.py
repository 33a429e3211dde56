"""``sorsa-kernels finetune --model PATH.gguf``: a few steps on SmolLM2-135M through its chat template lower
the held-out loss (the arithmetic task; adapters on q_proj and v_proj)."""
import json

from sorsa_kernels.cli import main
from sorsa_kernels.training.data import arithmetic_problems
from sorsa_kernels.jobs.models.gguf import smollm2_gguf


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_few_steps_on_the_gguf_model_with_its_chat_template_lower_held_out_loss(tmp_path, capsys):
    rows = arithmetic_problems(40, seed=0)
    train, held = _write(tmp_path / "train.jsonl", rows[8:]), _write(tmp_path / "held.jsonl", rows[:8])
    out = tmp_path / "out"
    rc = main(["finetune", "--model", str(smollm2_gguf()), "--data", train, "--eval-data", held,
               "--rank", "8", "--target-modules", "q_proj", "v_proj", "--svd", "randomized",
               "--max-steps", "4", "--batch-size", "4", "--grad-accum", "1", "--lr", "2e-3", "--warmup-ratio", "0",
               "--eval-samples", "2", "--max-new-tokens", "4", "--max-length", "96", "--quiet", "--output-dir", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"]["loss"], metrics["after"]["loss"]
    assert after < 0.8 * before, (before, after)
    assert metrics["settings"]["model"].endswith(".gguf")
    assert (out / "merged" / "config.json").is_file() and (out / "adapter").is_dir()
    assert "<|im_start|>" in (out / "merged" / "chat_template.jinja").read_text()  # the GGUF's template
