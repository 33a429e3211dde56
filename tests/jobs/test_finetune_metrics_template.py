"""``finetune``'s metrics.json records the prompt template actually used: a tokenizer's chat
template replaces ``--prompt-template`` (the Alpaca default), and the record says so."""
import json


def test_metrics_json_records_the_chat_template_when_it_was_used(tmp_path):
    from sorsa_kernels.jobs.finetune import FinetuneConfig, run_finetune
    from sorsa_kernels.jobs.models.embedded import build_embedded

    model, tok = build_embedded(pretrain_steps=0, progress=False)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"prompt": f"{a}+{b}?", "response": str(a + b)} for a in range(4) for b in range(4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = FinetuneConfig(model=str(tmp_path / "model"), data=str(tmp_path / "data.jsonl"), max_steps=1, rank=2,
                         eval_samples=1, per_device_train_batch_size=4, progress=False, output_dir=str(tmp_path / "out"))
    run_finetune(cfg)
    settings = json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]
    assert settings["chat_template"] is True and settings["prompt_template"] is None
