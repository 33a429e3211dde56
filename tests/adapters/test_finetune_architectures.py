"""``sorsa-kernels finetune`` on a non-Llama model saved with ``save_pretrained``: a tiny GPT-2 (Conv1D
projections) with a tokenizer built offline, default targets, then merge and PEFT export from the CLI."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sorsa_kernels.cli import main  # noqa: E402
from sorsa_kernels.jobs.models.embedded import build_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok), n_positions=128,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(4) for b in range(4)]
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_finetune_adapts_gpt2_with_default_targets_and_prints_the_summary(gpt2_run, capsys):
    out = gpt2_run / "out"
    rc = main(["finetune", "--model", str(gpt2_run / "model"), "--data", str(gpt2_run / "d.jsonl"), "--rank", "4",
               "--max-steps", "2", "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-2", "--no-eval",
               "--output-dir", str(out), "--quiet", "--verbose"])
    stdout = capsys.readouterr().out
    assert rc == 0
    summary = [line for line in stdout.splitlines() if line.startswith("SORSA:")]
    assert len(summary) == 1 and "8 layers adapted (attn.c_attn×2, attn.c_proj×2, mlp.c_fc×2, mlp.c_proj×2)" in summary[0]
    assert "  not adapted (linear): lm_head" in stdout
    layers = json.loads((out / "adapter" / "adapter_config.json").read_text())["layers"]
    assert len(layers) == 8 and all(lc["fan_in_fan_out"] for lc in layers.values())
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_export_lora_of_the_gpt2_run_is_loaded_by_peft(gpt2_run, capsys):
    peft = pytest.importorskip("peft")
    out = gpt2_run / "out"
    if not (out / "adapter").is_dir():
        pytest.skip("the finetune test did not run")
    rc = main(["export-lora", "--base", str(gpt2_run / "model"), "--adapter", str(out / "adapter"),
               "--output", str(gpt2_run / "lora")])
    assert rc == 0
    cfg = json.loads((gpt2_run / "lora" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["task_type"] == "CAUSAL_LM"
    base = transformers.AutoModelForCausalLM.from_pretrained(gpt2_run / "model")
    lora = peft.PeftModel.from_pretrained(base, gpt2_run / "lora").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(gpt2_run / "model").eval()
    ids = torch.tensor([[1, 10, 11, 12, 13]])
    with torch.no_grad():
        assert (plain(ids).logits - merged(ids).logits).abs().max() > 1e-3  # training moved the model
        assert (lora(ids).logits - merged(ids).logits).abs().max() < 1e-4
