"""``sorsa-kernels``: the embedded default end to end, the model commands, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from sorsa_kernels.cli import main


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err):
    lines = [l for l in err.splitlines() if l.startswith("sorsa-kernels: error:")]
    assert rc == 1
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------- the embedded default
@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The README's first command with no arguments except where to write (run once)."""
    out = tmp_path_factory.mktemp("run") / "out"
    rc = main(["finetune", "--output-dir", str(out), "--quiet"])
    assert rc == 0
    return out


def test_default_finetune_improves_heldout_loss_and_exact_match(default_run):
    m = json.loads((default_run / "metrics.json").read_text())
    assert m["after"]["loss"] < 0.5 * m["before"]["loss"]
    assert m["after"]["exact_match"] >= m["before"]["exact_match"] + 0.3


def test_default_finetune_logs_decreasing_training_loss(default_run):
    losses = [loss for _, loss in json.loads((default_run / "metrics.json").read_text())["train_losses"]]
    assert losses[-1] < 0.5 * losses[0]


def test_default_finetune_writes_adapter_merged_and_base(default_run):
    for rel in ("adapter/adapter_config.json", "adapter/adapter.safetensors", "merged/config.json",
                "merged/tokenizer.json", "base/config.json", "base/tokenizer.json"):
        assert (default_run / rel).is_file(), rel
    assert not (default_run / "checkpoints").exists()  # nothing saved there without --save-steps


def _logits(model, text="Q: Ann has 3 apples. Ann gets 4 more. How many apples does Ann have?\nA: "):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model.name_or_path) if model.name_or_path else None
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


def test_merged_model_reloads_and_matches_base_plus_adapter(default_run):
    from transformers import AutoModelForCausalLM

    from sorsa_kernels import load_adapter
    from tests.conftest import rel_err

    merged = AutoModelForCausalLM.from_pretrained(default_run / "merged").eval()
    adapted = load_adapter(AutoModelForCausalLM.from_pretrained(default_run / "base"), default_run / "adapter").eval()
    adapted.name_or_path = str(default_run / "base")
    assert rel_err(_logits(merged), _logits(adapted)) < 1e-5


def test_merge_command_matches_the_merged_model_of_the_run(default_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tests.conftest import rel_err

    rc, out, _ = _run(capsys, "merge", "--base", str(default_run / "base"), "--adapter",
                      str(default_run / "adapter"), "--output", str(tmp_path / "m"))
    assert rc == 0 and "merged model:" in out
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    b = AutoModelForCausalLM.from_pretrained(default_run / "merged").eval()
    assert rel_err(_logits(a), _logits(b)) < 1e-6


def test_merge_with_embedded_base_rebuilds_the_same_base(default_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tests.conftest import rel_err

    rc, _, _ = _run(capsys, "merge", "--base", "embedded", "--adapter", str(default_run / "adapter"),
                    "--output", str(tmp_path / "m"))
    assert rc == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    b = AutoModelForCausalLM.from_pretrained(default_run / "merged").eval()
    assert rel_err(_logits(a), _logits(b)) < 1e-6


def test_export_lora_command_gives_a_peft_adapter_equal_to_the_merged_model(default_run, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from tests.conftest import rel_err

    rc, out, _ = _run(capsys, "export-lora", "--base", str(default_run / "base"), "--adapter",
                      str(default_run / "adapter"), "--output", str(tmp_path / "lora"))
    assert rc == 0 and "PEFT LoRA adapter:" in out
    base = AutoModelForCausalLM.from_pretrained(default_run / "base")
    lora = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    merged = AutoModelForCausalLM.from_pretrained(default_run / "merged").eval()
    lora.name_or_path = str(default_run / "base")
    assert rel_err(_logits(lora), _logits(merged)) < 1e-4


def test_analyze_command_prints_a_row_per_layer_and_writes_png(default_run, tmp_path, capsys):
    png = tmp_path / "drift.png"
    rc, out, _ = _run(capsys, "analyze", "--base", str(default_run / "base"), "--adapter",
                      str(default_run / "adapter"), "--plot", str(png))
    assert rc == 0
    rows = [l for l in out.splitlines() if l.strip().startswith("model.layers.")]
    assert len(rows) == 14  # 2 layers × 7 projections
    sigma, d = map(float, rows[0].split()[1:3])
    assert sigma > 0 and 0 < d < 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_with_two_adapters_prints_both(default_run, capsys):
    a = str(default_run / "adapter")
    rc, out, _ = _run(capsys, "analyze", "--base", str(default_run / "base"), "--adapter", a, a, "--no-plot")
    assert rc == 0 and out.count("adapter ") == 2 and "plot:" not in out


# ---------------------------------------------------------------------- bad input
FAST = ("--pretrain-steps", "0", "--quiet")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_missing_data_file_is_a_one_line_error(tmp_path, capsys):
    rc, _, err = _run(capsys, "finetune", "--data", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "o"), *FAST)
    assert "nope.jsonl does not exist" in _one_line_error(rc, err)
    assert not (tmp_path / "o").exists()


def test_empty_data_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "e.jsonl").write_text("")
    rc, _, err = _run(capsys, "finetune", "--data", str(tmp_path / "e.jsonl"), "--output-dir", str(tmp_path / "o"), *FAST)
    assert "e.jsonl is empty" in _one_line_error(rc, err)
    assert not (tmp_path / "o").exists()


def test_missing_field_is_a_one_line_error_naming_the_field(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "response": "r"}])
    rc, _, err = _run(capsys, "finetune", "--data", data, "--output-dir", str(tmp_path / "o"), *FAST)
    assert "no field 'prompt'" in _one_line_error(rc, err)
    assert not (tmp_path / "o").exists()


