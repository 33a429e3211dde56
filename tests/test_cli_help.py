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


def _options(command: str):
    import argparse

    from sorsa_kernels.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return sub, [a for a in sub._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", ["finetune", "compare", "analyze", "merge", "export-lora"])
def test_every_flag_that_takes_a_value_shows_its_default(command):
    _, actions = _options(command)
    missing = [a.option_strings[0] for a in actions
               if a.nargs != 0 and not a.required and "(default: " not in (a.help or "")]
    assert missing == [], f"{command}: no default shown for {missing}"


def test_svd_shows_its_default_in_the_help():
    sub, _ = _options("finetune")
    text = " ".join(sub.format_help().split())
    assert "--svd {full,randomized} SVD used at initialization (default: full)" in text


@pytest.mark.parametrize("command", ["finetune", "compare"])
def test_help_prints_no_doubled_percent_sign(command):
    sub, _ = _options(command)
    assert "%%" not in sub.format_help()
