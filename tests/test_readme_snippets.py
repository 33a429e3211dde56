"""The READMEs run as written: every fenced ``python`` and ``bash``/``sh``/``shell`` snippet of
README.md and bench/README.md is executed here, in document order, in one fresh folder per file
(so later snippets use what earlier ones wrote, as a reader following the file would).

How each snippet is treated, by the HTML comment on the line before its fence:

- none: it runs here.  A shell snippet may only hold ``sorsa-kernels …`` commands; they run
  in-process through :func:`sorsa_kernels.cli.main`, with ``finetune``/``compare`` given a small
  budget by extra flags appended after the snippet's own (:data:`BUDGET`; the full-size
  ``sorsa-kernels finetune`` is the README's main command, which ``.ci/run`` runs as written).
  A python snippet is ``exec``-ed.
- ``<!-- ci:main-command -->`` / ``<!-- ci:test-command -->``: run by ``.ci/run`` itself; here
  only parsed like the next kind.
- ``<!-- snippet: not-runnable-here (why) -->`` (a 7B download, several GPUs, installing
  packages): only checked: python compiles and its ``sorsa_kernels`` imports resolve; shell
  passes ``bash -n`` and every ``--flag`` of each ``sorsa-kernels`` command appears in its
  subcommand's ``--help``.

``python -m tests.test_readme_snippets`` lists the snippets marked not runnable here.
"""
from __future__ import annotations

import ast
import importlib
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "bench/README.md")
LANGUAGES = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell",
             "console": "shell"}
#: Appended to every ``finetune``/``compare`` command a runnable snippet holds: the same
#: command on a small budget (the last value of a repeated flag wins).
BUDGET = {
    "finetune": ["--pretrain-steps", "5", "--max-steps", "3", "--eval-samples", "8", "--quiet"],
    "compare": ["--pretrain-steps", "5", "--max-steps", "2", "--record-every", "1", "--eval-samples", "4",
                "--quiet"],
}
_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_MARK = re.compile(r"<!--\s*(?:snippet:\s*not-runnable-here\s*\((?P<why>[^)]*)\)|(?P<ci>ci:[\w-]+))\s*-->")


@dataclass(frozen=True)
class Snippet:
    file: str
    line: int
    language: str  # "python" or "shell"
    code: str
    not_runnable: Optional[str]  # why it cannot run here (None: it runs)

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def snippets(file: str, root: Path = ROOT) -> list[Snippet]:
    """Every python and shell fence of ``root / file`` in document order, with its marker."""
    text = (root / file).read_text()
    out = []
    for m in _FENCE.finditer(text):
        language = LANGUAGES.get(m.group(1).lower())
        if language is None:
            continue  # a layout sketch, JSON, a table … : not code to run
        before = text[:m.start()].rstrip().rsplit("\n", 1)[-1].strip()
        mark = _MARK.fullmatch(before)
        why = None
        if mark:
            why = mark.group("why") or f"run by .ci/run ({mark.group('ci')})"
        out.append(Snippet(file, text.count("\n", 0, m.start()) + 1, language, m.group(2), why))
    return out


ALL = [s for f in READMES for s in snippets(f)]
MARKED = [s for s in ALL if s.not_runnable]


def not_runnable_here() -> list[str]:
    """``FILE:LINE  why`` for every snippet marked not runnable here."""
    return [f"{s.id}  {s.not_runnable}" for s in MARKED]


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell snippet as argument lists (continuations joined, comments
    dropped, ``&&`` / ``;`` / ``|`` split)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        current: list[str] = []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def cli_arguments(command: list[str]) -> Optional[list[str]]:
    """The arguments after the program when ``command`` runs the ``sorsa-kernels`` CLI, else None."""
    if command[0] == "sorsa-kernels":
        return command[1:]
    if "sorsa_kernels.cli" in command and command.index("sorsa_kernels.cli") > 0 and \
            command[command.index("sorsa_kernels.cli") - 1] == "-m":
        return command[command.index("sorsa_kernels.cli") + 1:]  # python -m / torchrun … -m
    return None


# ---------------------------------------------------------------------- the runnable snippets
def _run_shell(snippet: Snippet, capsys) -> None:
    from sorsa_kernels.cli import main

    for command in shell_commands(snippet.code):
        args = cli_arguments(command)
        if args is None:
            pytest.fail(f"{snippet.id} runs `{' '.join(command)}`, which this test cannot run; make it a "
                        "sorsa-kernels command or mark the snippet <!-- snippet: not-runnable-here (why) -->")
        rc = main(args + BUDGET.get(args[0] if args else "", []))
        out, err = capsys.readouterr()
        assert rc == 0, f"{snippet.id}: `{' '.join(command)}` exited {rc}:\n{out[-2000:]}\n{err[-2000:]}"


def _run_python(snippet: Snippet) -> None:
    code = compile(snippet.code, snippet.id, "exec")
    exec(code, {"__name__": "__readme__"})