def test_custom_field_names_are_used(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"q": "q", "a": "r"}])
    rc, _, err = _run(capsys, "finetune", "--data", data, "--prompt-field", "q", "--response-field", "a",
                      "--rank", "999", "--output-dir", str(tmp_path / "o"), *FAST)
    assert "field" not in _one_line_error(rc, err)  # the data passed; the rank error comes next


def test_rank_larger_than_a_layer_is_a_one_line_error_naming_the_layer(tmp_path, capsys):
    rc, _, err = _run(capsys, "finetune", "--rank", "999", "--output-dir", str(tmp_path / "o"), *FAST)
    line = _one_line_error(rc, err)
    assert "rank 999 exceeds min(in_features, out_features) = 128" in line and "model.layers.0" in line
    assert not (tmp_path / "o").exists()


def test_no_matching_target_module_is_a_one_line_error(tmp_path, capsys):
    rc, _, err = _run(capsys, "finetune", "--target-modules", "w_nonexistent", "--output-dir", str(tmp_path / "o"), *FAST)
    assert "no module of the model matches target_modules entry 'w_nonexistent'" in _one_line_error(rc, err)
    assert not (tmp_path / "o").exists()


def test_unwritable_output_folder_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc, _, err = _run(capsys, "finetune", "--output-dir", str(tmp_path / "file" / "out"), *FAST)
    assert "cannot be created" in _one_line_error(rc, err)


def test_non_empty_output_folder_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    rc, _, err = _run(capsys, "finetune", "--output-dir", str(tmp_path / "o"), *FAST)
    assert "already exists and is not empty" in _one_line_error(rc, err)
    assert os.listdir(tmp_path / "o") == ["keep.txt"]


