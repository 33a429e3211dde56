"""The launch classes of the compile-facts tool (tools/compile_facts.py): what it compiles.

Each class is a training shape of one op (Llama-7B layers, M = 4096 tokens) whose launches are
captured on CPU tensors with ``Autotuner.run`` / ``JITFunction.run`` replaced by a recorder
(:func:`capture`), so the exact launch arguments are recorded and nothing runs.
"""
from __future__ import annotations

import contextlib

import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

__all__ = ["capture", "jit_function", "launch_classes", "selected"]

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


def jit_function(kernel):
    """The JITFunction under an Autotuner (or the kernel itself)."""
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


# ----------------------------------------------------------------------------- launch capture
def _sorsa_launches(M: int, n: int, m: int, r: int, cd: torch.dtype, *, bias: bool = True,
                    residual: bool = True) -> list:
    """fused_forward + fused_backward; ``residual=False`` is the dropout path's low-rank op."""
    from sorsa_kernels.kernels import sorsa_linear as K

    e = lambda *s, dtype=cd: torch.empty(*s, dtype=dtype)  # noqa: E731
    x, dy, u = e(M, n), e(M, m), e(M, r)
    Wr = e(m, n) if residual else None
    b = e(m) if bias else None
    U, S, V = e(m, r, dtype=torch.float32), e(r, dtype=torch.float32), e(n, r, dtype=torch.float32)
    fwd = capture(lambda: K.fused_forward(x, Wr, U, S, V, b, 1.0))
    bwd = capture(lambda: K.fused_backward(dy, x, u, Wr, U, S, V, 1.0, True))
    return [(k, {**a, "_phase": "fwd"}, kw) for k, a, kw in fwd] + [(k, {**a, "_phase": "bwd"}, kw) for k, a, kw in bwd]


