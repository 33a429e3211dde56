"""Compile every kernel, for every autotune config, the way the runtime specialises it, for a GPU family.

Run as a script in a process *without* ``TRITON_INTERPRET`` (no GPU needed)::

    PYTHONPATH=. python tools/compile_facts.py --arch 86 [--quick] [--cases A,B] [--json OUT] [--md OUT [--update]]

1. The launchers run on CPU tensors of real training shapes (Llama-7B layers, M = 4096 tokens;
   the launch classes are tools/compile_facts_cases.py)
   with ``Autotuner.run`` / ``JITFunction.run`` replaced by a recorder, so the exact launch
   arguments are captured (nothing runs), under ``compile_target(arch)``: the kernels' prunes
   and per-family choices see that GPU family's shared memory per block, as they see a real
   device's at run time.
2. Each launch is specialised as Triton's runtime does (``native_specialize_impl``: pointers
   and ints divisible by 16 get ``tt.divisibility=16``, ints equal to 1 become constants), and
   compiled with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` with each config of the
   autotuner that its ``early_config_prune`` keeps for that launch (the pruned ones are listed,
   not compiled).
3. Per kernel and config: shared memory (bytes), registers, spill bytes (ptxas ``-v`` log),
   whether the PTX has ``wgmma`` / ``mma.sync`` and the SASS has ``HGMMA``.

Prints a markdown table; ``--md`` writes the committed form (docs/compile-facts-sm*.md),
``--json`` the rows; ``--update`` replaces only the ``--cases`` launch classes' rows of an
existing ``--md`` table (a new class, or one whose configs changed, without recompiling the rest).  tests/kernels/test_compile_facts.py runs the quick set and checks the
committed tables.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from sorsa_kernels.kernels._launch import SMEM_PER_BLOCK, compile_target
from tools.compile_facts_cases import jit_function, launch_classes, selected

#: Spill bytes per thread a surviving config may have (issue 20: "non-spilling" is ≤ 256 B).
SPILL_LIMIT = 256

def _specialise(fn: JITFunction, args: dict):
    """signature, constexprs and attrs the way ``JITFunction._pack_args`` builds them."""
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = args[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = v
            continue
        ty, spec = native_specialize_impl(
            CUDABackend, v, p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs


def _ptxas_facts(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spill_st = re.findall(r"(\d+) bytes spill stores", log)
    spill_ld = re.findall(r"(\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    return dict(
        registers=int(regs[-1]) if regs else -1,
        spill_bytes=(int(spill_st[-1]) if spill_st else 0) + (int(spill_ld[-1]) if spill_ld else 0),
        stack_bytes=int(stack[-1]) if stack else 0,
    )


def _run_ptxas(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               src, "-o", os.path.join(d, "k.o")]
        return subprocess.run(cmd, capture_output=True, text=True).stderr


def _sass_has_hgmma(cubin: bytes) -> bool:
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    return "HGMMA" in out


def compile_one(kernel, args: dict, kwargs: dict, cfg, arch: int = 90) -> dict:
    fn = jit_function(kernel)
    full = {**args, **kwargs, **(cfg.kwargs if cfg is not None else {})}
    signature, constexprs, attrs = _specialise(fn, full)
    opts = {}
    if cfg is not None:
        opts.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    for k in ("num_warps", "num_stages"):
        if k in kwargs:
            opts[k] = kwargs[k]
    log = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            ck = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                target=GPUTarget("cuda", arch, 32), options=opts)
    finally:
        knobs.nvidia.dump_ptxas_log = old
    facts = _ptxas_facts(log.getvalue())
    if facts["registers"] < 0:  # a cache hit runs no ptxas: run it on the PTX ourselves
        facts = _ptxas_facts(_run_ptxas(ck.asm["ptx"], arch))
    facts.update(
        shared=int(ck.metadata.shared),
        wgmma="wgmma" in ck.asm["ptx"],
        hgmma=arch >= 90 and _sass_has_hgmma(ck.asm["cubin"]),  # HGMMA is Hopper SASS
        mma_sync="mma.sync" in ck.asm["ptx"],
    )
    return facts


def _configs_for(kernel, args: dict, kwargs: dict) -> list:
    if not isinstance(kernel, Autotuner):
        return [None]
    configs = kernel.configs
    if kernel.early_config_prune:
        configs = kernel.early_config_prune(configs, args, **kwargs)
    return configs


def _label(kernel, args, kwargs) -> str:
    name = jit_function(kernel).__name__
    flags = []
    for key in ("HAS_RESIDUAL", "HAS_BIAS", "SPLIT_K", "TRANS_W", "NATIVE_DOT", "DOT_PRECISION"):
        if key in kwargs:
            flags.append(f"{key}={kwargs[key]}")
    if "a1_ptr" in args:
        flags.append("fwd" if args.get("_phase") == "fwd" else "dx")
        flags = [f for f in flags if not f.startswith("HAS_")]
        flags += [f"res={int(kwargs.get('HAS_RESIDUAL', 1))}", f"bias={int(kwargs['HAS_BIAS'])}"]
    return name + ("[" + ",".join(flags) + "]" if flags else "")


def collect(arch: int = 90, quick: bool = False, compile_kept: bool = True, cases: str = "") -> list[dict]:
    """One row per (launch, config): the configs the prune kept (compiled, unless
    ``compile_kept`` is False) and the ones it dropped (``pruned``, not compiled).
    ``cases``: only the launch classes whose name contains one of its comma-separated parts."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    rows, seen = [], set()
    for case, thunk in launch_classes(arch, quick):
        if not selected(case, cases):
            continue
        with compile_target(arch):
            launches = thunk()
            pruned = [(kernel, args, kwargs, _configs_for(kernel, args, kwargs)) for kernel, args, kwargs in launches]
        for kernel, args, kwargs, kept in pruned:
            every = kernel.configs if isinstance(kernel, Autotuner) else [None]
            for cfg in every:
                label = _label(kernel, args, kwargs)
                key = (case, label, str(cfg))
                if key in seen:
                    continue
                seen.add(key)
                row = dict(arch=arch, case=case, kernel=label, config=_cfg_str(cfg, kwargs))
                if cfg is not None:
                    row["block_m"] = cfg.kwargs.get("BLOCK_M", args.get("BLOCK_M", kwargs.get("BLOCK_M")))
                    row["num_warps"] = cfg.num_warps
                if not any(cfg is k for k in kept):
                    row["pruned"] = True
                elif compile_kept:
                    try:
                        row.update(compile_one(kernel, args, kwargs, cfg, arch))
                    except Exception as exc:  # noqa: BLE001 - reported in the table
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                rows.append(row)
                print(_row_md(row), file=sys.stderr, flush=True)
    return rows


