"""``sorsa-kernels compare`` on the command line: a tiny end-to-end run and one-line errors."""
import json

import pytest

from sorsa_kernels.cli import main

TINY = ["--max-steps", "2", "--record-every", "1", "--pretrain-steps", "0", "--eval-samples", "4", "--rank", "2",
        "--quiet"]


def _one_line_error(capsys, argv):
    rc = main(argv)
    _, err = capsys.readouterr()
    lines = [l for l in err.splitlines() if l.startswith("sorsa-kernels: error:")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_compare_command_prints_the_summary_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", *TINY, "--methods", "sorsa", "lora", "--full", "--no-plots", "--output-dir", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0
    header = next(l for l in stdout.splitlines() if l.startswith("method"))
    assert all(word in header for word in ("trainable", "held-out loss", "exact match", "ΔΣ", "ΔD"))
    for label in ("SORSA", "LoRA", "Full FT"):
        assert any(l.startswith(label) for l in stdout.splitlines()), label
    assert "PiSSA" not in stdout.split("by held-out loss")[0]
    report = json.loads((out / "compare.json").read_text())
    assert list(report["methods"]) == ["sorsa", "lora", "full"]
    assert report["methods"]["full"]["records"][-1]["orthonormality"] is None
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md"]


def test_compare_says_under_its_table_what_the_toy_run_cannot_show_and_where_a_real_model_is(tmp_path, capsys):
    rc = main(["compare", *TINY, "--methods", "sorsa", "lora", "--no-plots", "--output-dir", str(tmp_path / "c")])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0
    at = next(i for i, l in enumerate(lines) if l.startswith("by held-out loss"))
    scope = lines[at + 1]
    assert scope.startswith("On the embedded default") and "not which method is better on a real model" in scope
    assert scope.endswith("see docs/results/compare-smollm2-cpu.md.")


@pytest.mark.parametrize("argv, message", [
    (["--record-every", "0"], "record-every must be a positive number of steps, got 0"),
    (["--record-every", "2", "--eval-steps", "3"], "eval-steps 3 must be a multiple of record-every 2"),
    (["--quantize", "nf4"], "compare does not take --quantize"),
    (["--logging-steps", "5"], "compare does not take --logging-steps"),
    (["--no-eval"], "compare does not take --no-eval"),
    (["--lr", "-1"], "learning-rate must be a positive finite number, got -1.0"),
    (["--seeds", "0"], "seeds must be a positive number of seeds, got 0"),
])
def test_bad_compare_flags_give_one_line_errors(argv, message, tmp_path, capsys):
    line = _one_line_error(capsys, ["compare", *argv, "--output-dir", str(tmp_path / "o")])
    assert message in line
    assert not (tmp_path / "o").exists()


def test_a_rank_too_large_for_the_model_is_one_line_error(tmp_path, capsys):
    line = _one_line_error(capsys, ["compare", "--pretrain-steps", "0", "--rank", "999", "--quiet",
                                    "--output-dir", str(tmp_path / "o")])
    assert "rank 999 exceeds" in line


def test_a_used_output_folder_is_one_line_error(tmp_path, capsys):
    (tmp_path / "used.txt").write_text("x")
    assert "already exists and is not empty" in _one_line_error(capsys, ["compare", "--output-dir", str(tmp_path)])


@pytest.mark.parametrize("argv", [["--methods", "dora"], ["--record-every", "often"]])
def test_malformed_compare_command_lines_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[0].startswith("sorsa-kernels compare: error:")
    assert lines[1:] == ["see sorsa-kernels compare --help"]


def test_compare_takes_the_finetune_flags_and_its_own():
    from sorsa_kernels.cli import build_parser
    from sorsa_kernels.jobs.finetune import FinetuneConfig

    choices = build_parser()._subparsers._group_actions[0].choices
    finetune = {a.dest for a in choices["finetune"]._actions}
    compare = {a.dest for a in choices["compare"]._actions}
    assert compare - finetune == {"methods", "full", "record_every", "plots", "lr_sweep", "seeds"}
    assert finetune <= compare
    assert finetune - {"help"} <= set(FinetuneConfig.__dataclass_fields__)


def test_missing_peft_is_one_line_error_before_any_training(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    line = _one_line_error(capsys, ["compare", *TINY, "--output-dir", str(tmp_path / "o")])
    assert "pip install 'sorsa-kernels[compare]'" in line
    assert not (tmp_path / "o").exists()


def test_compare_prints_one_plain_line_per_phase_and_recorded_step_without_a_terminal(tmp_path, capsys):
    rc = main(["compare", *TINY, "--methods", "sorsa", "--no-plots", "--output-dir", str(tmp_path / "c")])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert any(l.startswith("compare: loading embedded") for l in lines)
    assert any(l.startswith("compare: evaluating the pretrained model") for l in lines)
    assert any(l.startswith("sorsa: initializing") for l in lines)
    steps = [l for l in lines if l.startswith("sorsa lr ")]
    assert [l.split("step ")[1].split()[0] for l in steps] == ["0/2", "1/2", "2/2"]
    assert any("peak memory (max RSS)" in l for l in lines)