def test_unknown_model_is_a_one_line_error(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    rc, _, err = _run(capsys, "finetune", "--model", str(tmp_path / "no-model"), "--data", data,
                      "--output-dir", str(tmp_path / "o"), *FAST)
    assert "cannot load model" in _one_line_error(rc, err)
    assert not (tmp_path / "o").exists()


def test_fsdp_in_one_process_is_a_one_line_error(tmp_path, capsys):
    rc, _, err = _run(capsys, "finetune", "--fsdp", "--output-dir", str(tmp_path / "o"), *FAST)
    assert "--fsdp needs several processes" in _one_line_error(rc, err)
    assert not (tmp_path / "o").exists()


def test_quantize_nf4_without_qsorsa_is_a_one_line_error(tmp_path, capsys):
    try:
        import sorsa_kernels.nn.qlinear  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("QSORSA is installed; the flag is exercised by the QSORSA tests")
    rc, _, err = _run(capsys, "finetune", "--quantize", "nf4", "--output-dir", str(tmp_path / "o"), *FAST)
    assert "--quantize nf4 needs QSORSA" in _one_line_error(rc, err)


def test_merge_with_missing_adapter_is_a_one_line_error(tmp_path, capsys):
    rc, _, err = _run(capsys, "merge", "--base", "embedded", "--adapter", str(tmp_path / "none"),
                      "--output", str(tmp_path / "m"))
    assert "adapter_config.json does not exist" in _one_line_error(rc, err)
    assert not (tmp_path / "m").exists()


def test_console_script_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sorsa_kernels", "finetune", "--data", str(tmp_path / "x.jsonl")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("sorsa-kernels: error: data file")
    assert "x.jsonl does not exist" in proc.stderr
    assert os.listdir(tmp_path) == []  # no default sorsa-output-* folder left behind


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--rank", "many"])
    assert e.value.code == 2


def test_config_from_args_maps_every_finetune_option_to_a_config_field():
    from sorsa_kernels.cli import build_parser, config_from_args
    from sorsa_kernels.jobs.finetune import FinetuneConfig

    parser = build_parser()
    finetune = parser._subparsers._group_actions[0].choices["finetune"]
    dests = {a.dest for a in finetune._actions if a.dest != "help"}
    assert dests <= set(FinetuneConfig.__dataclass_fields__), dests - set(FinetuneConfig.__dataclass_fields__)
    cfg = config_from_args(parser.parse_args(["finetune", "--rank", "8", "--lr", "1e-3", "--no-eval", "--quiet"]))
    assert (cfg.rank, cfg.learning_rate, cfg.evaluate, cfg.progress) == (8, 1e-3, False, False)
    assert cfg == FinetuneConfig(rank=8, learning_rate=1e-3, evaluate=False, progress=False)


def test_every_flag_is_a_config_field_with_its_default_and_every_field_a_flag_or_internal():
    from dataclasses import fields

    from sorsa_kernels.cli import build_parser
    from sorsa_kernels.jobs.compare.config import CompareConfig
    from sorsa_kernels.jobs.finetune import FinetuneConfig
    from sorsa_kernels.jobs.options import field_default

    commands = build_parser()._subparsers._group_actions[0].choices
    for command, classes in (("finetune", [FinetuneConfig]), ("compare", [FinetuneConfig, CompareConfig])):
        actions = {a.dest: a for a in commands[command]._actions if a.dest != "help"}
        declared = {f.name: f for cls in classes for f in fields(cls)}
        assert set(actions) <= set(declared), set(actions) - set(declared)
        for dest, action in actions.items():
            assert action.default == field_default(declared[dest]), (command, dest, action.default)
        internal = {name for name, f in declared.items() if f.metadata.get("internal")}
        assert set(declared) - set(actions) == internal, (command, set(declared) - set(actions) - internal)
        assert all(f.metadata.get("help") for f in declared.values()), command


def test_a_declared_option_becomes_a_flag_with_its_help_and_defaults():
    import argparse
    from dataclasses import dataclass
    from typing import Optional

    from sorsa_kernels.jobs.flags import add_options
    from sorsa_kernels.jobs.options import option

    @dataclass
    class Job:
        verbose: bool = option(False, "print every log line", group="g")
        steps: Optional[int] = option(None, "how many", group="g", paper=3e-5, embedded=4e-4)
        rate: float = option(0.5, "a rate of {data:flag}", group="g", flags=("--rate", "-r"))

    parser = argparse.ArgumentParser()
    add_options(parser, Job)
    args = parser.parse_args(["--verbose", "--steps", "2", "-r", "0.25"])
    assert (args.verbose, args.steps, args.rate) == (True, 2, 0.25)
    text = " ".join(parser.format_help().split())
    assert "--verbose print every log line --steps STEPS how many (default: 3e-5; embedded 4e-4)" in text
    assert "--rate RATE, -r RATE a rate of --data (default: 0.5)" in text


def test_paper_and_embedded_defaults_are_the_papers_and_the_demos():
    from sorsa_kernels.jobs.models.embedded import PRETRAIN_STEPS
    from sorsa_kernels.jobs.finetune import EMBEDDED_DEFAULTS, PAPER_DEFAULTS

    assert PAPER_DEFAULTS == dict(rank=128, learning_rate=3e-5, num_train_epochs=1.0, max_steps=-1,
                                  per_device_train_batch_size=8, gradient_accumulation_steps=16,
                                  logging_steps=10, pretrain_steps=0)
    assert EMBEDDED_DEFAULTS == dict(rank=16, learning_rate=3e-3, num_train_epochs=1.0, max_steps=250,
                                     per_device_train_batch_size=16, gradient_accumulation_steps=1,
                                     logging_steps=25, pretrain_steps=PRETRAIN_STEPS)
