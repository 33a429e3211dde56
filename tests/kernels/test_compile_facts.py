"""sm_90 compile facts of every kernel and autotune config, with the runtime's specialisation.

Runs tests/kernels/compile_facts.py (``--quick``: the bf16 training shapes, the NF4 kernels
and the regularizer) in a process without the interpreter — no GPU needed — and asserts:

* every config compiles, and fits Hopper's 227 KB of shared memory;
* no bf16 kernel spills registers (the fused GEMM above all);
* the bf16 fused GEMM uses ``wgmma`` (``HGMMA`` in SASS) in every config with a 64-row
  (warpgroup-sized) tile or more.

Run with ``-s`` to see the table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")

SMEM_LIMIT = 232448  # bytes per block on H100 (227 KB)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile_facts")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # a cold cache: ptxas really runs
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp / "facts.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "kernels", "compile_facts.py"), "--quick", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    return json.loads(out.read_text())


def test_every_config_compiles_for_sm90(facts):
    assert len(facts) > 30
    errors = [(r["kernel"], r["config"], r["error"]) for r in facts if "error" in r]
    assert not errors, errors


def test_every_config_fits_hopper_shared_memory(facts):
    over = [(r["kernel"], r["config"], r["shared"]) for r in facts if r.get("shared", 0) > SMEM_LIMIT]
    assert not over, over


# Known and accepted: the regularizer's norm kernel (one program per matrix, a few µs per
# step) spills 40 B per thread at r = 128; 16 warps spilled more (104 B).
SPILL_OK = {"_ortho_norm_kernel": 64}


def test_no_register_spills(facts):
    spills = [(r["kernel"], r["config"], r["spill_bytes"]) for r in facts
              if r.get("spill_bytes", 0) > SPILL_OK.get(r["kernel"].split("[")[0], 0)]
    assert not spills, spills
    assert all(r["registers"] > 0 for r in facts if "error" not in r)


def test_bf16_fused_gemm_uses_wgmma(facts):
    gemm = [r for r in facts if r["kernel"].startswith("_fused_residual_lowrank_gemm")
            and r["case"].startswith("bf16") and "error" not in r]
    kinds = {(r["kernel"].split("[")[0], r["kernel"].split("[")[1]) for r in gemm}
    for name in ("_fused_residual_lowrank_gemm_kernel", "_fused_residual_lowrank_gemm_tma_kernel"):
        assert {(name, "fwd,res=1]"), (name, "dx,res=1]")} <= kinds, kinds
    wide = [r for r in gemm if r["block_m"] >= 64 and r["num_warps"] % 4 == 0]
    assert wide
    missing = [(r["kernel"], r["config"]) for r in wide if not (r["wgmma"] and r["hgmma"])]
    assert not missing, missing


def test_large_m_gemm_configs_have_no_mma_sync_row_tiles(facts):
    # BLOCK_M 16/32 (mma.sync) configs are pruned at M ≥ 1024: all M = 4096 GEMM rows are wide.
    gemm = [r for r in facts if r["kernel"].startswith("_fused_residual_lowrank_gemm_kernel")
            and "M4096" in r["case"]]
    assert gemm and all(r["block_m"] >= 64 for r in gemm)
