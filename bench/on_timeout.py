"""pytest plugin: a SIGTERM ends the session like Ctrl-C, so that its reports are still written.

``bash bench/run_gpu.sh --budget S`` runs each step under ``timeout``, which sends SIGTERM.
Python's default SIGTERM kills the process at once: pytest-benchmark's ``--benchmark-json`` and
pytest's ``--junitxml`` are written only when the session finishes, so a step cut short would
leave nothing.  With this plugin (``-p bench.on_timeout``) SIGTERM raises ``KeyboardInterrupt``
in the main thread: pytest stops the test in progress, finishes the session and both files hold
every test that completed.  (``timeout -k`` still kills a process that does not stop.)
"""
from __future__ import annotations

import signal

import pytest


class TimedOut(KeyboardInterrupt):
    """The step's time limit ran out (SIGTERM)."""


def _interrupt(signum, frame) -> None:
    raise TimedOut(f"signal {signum}: the step's time limit ran out; results so far are written")


def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGTERM, _interrupt)
