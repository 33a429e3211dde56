"""Compile every kernel, for every autotune config, the way the runtime specialises it, for sm_90.

Run as a script in a process *without* ``TRITON_INTERPRET`` (no GPU needed)::

    PYTHONPATH=. python tests/kernels/compile_facts.py [--quick] [--json OUT]

1. The launchers run on CPU tensors of real training shapes (Llama-7B layers, M = 4096 tokens)
   with ``Autotuner.run`` / ``JITFunction.run`` replaced by a recorder, so the exact launch
   arguments are captured (nothing runs).
2. Each launch is specialised as Triton's runtime does (``native_specialize_impl``: pointers
   and ints divisible by 16 get ``tt.divisibility=16``, ints equal to 1 become constants), and
   compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` with each config of the
   autotuner (after its ``early_config_prune`` for that launch).
3. Per kernel and config: shared memory (bytes), registers, spill bytes (ptxas ``-v`` log),
   whether the PTX has ``wgmma`` and the SASS has ``HGMMA``.

Prints a markdown table; ``--json`` writes the rows.  tests/kernels/test_compile_facts.py
runs it and asserts the facts.
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

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

#: Hopper's per-block shared memory limit (227 KB), in bytes.
SMEM_LIMIT = 232448

_captured: list = []


def _record_autotuned(self, *args, **kwargs):
    _captured.append((self, dict(zip(self.arg_names, args)), kwargs))


def _record_jit(self, *args, grid=None, warmup=False, **kwargs):
    _captured.append((self, dict(zip(self.arg_names, args)), kwargs))


def capture(fn):
    """Run ``fn()`` with kernel launches recorded instead of run; return the launches."""
    _captured.clear()
    with contextlib.ExitStack() as stack:
        for cls, name, rec in ((Autotuner, "run", _record_autotuned), (JITFunction, "run", _record_jit)):
            old = getattr(cls, name)
            setattr(cls, name, rec)
            stack.callback(setattr, cls, name, old)
        fn()
    return list(_captured)


def _jit_fn(kernel):
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


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
    fn = _jit_fn(kernel)
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
        hgmma=_sass_has_hgmma(ck.asm["cubin"]),
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


# ----------------------------------------------------------------------------- launch capture
def _sorsa_launches(M: int, n: int, m: int, r: int, cd: torch.dtype) -> list:
    from sorsa_kernels.kernels import sorsa_linear as K

    e = lambda *s, dtype=cd: torch.empty(*s, dtype=dtype)  # noqa: E731
    x, Wr, b, dy = e(M, n), e(m, n), e(m), e(M, m)
    U, S, V = e(m, r, dtype=torch.float32), e(r, dtype=torch.float32), e(n, r, dtype=torch.float32)
    u = e(M, r)
    fwd = capture(lambda: K.fused_forward(x, Wr, U, S, V, b, 1.0))
    bwd = capture(lambda: K.fused_backward(dy, x, u, Wr, U, S, V, 1.0, True))
    return fwd + bwd


def _sorsa_tma_launches(M: int, n: int, m: int, r: int, cd: torch.dtype) -> list:
    """The persistent TMA GEMM launches (Hopper-only: the device check is forced)."""
    from sorsa_kernels.kernels import residual_gemm as G

    old = G._tma_device_ok
    G._tma_device_ok = lambda device: True
    try:
        launches = _sorsa_launches(M, n, m, r, cd)
    finally:
        G._tma_device_ok = old
    return [x for x in launches if _jit_fn(x[0]).__name__ == "_fused_residual_lowrank_gemm_tma_kernel"]


def _sorsa_unsplit_skinny_launches(M: int, n: int, m: int, r: int, cd: torch.dtype) -> list:
    """The skinny kernels without split-K (K in one chunk: what large M runs on a GPU)."""
    from sorsa_kernels.kernels import sorsa_linear as K

    old = K._k_per_split
    K._k_per_split = lambda M_, K_, r_, row, device: K_
    try:
        launches = _sorsa_launches(M, n, m, r, cd)
    finally:
        K._k_per_split = old
    skinny = ("_lowrank_down_kernel", "_lowrank_up_grad_kernel")
    return [x for x in launches if _jit_fn(x[0]).__name__ in skinny]


def _nf4_launches(M: int, n: int, m: int, r: int, cd: torch.dtype) -> list:
    from sorsa_kernels.kernels import nf4_gemm
    from sorsa_kernels.quant.nf4 import quantize_nf4

    q = quantize_nf4(torch.randn(m, n) * 0.02, dtype=cd)
    e = lambda *s: torch.empty(*s, dtype=cd)  # noqa: E731
    fwd = capture(lambda: nf4_gemm.nf4_lowrank_forward(e(M, n), q.tensors(), q.shape, e(M, r), e(m, r), e(m)))
    dx = capture(lambda: nf4_gemm.nf4_lowrank_dx(e(M, m), q.tensors(), q.shape, e(M, r), e(n, r)))
    return fwd + dx


def _ortho_launches(dtype: torch.dtype) -> list:
    from sorsa_kernels.kernels import ortho_reg

    mats = []
    for k, tr in ((4096, False), (11008, False), (4096, True), (11008, True)):
        a = torch.empty((128, k) if tr else (k, 128), dtype=dtype).requires_grad_()
        a.grad = torch.empty_like(a)
        mats.append(a)
    out = capture(lambda: ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, [False, False, True, True]))
    ortho_reg.clear_cache()
    return out


def _label(kernel, args, kwargs) -> str:
    name = _jit_fn(kernel).__name__
    flags = []
    for key in ("HAS_RESIDUAL", "HAS_BIAS", "SPLIT_K", "TRANS_W", "NATIVE_DOT", "DOT_PRECISION"):
        if key in kwargs:
            flags.append(f"{key}={kwargs[key]}")
    if "a1_ptr" in args:
        flags.append("fwd" if kwargs.get("HAS_BIAS") else "dx")
        flags = [f for f in flags if not f.startswith("HAS_")] + [f"res={int(kwargs['HAS_RESIDUAL'])}"]
    return name + ("[" + ",".join(flags) + "]" if flags else "")


def collect(quick: bool = False) -> list[dict]:
    """One row per (launch, config).  ``quick``: the bf16 cases only (what the test asserts)."""
    bf = torch.bfloat16
    launches = []
    launches += [("bf16 M4096 4096x4096 r128", x) for x in _sorsa_launches(4096, 4096, 4096, 128, bf)]
    launches += [("bf16 M4096 4096x4096 r128 TMA", x) for x in _sorsa_tma_launches(4096, 4096, 4096, 128, bf)]
    launches += [("bf16 M4096 4096x4096 r128 no-split", x)
                 for x in _sorsa_unsplit_skinny_launches(4096, 4096, 4096, 128, bf)]
    launches += [("nf4 bf16 M64 4096x4096 r64", x) for x in _nf4_launches(64, 4096, 4096, 64, bf)]
    launches += [("nf4 bf16 M4096 4096x4096 r64", x) for x in _nf4_launches(4096, 4096, 4096, 64, bf)[:1]]
    launches += [("ortho bf16 7B shapes r128", x) for x in _ortho_launches(bf)]
    if not quick:
        launches += [("bf16 M4096 4096->11008 r64", x) for x in _sorsa_launches(4096, 4096, 11008, 64, bf)]
        launches += [("bf16 M64 4096x4096 r128", x) for x in _sorsa_launches(64, 4096, 4096, 128, bf)]
        launches += [("fp32 M4096 4096x4096 r128", x) for x in _sorsa_launches(4096, 4096, 4096, 128, torch.float32)]
        launches += [("ortho fp32 7B shapes r128", x) for x in _ortho_launches(torch.float32)]
    rows, seen = [], set()
    for case, (kernel, args, kwargs) in launches:
        for cfg in _configs_for(kernel, args, kwargs):
            label = _label(kernel, args, kwargs)
            key = (case, label, str(cfg))
            if key in seen:
                continue
            seen.add(key)
            row = dict(case=case, kernel=label, config=_cfg_str(cfg, kwargs))
            if cfg is not None:
                row["block_m"] = cfg.kwargs.get("BLOCK_M", args.get("BLOCK_M", kwargs.get("BLOCK_M")))
                row["num_warps"] = cfg.num_warps
            try:
                row.update(compile_one(kernel, args, kwargs, cfg))
            except Exception as exc:  # noqa: BLE001 - reported in the table
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(row)
            print(_row_md(row), file=sys.stderr, flush=True)
    return rows


def _cfg_str(cfg, kwargs) -> str:
    if cfg is None:
        return f"fixed w{kwargs.get('num_warps', 4)} s{kwargs.get('num_stages', 3)}"
    tiles = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in cfg.kwargs.items())
    return f"{tiles} w{cfg.num_warps} s{cfg.num_stages}"


HEADER = "| case | kernel | config | smem KB | regs | spill B | wgmma | HGMMA |\n|---|---|---|---|---|---|---|---|"


def _row_md(row: dict) -> str:
    if "error" in row:
        return f"| {row['case']} | {row['kernel']} | {row['config']} | ERROR {row['error']} | | | | |"
    return (f"| {row['case']} | {row['kernel']} | {row['config']} | {row['shared'] / 1024:.1f} | "
            f"{row['registers']} | {row['spill_bytes']} | {'yes' if row['wgmma'] else 'no'} | "
            f"{'yes' if row['hgmma'] else 'no'} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the bf16 cases the test asserts")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    rows = collect(a.quick)
    print(HEADER)
    for row in rows:
        print(_row_md(row))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
