"""The fine-tuning job's pieces: data files, the embedded data/model/tokenizer, encoding, config."""
import json
import re

import pytest
import torch

from sorsa_kernels.training import data as D
from sorsa_kernels.jobs.models import embedded as E
from sorsa_kernels.jobs import finetune as F


# ---------------------------------------------------------------------- data files
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_records_reads_jsonl(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}])
    assert D.load_records(p) == [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]


def test_load_records_reads_json_list_with_custom_fields(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"query": "q1", "answer": "a1", "extra": 1}]))
    assert D.load_records(p, "query", "answer") == [{"prompt": "q1", "response": "a1"}]


def test_load_records_reads_json_object_holding_one_list(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"data": [{"prompt": "x", "response": "y"}]}))
    assert D.load_records(p) == [{"prompt": "x", "response": "y"}]


def test_load_records_reads_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "response": ["r1", "r2"]}), p)
    assert D.load_records(p) == [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]


def test_parquet_without_pyarrow_names_the_missing_package(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(D.DataError, match="needs pyarrow"):
        D.load_records(p)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(D.DataError, match=r"d\.jsonl does not exist"):
        D.load_records(tmp_path / "d.jsonl")


def test_empty_data_file_is_named(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    with pytest.raises(D.DataError, match=r"d\.jsonl is empty"):
        D.load_records(tmp_path / "d.jsonl")


def test_data_file_of_blank_lines_has_no_records(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n\n")
    with pytest.raises(D.DataError, match="has no records"):
        D.load_records(tmp_path / "d.jsonl")


def test_missing_field_names_record_field_and_fields_present(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "answer": "d"}])
    with pytest.raises(D.DataError, match=r"record 1 has no field 'response' \(it has: 'prompt', 'answer'\)"):
        D.load_records(p)


def test_non_string_field_is_rejected(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": 4}])
    with pytest.raises(D.DataError, match="field 'response' is a int, expected a string"):
        D.load_records(p)


def test_invalid_json_line_is_numbered(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(D.DataError, match="line 2 is not valid JSON"):
        D.load_records(p)


def test_unsupported_extension_lists_allowed_ones(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,response\n")
    with pytest.raises(D.DataError, match=r"'\.csv'.*\.jsonl, \.json, \.parquet"):
        D.load_records(p)


# ---------------------------------------------------------------------- embedded data
def test_arithmetic_problems_are_deterministic():
    assert D.arithmetic_problems(50, seed=3) == D.arithmetic_problems(50, seed=3)
    assert D.arithmetic_problems(50, seed=3) != D.arithmetic_problems(50, seed=4)


def test_arithmetic_problem_answers_are_correct():
    for row in D.arithmetic_problems(300, seed=1):
        a, b = map(int, re.findall(r"\d+", row["prompt"]))
        words = row["prompt"]
        subtract = any(w in words for w in ("away", "lost", "taken"))
        assert row["response"] == str(a - b if subtract else a + b)
        assert int(row["response"]) >= 0


def test_arithmetic_equations_are_correct():
    for line in D.arithmetic_equations(200, seed=2):
        lhs, rhs = line.split("=")
        assert eval(lhs) == int(rhs)  # noqa: S307 - our own generated digits and +/-


def test_split_records_is_deterministic_and_disjoint():
    rows = [{"prompt": str(i), "response": str(i)} for i in range(40)]
    train, held = D.split_records(rows, 0.25, seed=7)
    assert (train, held) == D.split_records(rows, 0.25, seed=7)
    assert len(held) == 10 and len(train) == 30
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_split_records_rejects_fraction_of_one():
    with pytest.raises(ValueError, match=r"eval fraction must be in \[0, 1\)"):
        D.split_records([{"prompt": "a", "response": "b"}] * 3, 1.0)


# ---------------------------------------------------------------------- embedded model
def test_embedded_tokenizer_round_trips_text_and_adds_bos():
    tok = E.build_tokenizer()
    text = "Q: Ann has 3 apples.\nA: 7"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_embedded_tokenizer_reloads_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = E.build_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Eve had 9 pens and lost 4. How many pens remain?"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.pad_token_id == tok.pad_token_id and again.eos_token_id == tok.eos_token_id


def test_embedded_build_is_bit_reproducible():
    a, _ = E.build_embedded(pretrain_steps=3, progress=False)
    b, _ = E.build_embedded(pretrain_steps=3, progress=False)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("steps", [1, 2, 10])  # 10: OneCycleLR's 10 % warm-up was one step long, 0/0
def test_embedded_pretraining_runs_for_any_step_count(steps):
    tok = E.build_tokenizer()
    trained = E.pretrain(E.build_model(tok), tok, steps=steps, progress=False)
    assert all(bool(torch.isfinite(p).all()) for p in trained.parameters())


def test_embedded_pretraining_changes_the_weights():
    tok = E.build_tokenizer()
    untrained = E.build_model(tok)
    trained = E.pretrain(E.build_model(tok), tok, steps=3, progress=False)
    w0 = untrained.model.layers[0].self_attn.q_proj.weight
    w1 = trained.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w0, w1)


# ---------------------------------------------------------------------- encoding
@pytest.fixture(scope="module")
def tok():
    return E.build_tokenizer()


def test_encode_example_masks_prompt_and_labels_response_and_eos(tok):
    ex = F.encode_example(tok, "2+2?", "4", "Q: {prompt}\nA: ", 64, False)
    n_prompt = len(tok("Q: 2+2?\nA: ")["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] == tok.convert_tokens_to_ids(["4"]) + [tok.eos_token_id]


def test_encode_example_truncates_to_max_length(tok):
    ex = F.encode_example(tok, "x", "123456789", "{prompt}", 6, False)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 6


def test_encode_example_drops_pair_whose_prompt_fills_max_length(tok):
    assert F.encode_example(tok, "long prompt", "1", "{prompt}", 5, False) is None


def test_encode_example_uses_chat_template(tmp_path):
    tok = E.build_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    ex = F.encode_example(tok, "hi", "yo", "unused {prompt}", 64, True)
    prompt = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab == -100])
    assert prompt == "<user>hi<assistant>"


def test_collator_pads_right_with_pad_id_and_ignore_index():
    batch = F.ResponseOnlyCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------------- config
def test_real_model_gets_the_paper_defaults():
    cfg = F.FinetuneConfig(model="some/model", data="x.jsonl").resolved()
    assert (cfg.rank, cfg.learning_rate, cfg.gamma, cfg.warmup_ratio, cfg.lr_scheduler_type) == (128, 3e-5, 4e-4, 0.03, "cosine")
    assert (cfg.num_train_epochs, cfg.max_steps, cfg.max_length, cfg.weight_decay) == (1.0, -1, 512, 0.0)
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps == 128
    assert cfg.prompt_template == F.DEFAULT_PROMPT_TEMPLATE


def test_embedded_default_uses_its_own_settings():
    cfg = F.FinetuneConfig().resolved()
    assert (cfg.rank, cfg.learning_rate, cfg.max_steps, cfg.gamma) == (16, 3e-3, 250, 4e-4)
    assert cfg.prompt_template == E.EMBEDDED_PROMPT_TEMPLATE


def test_explicit_epochs_switch_off_the_embedded_step_count():
    assert F.FinetuneConfig(num_train_epochs=2).resolved().max_steps == -1


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(lr_scheduler_type="zigzag"), "lr_scheduler_type must be one of 'linear', 'cosine', .*got 'zigzag'"),
        (dict(learning_rate=-1.0), "learning_rate must be a positive"),
        (dict(rank=0), "rank must be a positive"),
        (dict(warmup_ratio=1.5), r"warmup_ratio must be in \[0, 1\)"),
        (dict(residual_dtype="int8"), "residual_dtype must be one of 'float32', .*got 'int8'"),
        (dict(model="some/model"), "model='some/model' needs data FILE"),
        (dict(prompt_template="no placeholder"), "must contain {prompt}"),
        (dict(max_steps=0), "max_steps must be positive"),
    ],
)
def test_bad_settings_are_rejected_by_field_name_on_construction(changes, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        F.FinetuneConfig(output_dir=str(tmp_path / "out"), **changes)
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_is_rejected(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        F.check_output_dir(tmp_path / "f")


def test_output_dir_under_read_only_parent_is_rejected(tmp_path):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(ValueError, match=r"cannot be created: .*ro is not writable"):
            F.check_output_dir(ro / "a" / "b")
    finally:
        ro.chmod(0o700)


def test_empty_existing_output_dir_is_accepted(tmp_path):
    F.check_output_dir(tmp_path)  # empty and writable: fine


def test_non_empty_output_dir_is_refused(tmp_path):
    (tmp_path / "x").write_text("1")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        F.check_output_dir(tmp_path)


# ---------------------------------------------------------------------- short runs
FAST = dict(pretrain_steps=20, max_steps=4, logging_steps=1, per_device_train_batch_size=4,
            evaluate=False, progress=False)


def test_resume_from_checkpoint_continues_with_the_same_losses(tmp_path):
    full = F.run_finetune(F.FinetuneConfig(output_dir=str(tmp_path / "a"), save_steps=2, **FAST))
    ckpt = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    assert ckpt.is_dir()
    resumed = F.run_finetune(F.FinetuneConfig(output_dir=str(tmp_path / "a"), resume_from_checkpoint=str(ckpt),
                                              **FAST))
    tail = dict(full.train_losses)
    for step, loss in resumed.train_losses:
        if step > 2:
            assert loss == pytest.approx(tail[step], rel=1e-5, abs=1e-6)
    assert max(s for s, _ in resumed.train_losses) == 4


def test_missing_checkpoint_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="checkpoint folder .*nope does not exist"):
        F.run_finetune(F.FinetuneConfig(output_dir=str(tmp_path / "o"), resume_from_checkpoint=str(tmp_path / "nope")))
