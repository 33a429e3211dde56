"""``sorsa-kernels`` help and usage errors: suggestions for misspelt flags and commands."""
import pytest

from sorsa_kernels.cli import main


def _usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


def test_misspelt_flag_gets_a_suggestion_and_the_subcommands_own_usage(capsys):
    err = _usage_error(capsys, "finetune", "--learnig-rate", "3e-3")
    assert err.startswith("usage: sorsa-kernels finetune ")
    assert err.rstrip().endswith(
        "sorsa-kernels finetune: error: unrecognized arguments: --learnig-rate 3e-3 (did you mean --learning-rate?)")


def test_misspelt_flag_with_a_value_after_equals_gets_a_suggestion(capsys):
    err = _usage_error(capsys, "analyze", "--base", "b", "--adapter", "a", "--plto=x.png")
    assert "sorsa-kernels analyze: error: unrecognized arguments: --plto=x.png (did you mean --plot?)" in err


def test_misspelt_command_gets_a_suggestion(capsys):
    err = _usage_error(capsys, "finetun")
    assert "invalid choice: 'finetun'" in err and err.rstrip().endswith("(did you mean finetune?)")


def test_unknown_flag_far_from_any_gets_no_suggestion(capsys):
    err = _usage_error(capsys, "merge", "--base", "b", "--adapter", "a", "--output", "o", "--zzz")
    assert "unrecognized arguments: --zzz" in err and "did you mean" not in err
