"""Shared by the command-line tests: a fast budget and how to run the CLI in-process."""
from __future__ import annotations

from sorsa_kernels.cli import main

#: A fine-tuning budget that loads, trains two steps and saves, without evaluation or bars.
FAST = ("--pretrain-steps", "0", "--max-steps", "2", "--batch-size", "2", "--no-eval", "--quiet",
        "--logging-steps", "1")


def run_cli(capsys, *argv):
    """``sorsa-kernels ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err):
    """The one ``sorsa-kernels: error:`` line of a failed command (exit 1, no traceback)."""
    lines = [l for l in err.splitlines() if l.startswith("sorsa-kernels: error:")]
    assert rc == 1, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