@pytest.mark.parametrize("file", READMES)
def test_every_runnable_snippet_runs_in_document_order(file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # outputs land in a fresh folder, as in a fresh clone
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ran = 0
    for snippet in snippets(file):
        if snippet.not_runnable:
            continue
        if snippet.language == "shell":
            _run_shell(snippet, capsys)
        else:
            _run_python(snippet)
        ran += 1
    assert ran or all(s.not_runnable for s in snippets(file))


# ---------------------------------------------------------------------- the marked ones: parse only
def _subcommands() -> dict:
    from sorsa_kernels.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices  # {name: subparser}


def _check_sorsa_kernels_flags(snippet: Snippet) -> None:
    from sorsa_kernels.cli import build_parser

    commands = _subcommands()
    for command in shell_commands(snippet.code):
        args = cli_arguments(command)
        if not args:
            continue
        assert args[0] in commands, f"{snippet.id}: sorsa-kernels has no command {args[0]!r}"
        text = build_parser().format_help() + commands[args[0]].format_help()
        for arg in args[1:]:
            flag = arg.split("=", 1)[0]
            if flag.startswith("--"):
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), \
                    f"{snippet.id}: `sorsa-kernels {args[0]} --help` lists no {flag}"


def _check_python_imports(snippet: Snippet, tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sorsa_kernels":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    importlib.import_module(f"{node.module}.{alias.name}")  # a submodule, or ImportError
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sorsa_kernels":
                    importlib.import_module(alias.name)


@pytest.mark.parametrize("snippet", MARKED, ids=[f"{s.id} ({s.not_runnable})" for s in MARKED])
def test_snippet_marked_not_runnable_here_still_parses(snippet):
    if snippet.language == "python":
        _check_python_imports(snippet, ast.parse(snippet.code, snippet.id))
        return
    proc = subprocess.run(["bash", "-n"], input=snippet.code, capture_output=True, text=True)
    assert proc.returncode == 0, f"{snippet.id}: {proc.stderr}"
    _check_sorsa_kernels_flags(snippet)


# ---------------------------------------------------------------------- the extraction itself
def test_extraction_finds_marks_and_skips_non_code_fences(tmp_path):
    (tmp_path / "R.md").write_text(
        "# t\n\n```bash\nsorsa-kernels merge --base a \\\n  --adapter b --output c  # x\n```\n\n"
        "<!-- snippet: not-runnable-here (needs a GPU) -->\n```python\nimport torch\n```\n\n"
        "```\nlayout/\n```\n")
    found = snippets("R.md", root=tmp_path)
    assert [(s.line, s.language, s.not_runnable) for s in found] == [(3, "shell", None), (9, "python", "needs a GPU")]
    assert shell_commands(found[0].code) == [["sorsa-kernels", "merge", "--base", "a", "--adapter", "b",
                                               "--output", "c"]]


def test_a_flag_missing_from_help_is_reported():
    bad = Snippet("R.md", 1, "shell", "sorsa-kernels finetune --learnig-rate 1e-3\n", "x")
    with pytest.raises(AssertionError, match="lists no --learnig-rate"):
        _check_sorsa_kernels_flags(bad)


if __name__ == "__main__":
    print("\n".join(not_runnable_here()))


# ---------------------------------------------------------------------- what the README must hold
_NOISY = ("transformers", "peft", "trl", "bitsandbytes", "datasets")  # importing them can load bitsandbytes


def _imports(code: str) -> list[str]:
    """Top-level module names the snippet imports, in order."""
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("snippet", [s for s in ALL if s.language == "python" and "sorsa_kernels" in _imports(s.code)],
                         ids=lambda s: s.id)
def test_snippets_import_sorsa_kernels_before_what_loads_bitsandbytes(snippet):
    names = _imports(snippet.code)
    first_noisy = next((i for i, n in enumerate(names) if n in _NOISY), len(names))
    assert names.index("sorsa_kernels") < first_noisy, f"{snippet.id}: import sorsa_kernels first (README: API tour)"


def test_importing_sorsa_kernels_first_keeps_bitsandbytes_cpu_kernel_warning_out():
    import sys

    code = "import sorsa_kernels\nimport peft\nfrom transformers import Trainer\nimport bitsandbytes\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "gemm_4bit_forward" not in done.stderr


def test_readme_says_what_the_bitsandbytes_cpu_kernel_warning_means_and_how_to_silence_it():
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "Failed to load CPU gemm_4bit_forward" in text and "pip uninstall kernels" in text


@pytest.mark.parametrize("section, must_use", [
    ("## Use your fine-tuned model", ("generate", "PeftModel.from_pretrained")),
    ("## Mixture-of-experts models", ("MixtralForCausalLM", "apply_sorsa")),
    ("### TRL's SFTTrainer", ("SFTTrainer", "SORSACallback", "save_adapter")),
])
def test_readme_has_the_section_with_a_snippet_that_runs_here(section, must_use):
    text = (ROOT / "README.md").read_text()
    assert section in text, f"README.md has no section {section!r}"
    start = text.count("\n", 0, text.index(section)) + 1
    following = [s for s in snippets("README.md") if s.line > start and s.language == "python"]
    assert following and following[0].not_runnable is None, f"{section}: its snippet must run in this test"
    assert all(word in following[0].code for word in must_use), following[0].code


def test_ci_test_command_installs_the_extras_the_tests_need():
    text = (ROOT / "README.md").read_text()
    command = text.split("<!-- ci:test-command -->", 1)[1].split("```", 2)[1]
    assert '".[test,real,trl]"' in command
    assert 'trl = ["trl>=' in (ROOT / "pyproject.toml").read_text()


def test_real_model_section_installs_pytest_before_running_it():
    text = (ROOT / "README.md").read_text()
    section = text.split("## A real model offline", 1)[1].split("\n## ", 1)[0]
    assert 'pip install -e ".[real,test]"' in section and "python -m pytest" in section
