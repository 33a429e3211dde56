"""Launching the distributed tests' worker scripts: one process, then two under torchrun (gloo, CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch.nn as nn


def process_env() -> dict[str, str]:
    """The environment of a worker: one thread, no GPU, no inherited rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def one_and_two_process_runs(d: Path, base: nn.Module, script: str, port_base: int) -> tuple[dict, dict]:
    """Save ``base`` under ``d/base``, run ``script`` (``run.py BASE OUT``) in one process and in two
    (torchrun), and return the ``result.json`` each wrote (``d/one``, ``d/two``)."""
    base.save_pretrained(d / "base")
    (d / "run.py").write_text(script)
    single = subprocess.run([sys.executable, str(d / "run.py"), str(d / "base"), str(d / "one")],
                            capture_output=True, text=True, timeout=240, env=process_env(), cwd=d)
    assert single.returncode == 0, single.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(port_base + os.getpid() % 1000), str(d / "run.py"), str(d / "base"), str(d / "two")],
        capture_output=True, text=True, timeout=300, env=process_env(), cwd=d)
    assert two.returncode == 0, two.stderr[-3000:]
    return tuple(json.loads((d / run / "result.json").read_text()) for run in ("one", "two"))
