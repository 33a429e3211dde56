"""Compile facts of every kernel and autotune config, per GPU family, with the runtime's
specialisation (tools/compile_facts.py; no GPU needed).

Three levels, kept within CI's time:

* every family (sm_75, sm_80, sm_86, sm_89, sm_90), no compile: every launch class keeps a
  config after the device prune, and where a committed table (docs/compile-facts-sm*.md)
  holds the facts of a kept config, it fits the family's shared memory and spills ≤ 256 B
  (sm_75 excepted from the spill bound: Triton emits FMA dots there, see bench/README);
* sm_90, compiled (the 16-bit quick set, the MoE experts' grouped kernels included): every
  kept config compiles, fits 227 KB, spills nothing but the accepted norm kernel, the bf16
  GEMM uses wgmma;
* sm_86, compiled: the regularizer over fp32 k×r adapters at r = 128 (once a crash on every
  99 KB card) keeps only fitting, non-spilling configs.

Run with ``-s`` to see the tables.  The full tables: ``compile_facts.py --arch A --md``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHS = (75, 80, 86, 89, 90)
SPILL_LIMIT = 256


def _run(tmp, *args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # a cold cache: ptxas really runs
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp / "facts.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "compile_facts.py"), *args, "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("compile_facts_sm90"), "--arch", "90", "--quick")


@pytest.fixture(scope="module")
def regularizer_sm86(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("compile_facts_sm86"), "--arch", "86", "--cases", "ortho fp32 7B adapters r128")


_PRUNE_SCRIPT = r"""
import json, sys
import tools.compile_facts as cf
rows = {a: cf.collect(a, quick=False, compile_kept=False) for a in (75, 80, 86, 89, 90)}
json.dump(rows, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prune")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _PRUNE_SCRIPT, str(tmp / "p.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {int(a): rows for a, rows in json.loads((tmp / "p.json").read_text()).items()}


def _limit(arch: int) -> int:
    from sorsa_kernels.kernels._launch import SMEM_PER_BLOCK

    return SMEM_PER_BLOCK[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_launch_class_keeps_a_config_after_the_device_prune(pruned, arch):
    kept, every = set(), set()
    for r in pruned[arch]:
        every.add((r["case"], r["kernel"]))
        if not r.get("pruned"):
            kept.add((r["case"], r["kernel"]))
    assert every and every == kept, sorted(every - kept)


@pytest.mark.parametrize("arch", ARCHS)
def test_kept_configs_in_the_committed_table_fit_and_do_not_spill(pruned, arch):
    path = os.path.join(ROOT, "docs", f"compile-facts-sm{arch}.md")
    if not os.path.exists(path):
        pytest.skip(f"no committed table for sm_{arch}")
    sys.path.insert(0, ROOT)
    from tools.compile_facts import parse_md

    table = {(r["case"], r["kernel"], r["config"]): r for r in parse_md(open(path).read())}
    known = [table[k] for k in ((r["case"], r["kernel"], r["config"]) for r in pruned[arch] if not r.get("pruned"))
             if k in table and "shared" in table[k]]
    assert known, f"docs/compile-facts-sm{arch}.md holds none of the kept configs: regenerate it"
    over = [(r["kernel"], r["config"], r["shared"]) for r in known if r["shared"] > _limit(arch)]
    assert not over, over
    if arch >= 80:
        spills = [(r["case"], r["kernel"], r["config"], r["spill_bytes"]) for r in known
                  if r["spill_bytes"] > SPILL_LIMIT]
        assert not spills, spills


def test_every_config_compiles_for_sm90(facts):
    kept = [r for r in facts if not r.get("pruned")]
    assert len(kept) > 30
    errors = [(r["kernel"], r["config"], r["error"]) for r in kept if "error" in r]
    assert not errors, errors


def test_every_kept_config_fits_hopper_shared_memory(facts):
    over = [(r["kernel"], r["config"], r["shared"]) for r in facts if r.get("shared", 0) > _limit(90)]
    assert not over, over


# Known and accepted: the regularizer's norm kernel (one program per matrix, a few µs per
# step) spills 40 B per thread at r = 128; 16 warps spilled more (104 B).
SPILL_OK = {"_ortho_norm_kernel": 64}


def test_no_register_spills(facts):
    spills = [(r["kernel"], r["config"], r["spill_bytes"]) for r in facts
              if r.get("spill_bytes", 0) > SPILL_OK.get(r["kernel"].split("[")[0], 0)]
    assert not spills, spills
    assert all(r["registers"] > 0 for r in facts if "shared" in r)


def test_bf16_fused_gemm_uses_wgmma(facts):
    gemm = [r for r in facts if r["kernel"].startswith("_fused_residual_lowrank_gemm")
            and r["case"].startswith("bf16") and "shared" in r]
    kinds = {(r["kernel"].split("[")[0], r["kernel"].split("[")[1].split(",")[0]) for r in gemm}
    for name in ("_fused_residual_lowrank_gemm_kernel", "_fused_residual_lowrank_gemm_tma_kernel"):
        assert {(name, "fwd"), (name, "dx")} <= kinds, kinds
    wide = [r for r in gemm if r["block_m"] >= 64 and r["num_warps"] % 4 == 0]
    assert wide
    missing = [(r["kernel"], r["config"]) for r in wide if not (r["wgmma"] and r["hgmma"])]
    assert not missing, missing


def test_large_m_gemm_configs_have_no_mma_sync_row_tiles(facts):
    # BLOCK_M 16/32 (mma.sync) configs are pruned at M ≥ 1024: all M = 4096 GEMM rows are wide.
    gemm = [r for r in facts if r["kernel"].startswith("_fused_residual_lowrank_gemm_kernel")
            and "M4096" in r["case"] and not r.get("pruned")]
    assert gemm and all(r["block_m"] >= 64 for r in gemm)


def test_fp32_regularizer_at_rank_128_fits_and_does_not_spill_on_99kb_cards(regularizer_sm86):
    kept = [r for r in regularizer_sm86 if not r.get("pruned")]
    names = {r["kernel"].split("[")[0] for r in kept}
    assert names == {"_ortho_gram_partial_kernel", "_ortho_norm_kernel", "_ortho_grad_update_kernel"}, names
    assert all("shared" in r for r in kept), kept
    over = [(r["kernel"], r["config"], r["shared"]) for r in kept if r["shared"] > _limit(86)]
    assert not over, over
    spills = [(r["kernel"], r["config"], r["spill_bytes"]) for r in kept if r["spill_bytes"] > SPILL_LIMIT]
    assert not spills, spills


@pytest.mark.parametrize("arch", ARCHS)
def test_committed_table_holds_every_kept_config_of_the_experts_classes(pruned, arch):
    # issue 29 item 22: r = 256 (the grouped weight-gradient kernel's capped rank tile) and the
    # routed experts, dense and NF4 (gather, routing multiply and scatter folded in), are compiled.
    sys.path.insert(0, ROOT)
    from tools.compile_facts import parse_md

    h = "bf16" if arch >= 80 else "fp16"
    want = {f"experts {h} M8192 E8 4096->14336 r256", f"experts routed {h} M8192 E8 4096->14336 r128",
            f"experts routed nf4 {h} M8192 E8 4096->14336 r128"}
    kept = {(r["case"], r["kernel"], r["config"]) for r in pruned[arch]
            if r["case"].startswith("experts") and not r.get("pruned")}
    assert want <= {case for case, _, _ in kept}
    table = parse_md(open(os.path.join(ROOT, "docs", f"compile-facts-sm{arch}.md")).read())
    compiled = {(r["case"], r["kernel"], r["config"]) for r in table if "shared" in r}
    assert not kept - compiled, sorted(kept - compiled)