def _cfg_str(cfg, kwargs) -> str:
    if cfg is None:
        return f"fixed w{kwargs.get('num_warps', 4)} s{kwargs.get('num_stages', 3)}"
    tiles = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in cfg.kwargs.items())
    return f"{tiles} w{cfg.num_warps} s{cfg.num_stages}".strip()


HEADER = ("| case | kernel | config | smem KB | regs | spill B | wgmma | mma.sync | HGMMA |\n"
          "|---|---|---|---|---|---|---|---|---|")


def _row_md(row: dict) -> str:
    if row.get("pruned"):
        return f"| {row['case']} | {row['kernel']} | {row['config']} | pruned | | | | | |"
    if "error" in row:
        return f"| {row['case']} | {row['kernel']} | {row['config']} | ERROR {row['error']} | | | | | |"
    if "shared" not in row:
        return f"| {row['case']} | {row['kernel']} | {row['config']} | kept | | | | | |"
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    return (f"| {row['case']} | {row['kernel']} | {row['config']} | {row['shared'] / 1024:.1f} | "
            f"{row['registers']} | {row['spill_bytes']} | {yn(row['wgmma'])} | {yn(row['mma_sync'])} | "
            f"{yn(row['hgmma'])} |")


def parse_md(text: str) -> list[dict]:
    """The rows of a committed table (docs/compile-facts-sm*.md), as :func:`collect` made them."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 9 or cells[0] in ("case", "---") or cells[0].startswith("---"):
            continue
        row = dict(case=cells[0], kernel=cells[1], config=cells[2])
        if cells[3] == "pruned":
            row["pruned"] = True
        elif cells[3].startswith("ERROR"):
            row["error"] = cells[3][6:]
        else:
            row.update(shared=int(float(cells[3]) * 1024), registers=int(cells[4]), spill_bytes=int(cells[5]),
                       wgmma=cells[6] == "yes", mma_sync=cells[7] == "yes", hgmma=cells[8] == "yes")
        rows.append(row)
    return rows


def summary(rows: list[dict], arch: int) -> dict:
    """Configs compiled / pruned / over the shared-memory limit / spilling (> 256 B) / failed."""
    limit = SMEM_PER_BLOCK[arch]
    built = [r for r in rows if not r.get("pruned")]
    ok = [r for r in built if "error" not in r]
    return dict(
        compiled=len(built),
        pruned=sum(1 for r in rows if r.get("pruned")),
        over_limit=sum(1 for r in ok if r["shared"] > limit),
        spilling=sum(1 for r in ok if r["spill_bytes"] > SPILL_LIMIT),
        errors=len(built) - len(ok),
    )


COMMAND = "PYTHONPATH=. python tools/compile_facts.py"


def command(arch: int, quick: bool = False, cases: str = "", update: bool = False) -> str:
    """The command line that makes (``update``: adds to) the committed table for ``arch``."""
    out = f"{COMMAND} --arch {arch}{' --quick' if quick else ''}"
    if cases:
        out += f" --cases '{cases}'"
    return out + f" --md docs/compile-facts-sm{arch}.md" + (" --update" if update else "")


def made_with(text: str) -> list[str]:
    """The commands a committed table records it was made with."""
    return re.findall(r"`(" + re.escape(COMMAND) + r"[^`]*)`", text.split("\n\n|", 1)[0])


def merge_rows(old: list[dict], new: list[dict], arch: int) -> list[dict]:
    """``old`` table rows with the launch classes of ``new`` replaced by ``new``'s rows, in
    :func:`launch_classes` order (classes no longer there are dropped)."""
    fresh = {r["case"] for r in new}
    by_case: dict = {}
    for r in [r for r in old if r["case"] not in fresh] + new:
        by_case.setdefault(r["case"], []).append(r)
    return [r for case, _ in launch_classes(arch) for r in by_case.get(case, [])]


def to_markdown(rows: list[dict], arch: int, commands: list[str]) -> str:
    """The committed table (docs/compile-facts-sm{arch}.md) of ``rows``, made by ``commands``."""
    s = summary(rows, arch)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    made = "; then ".join(f"`{c}`" for c in commands)
    lines = [
        f"# sm_{arch} compile facts of every kernel and autotune config",
        "",
        f"Made with {made} (no GPU: Triton {triton.__version__}, torch {torch.__version__}, "
        f"`triton.compile` for `GPUTarget(\"cuda\", {arch}, 32)` with the runtime's specialisation, after each "
        f"autotuner's `early_config_prune` under `compile_target({arch})`, i.e. against "
        f"{SMEM_PER_BLOCK[arch] // 1024} KB of shared memory per block; ptxas `-v` for registers and spills). "
        f"`--quick` is the 16-bit training subset CI compiles; the other classes are fp16 / fp32 (`high`: tf32 "
        "dots, `highest`: IEEE), no bias, dropout, M = 64, NF4 and the regularizer over fp32 k×r adapters. "
        f"Launch classes here ({len(cases)}): {'; '.join(cases)}. `pruned` rows are configs the prune dropped "
        "for this GPU family (not compiled). tests/kernels/test_compile_facts.py checks these tables.",
        "",
        "These are compiler facts, not timings.",
        "",
        f"Configs compiled: {s['compiled']}; pruned: {s['pruned']}; over {SMEM_PER_BLOCK[arch] // 1024} KB: "
        f"{s['over_limit']}; spilling over {SPILL_LIMIT} B: {s['spilling']}; failed to compile: {s['errors']}.",
        "",
        HEADER,
    ]
    lines += [_row_md(r) for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_PER_BLOCK),
                    help="compute capability to compile for (75, 80, 86, 89, 90)")
    ap.add_argument("--quick", action="store_true", help="only the 16-bit cases the CI test compiles")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--md", help="write the committed markdown table here")
    ap.add_argument("--cases", default="",
                    help="only the launch classes whose name contains one of these comma-separated parts")
    ap.add_argument("--update", action="store_true",
                    help="replace only these launch classes' rows in the existing --md table, keep the rest")
    a = ap.parse_args()
    if a.update and not (a.md and os.path.exists(a.md)):
        ap.error("--update needs an existing --md table to add to")
    rows = collect(a.arch, a.quick, cases=a.cases)
    print(HEADER)
    for row in rows:
        print(_row_md(row))
    print(summary(rows, a.arch))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.md:
        commands = [command(a.arch, a.quick, a.cases)]
        if a.update:
            with open(a.md) as f:
                old = f.read()
            rows = merge_rows(parse_md(old), rows, a.arch)
            commands = made_with(old) + [command(a.arch, a.quick, a.cases, update=True)]
        with open(a.md, "w") as f:
            f.write(to_markdown(rows, a.arch, commands))


if __name__ == "__main__":
    main()