def _fp32_high(thunk) -> list:
    """``thunk()`` under ``torch.set_float32_matmul_precision("high")`` (fp32 with tf32 dots)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        return thunk()
    finally:
        torch.set_float32_matmul_precision(old)


def _sorsa_tma_launches(M: int, n: int, m: int, r: int, cd: torch.dtype) -> list:
    """The persistent TMA GEMM launches (Hopper-only: the device check is forced)."""
    from sorsa_kernels.kernels import residual_gemm as G

    old = G._tma_device_ok
    G._tma_device_ok = lambda device: True
    try:
        launches = _sorsa_launches(M, n, m, r, cd)
    finally:
        G._tma_device_ok = old
    return [x for x in launches if jit_function(x[0]).__name__ == "_fused_residual_lowrank_gemm_tma_kernel"]


def _sorsa_unsplit_skinny_launches(M: int, n: int, m: int, r: int, cd: torch.dtype) -> list:
    """The skinny kernels without split-K (K in one chunk: what large M runs on a GPU)."""
    from sorsa_kernels.kernels import sorsa_linear_configs as C

    old = C.k_per_split
    C.k_per_split = lambda M_, K_, r_, row, device: K_
    try:
        launches = _sorsa_launches(M, n, m, r, cd)
    finally:
        C.k_per_split = old
    skinny = ("_lowrank_down_kernel", "_lowrank_up_grad_kernel")
    return [x for x in launches if jit_function(x[0]).__name__ in skinny]


def _nf4_launches(M: int, n: int, m: int, r: int, cd: torch.dtype) -> list:
    from sorsa_kernels.kernels import nf4_gemm
    from sorsa_kernels.quant.nf4 import quantize_nf4

    q = quantize_nf4(torch.randn(m, n) * 0.02, dtype=cd)
    e = lambda *s: torch.empty(*s, dtype=cd)  # noqa: E731
    fwd = capture(lambda: nf4_gemm.nf4_lowrank_forward(e(M, n), q.tensors(), q.shape, e(M, r), e(m, r), e(m)))
    dx = capture(lambda: nf4_gemm.nf4_lowrank_dx(e(M, m), q.tensors(), q.shape, e(M, r), e(n, r)))
    return fwd + dx


def _ortho_launches(dtype: torch.dtype, r: int = 128, adapters: bool = False) -> list:
    """The regularizer over the 7B shapes.  ``adapters``: every matrix stored k×r (U m×r,
    V n×r), as ``add_regularizer_grad`` passes a model's adapters; else a mixed set with
    r×k matrices (``transposed``) too."""
    from sorsa_kernels.kernels import ortho_reg

    mats, flags = [], []
    shapes = (((4096, False), (4096, False), (11008, False), (4096, False), (4096, False), (11008, False))
              if adapters else ((4096, False), (11008, False), (4096, True), (11008, True)))
    for k, tr in shapes:
        a = torch.empty((r, k) if tr else (k, r), dtype=dtype).requires_grad_()
        a.grad = torch.empty_like(a)
        mats.append(a)
        flags.append(tr)
    out = capture(lambda: ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, None if adapters else flags))
    ortho_reg.clear_cache()
    return out


def _experts_launches(M: int, E: int, n: int, m: int, r: int, cd: torch.dtype) -> list:
    """grouped_forward + grouped_backward of a MoE layer's experts (kernels/grouped_sorsa.py):
    M routed rows spread evenly over E experts, fp32 adapters, a frozen residual, no bias."""
    from sorsa_kernels.kernels import grouped_sorsa as K

    e = lambda *s, dtype=cd: torch.empty(*s, dtype=dtype)  # noqa: E731
    counts = torch.full((E,), M // E, dtype=torch.int64)
    x, dy, u = e(M, n), e(M, m), e(M, r)
    res = e(E, m, n)
    U, S, V = e(E, m, r, dtype=torch.float32), e(E, r, dtype=torch.float32), e(E, n, r, dtype=torch.float32)
    fwd = capture(lambda: K.grouped_forward(x, counts, res, U, S, V, None, 1.0))
    bwd = capture(lambda: K.grouped_backward(dy, x, u, counts, res, U, S, V, 1.0, True))
    return [(k, {**a, "_phase": "fwd"}, kw) for k, a, kw in fwd] + [(k, {**a, "_phase": "bwd"}, kw) for k, a, kw in bwd]


def _routed_experts_launches(M: int, E: int, n: int, m: int, r: int, cd: torch.dtype, nf4: bool = False) -> list:
    """The routed (gather / routing multiply / scatter folded in) experts launches; ``nf4``: an NF4
    residual stack (kernels/grouped_nf4.py), its tensors empty (nothing runs, only shapes count)."""
    from sorsa_kernels.kernels import grouped_sorsa as K

    e = lambda *s, dtype=cd: torch.empty(*s, dtype=dtype)  # noqa: E731
    counts = torch.full((E,), M // E, dtype=torch.int64)
    x, dy, u = e(M // 2, n), e(M, m), e(M, r)  # top-2: M grouped rows read M / 2 token rows
    tok, slots, row_w = torch.arange(M) // 2, torch.arange(M), torch.empty(M, dtype=torch.float32)
    res = e(E, m, n)
    if nf4:
        from sorsa_kernels.kernels.grouped_nf4 import NF4Experts

        blocks = m * n // 64
        f = torch.float32
        res = NF4Experts((torch.empty(E, m * n // 2, dtype=torch.uint8), torch.empty(E, blocks, dtype=torch.uint8),
                          e(E, blocks // 256, dtype=f), e(256, dtype=f), e(E, dtype=f), e(16, dtype=f)), (m, n))
    U, S, V = e(E, m, r, dtype=torch.float32), e(E, r, dtype=torch.float32), e(E, n, r, dtype=torch.float32)
    fwd = capture(lambda: K.grouped_forward(x, counts, res, U, S, V, None, 1.0, K.RowMap(tok, row_w, slots), M))
    bwd = capture(lambda: K.grouped_backward(dy, x, u, counts, res, U, S, V, 1.0, True, tok,
                                             K.RowMap(tok, row_w, None)))
    return [(k, {**a, "_phase": "fwd"}, kw) for k, a, kw in fwd] + [(k, {**a, "_phase": "bwd"}, kw) for k, a, kw in bwd]


def launch_classes(arch: int, quick: bool = False) -> list:
    """``(case, thunk)`` per launch class compiled for ``arch``; ``thunk()`` captures its launches.

    ``quick``: the 16-bit training subset the CI test compiles (bf16, fp16 on sm_75 which has
    no bf16), the TMA GEMM on sm_90, NF4 and the regularizer.
    """
    h = torch.bfloat16 if arch >= 80 else torch.float16
    hn = "bf16" if arch >= 80 else "fp16"
    f32 = torch.float32
    out = [
        (f"{hn} M4096 4096x4096 r128", lambda: _sorsa_launches(4096, 4096, 4096, 128, h)),
        (f"{hn} M4096 4096x4096 r128 no-split", lambda: _sorsa_unsplit_skinny_launches(4096, 4096, 4096, 128, h)),
        (f"nf4 {hn} M64 4096x4096 r64", lambda: _nf4_launches(64, 4096, 4096, 64, h)),
        (f"nf4 {hn} M4096 4096x4096 r64", lambda: _nf4_launches(4096, 4096, 4096, 64, h)[:1]),
        (f"ortho {hn} 7B mixed r128", lambda: _ortho_launches(h)),
        (f"experts {hn} M8192 E8 4096->14336 r128", lambda: _experts_launches(8192, 8, 4096, 14336, 128, h)),
    ]
    if arch == 90:
        out.insert(1, (f"{hn} M4096 4096x4096 r128 TMA", lambda: _sorsa_tma_launches(4096, 4096, 4096, 128, h)))
    if quick:
        return out
    out += [
        (f"{hn} M4096 4096->11008 r64", lambda: _sorsa_launches(4096, 4096, 11008, 64, h)),
        (f"{hn} M64 4096x4096 r128", lambda: _sorsa_launches(64, 4096, 4096, 128, h)),
        (f"{hn} M4096 4096x4096 r128 no-bias", lambda: _sorsa_launches(4096, 4096, 4096, 128, h, bias=False)[:2]),
        (f"{hn} M4096 4096x4096 r128 dropout", lambda: _sorsa_launches(4096, 4096, 4096, 128, h, bias=False,
                                                                         residual=False)),
        ("fp32-highest M4096 4096x4096 r128", lambda: _sorsa_launches(4096, 4096, 4096, 128, f32)),
        ("fp32-high M4096 4096x4096 r128", lambda: _fp32_high(lambda: _sorsa_launches(4096, 4096, 4096, 128, f32))),
        ("nf4 fp32 M64 4096x4096 r64", lambda: _nf4_launches(64, 4096, 4096, 64, f32)),
        ("nf4 fp32 M4096 4096x4096 r64", lambda: _nf4_launches(4096, 4096, 4096, 64, f32)[:1]),
        (f"ortho {hn} 7B adapters r128", lambda: _ortho_launches(h, 128, adapters=True)),
        ("ortho fp32 7B adapters r128", lambda: _ortho_launches(f32, 128, adapters=True)),
        ("ortho fp32 7B adapters r256", lambda: _ortho_launches(f32, 256, adapters=True)),
        (f"experts {hn} M8192 E8 4096->14336 r256", lambda: _experts_launches(8192, 8, 4096, 14336, 256, h)),
        (f"experts routed {hn} M8192 E8 4096->14336 r128",
         lambda: _routed_experts_launches(8192, 8, 4096, 14336, 128, h)),
        (f"experts routed nf4 {hn} M8192 E8 4096->14336 r128",
         lambda: _routed_experts_launches(8192, 8, 4096, 14336, 128, h, nf4=True)),
        ("experts fp32-high M8192 E8 4096->14336 r128", lambda: _fp32_high(
            lambda: _experts_launches(8192, 8, 4096, 14336, 128, f32))),
    ]
    if arch >= 80:  # sm_75 has no bf16: the 16-bit cases above are already fp16
        out.insert(0, ("fp16 M4096 4096x4096 r128", lambda: _sorsa_launches(4096, 4096, 4096, 128, torch.float16)))
        out.append(("nf4 fp16 M64 4096x4096 r64", lambda: _nf4_launches(64, 4096, 4096, 64, torch.float16)))
    return out


def selected(case: str, cases: str) -> bool:
    """Whether launch class ``case`` is named by ``cases`` (comma-separated name parts; "" names all)."""
    return any(part.strip() in case for part in cases.split(","))
