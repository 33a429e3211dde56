"""``sorsa-kernels`` help and usage errors: suggestions for misspelt flags and commands."""
import pytest

from sorsa_kernels.cli import main


def _usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


def test_misspelt_flag_prints_one_line_and_the_suggestion_then_where_help_is_not_the_usage(capsys):
    err = _usage_error(capsys, "finetune", "--learnig-rate", "3e-3")
    assert err.splitlines() == [
        "sorsa-kernels finetune: error: unrecognized arguments: --learnig-rate 3e-3 (did you mean --learning-rate?)",
        "see sorsa-kernels finetune --help",
    ]


def test_misspelt_flag_with_a_value_after_equals_gets_a_suggestion(capsys):
    err = _usage_error(capsys, "analyze", "--base", "b", "--adapter", "a", "--plto=x.png")
    assert "sorsa-kernels analyze: error: unrecognized arguments: --plto=x.png (did you mean --plot?)" in err


def test_misspelt_command_gets_a_suggestion(capsys):
    err = _usage_error(capsys, "finetun")
    assert "invalid choice: 'finetun'" in err and err.splitlines()[0].endswith("(did you mean finetune?)")


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


def _child_cpu_seconds(*argv) -> float:
    """CPU seconds (user + system) of ``python -m sorsa_kernels ARGV`` in a fresh process."""
    import os
    import resource
    import subprocess
    import sys

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "sorsa_kernels", *argv], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_take_under_half_a_second_of_cpu(flag):
    assert _child_cpu_seconds(flag) < 0.5


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["merge", "--help"], ["analyze", "--help"],
                                  ["export-lora", "--help"]])
def test_parsing_without_running_imports_no_torch(argv):
    import subprocess
    import sys

    code = ("import sys\nfrom sorsa_kernels.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert done.stderr.strip().splitlines()[-1] == "False", done.stderr


@pytest.mark.parametrize("command", ["analyze", "merge", "export-lora"])
def test_model_commands_help_describes_what_the_command_does(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]  # usage, blank line, the description
    assert len(description.split()) > 30 and not description.startswith("options"), out
