"""The fused residual + low-rank GEMM ``C = A1·B1 + A2·B2 (+ bias)`` of the SORSA linear layer.

One K loop runs over K1 against the frozen residual and then over K2 = r against the
low-rank factor, so every output tile is written once:

    forward   y  = [x | t]·[Wr | U]ᵀ (+ b)      t = (x·V)·σ
    backward  dx = [dy | ss]·[Wr ; Vᵀ]         ss = (dy·U)·σ
    QSORSA    the same GEMM over a dequantized NF4 scratch (large M, kernels/nf4_gemm.py)

Two forms, the same result: ``_fused_residual_lowrank_gemm_kernel`` (pointer loads, any
strides and dtypes, every GPU) and, on Hopper with 16-bit row-major operands,
``_fused_residual_lowrank_gemm_tma_kernel`` (persistent tile loop over NUM_SMS programs,
tensor-descriptor / TMA loads, Triton tutorial 09).  :func:`launch_gemm` picks one.

The skinny kernels that produce ``t`` and ``ss`` and the weight-gradient reductions live in
:mod:`sorsa_kernels.kernels.sorsa_linear`, which calls :func:`launch_gemm`; the math both
are tested against is :func:`sorsa_kernels.ops.reference.linear_forward` / ``linear_backward``.

Tile configs and their device prunes are :mod:`sorsa_kernels.kernels.residual_gemm_configs`.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import residual_gemm_configs as configs
from ._launch import input_precision, m_bucket, num_sms

__all__ = ["launch_gemm"]


# =============================================================================== kernels
# The key separates forward from dx (HAS_BIAS / HAS_RESIDUAL and the B operands' layout:
# forward reads Wrᵀ and Uᵀ with unit k-stride, dx reads Wr and Vᵀ with unit n-stride), which
# would otherwise share one tuned config on a square layer.
@triton.autotune(
    configs=configs.gemm_configs(),
    key=["M_BUCKET", "N", "K1", "K2", "HAS_RESIDUAL", "HAS_BIAS", "B1_K_CONTIG", "B2_K_CONTIG"],
    prune_configs_by={"early_config_prune": configs.prune_gemm_configs},
)
@triton.jit
def _fused_residual_lowrank_gemm_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, c_ptr,
    M, N, K1, K2, M_BUCKET, B1_K_CONTIG, B2_K_CONTIG,
    stride_a1m, stride_a1k, stride_b1k, stride_b1n,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n,
    stride_cm, stride_cn,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``C = A1·B1 + A2·B2 (+ bias)``: one K loop over K1 (the frozen residual) then K2 (= r).

    Forward: A1 = x, B1 = Wrᵀ, A2 = t, B2 = Uᵀ.  Backward dx: A1 = dy, B1 = Wr, A2 = ss, B2 = Vᵀ.
    B operands of another dtype are cast to A's dtype on load; fp32 accumulation.
    ``B1_K_CONTIG`` / ``B2_K_CONTIG`` (0/1) only feed the autotune key.
    """
    # L2-friendly ordering (Triton matmul tutorial): GROUP_M row tiles share B column tiles.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rm = offs_m.to(tl.int64)
    rn = offs_n.to(tl.int64)
    rk = offs_k.to(tl.int64)
    cdt = a2_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if HAS_RESIDUAL:
        a_ptrs = a1_ptr + rm[:, None] * stride_a1m + rk[None, :] * stride_a1k
        b_ptrs = b1_ptr + rk[:, None] * stride_b1k + rn[None, :] * stride_b1n
        for k in range(0, tl.cdiv(K1, BLOCK_K)):
            k_left = K1 - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            acc = tl.dot(a.to(cdt), b.to(cdt), acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_a1k
            b_ptrs += BLOCK_K * stride_b1k

    a_ptrs = a2_ptr + rm[:, None] * stride_a2m + rk[None, :] * stride_a2k
    b_ptrs = b2_ptr + rk[:, None] * stride_b2k + rn[None, :] * stride_b2n
    for k in range(0, tl.cdiv(K2, BLOCK_K)):
        k_left = K2 - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b.to(cdt), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_a2k
        b_ptrs += BLOCK_K * stride_b2k

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(
    configs=configs.tma_gemm_configs(),
    key=["M_BUCKET", "N", "K1", "K2", "HAS_RESIDUAL", "HAS_BIAS", "B1_TRANS", "NUM_SMS"],
    prune_configs_by={"early_config_prune": configs.prune_tma_gemm_configs},
)
@triton.jit
def _fused_residual_lowrank_gemm_tma_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, c_ptr,
    M, N, K1, K2, M_BUCKET,
    stride_a1m, stride_b1, stride_a2m, stride_b2n,
    stride_cm, stride_cn,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    B1_TRANS: tl.constexpr,
    NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Persistent form of _fused_residual_lowrank_gemm_kernel with tensor-descriptor (TMA) loads.

    ``C = A1·B1 + A2·B2 (+ bias)``.  NUM_SMS programs walk the output tiles (GROUP_M
    ordering).  Every operand is row-major with a unit last stride and has the compute dtype
    (checked by the launcher).  A1 (M×K1) and A2 (M×K2) are read as they are; B2 is given as
    its N×K2 transpose (Uᵀ / Vᵀ are U / V); B1 is given as N×K1 (``B1_TRANS``, forward:
    Wrᵀ is Wr) or as K1×N (dx: Wr).  Out-of-bounds parts of a tile load as zeros (TMA).
    """
    a1_desc = tl.make_tensor_descriptor(a1_ptr, shape=[M, K1], strides=[stride_a1m, 1],
                                        block_shape=[BLOCK_M, BLOCK_K])
    if B1_TRANS:
        b1_desc = tl.make_tensor_descriptor(b1_ptr, shape=[N, K1], strides=[stride_b1, 1],
                                            block_shape=[BLOCK_N, BLOCK_K])
    else:
        b1_desc = tl.make_tensor_descriptor(b1_ptr, shape=[K1, N], strides=[stride_b1, 1],
                                            block_shape=[BLOCK_K, BLOCK_N])
    a2_desc = tl.make_tensor_descriptor(a2_ptr, shape=[M, K2], strides=[stride_a2m, 1],
                                        block_shape=[BLOCK_M, BLOCK_K])
    b2_desc = tl.make_tensor_descriptor(b2_ptr, shape=[N, K2], strides=[stride_b2n, 1],
                                        block_shape=[BLOCK_N, BLOCK_K])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    for tile in range(tl.program_id(0), num_tiles, NUM_SMS):
        group_id = tile // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
        pid_n = (tile % num_pid_in_group) // group_size_m
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_RESIDUAL:
            for k in range(0, tl.cdiv(K1, BLOCK_K)):
                a = a1_desc.load([om, k * BLOCK_K])
                if B1_TRANS:
                    b = b1_desc.load([on, k * BLOCK_K]).T
                else:
                    b = b1_desc.load([k * BLOCK_K, on])
                acc = tl.dot(a, b, acc)
        for k in range(0, tl.cdiv(K2, BLOCK_K)):
            a = a2_desc.load([om, k * BLOCK_K])
            b = b2_desc.load([on, k * BLOCK_K]).T
            acc = tl.dot(a, b, acc)
        offs_m = om + tl.arange(0, BLOCK_M)
        offs_n = on + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += bias[None, :]
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & mask_n[None, :])


# =============================================================================== launchers
@functools.lru_cache(maxsize=None)
def _tma_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def _tma_device_ok(device: torch.device) -> bool:
    """Whether the persistent TMA GEMM may run on ``device``: a Hopper GPU (sm_90; other
    generations keep the pointer GEMM until measured) and a Triton with tensor descriptors.
    Tests patch this to run the TMA kernel in the interpreter."""
    if device.type != "cuda" or not hasattr(tl, "make_tensor_descriptor"):
        return False
    return _tma_capable(device.index if device.index is not None else torch.cuda.current_device())


def _ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need Triton scratch memory: allocate it through torch
    unless the application set an allocator (Triton's is per context, hence every call)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(
            lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda")
        )


def _tma_layout(
    a1: Tensor, b1_kn: tuple[Tensor, int, int], a2: Tensor, b2_kn: tuple[Tensor, int, int], out: Tensor
) -> Optional[tuple[bool, int]]:
    """``(B1_TRANS, stride_b1)`` when every operand suits tensor descriptors, else None.

    Needs 16-bit operands of one dtype, a unit stride on the K axis of A1, A2 and B2ᵀ and on
    one axis of B1, 16-byte aligned bases and 16-byte multiple other strides.
    """
    cd = a2.dtype
    b1, s1k, s1n = b1_kn
    b2, s2k, s2n = b2_kn
    if cd not in (torch.float16, torch.bfloat16) or out.dtype != cd:
        return None
    if any(t.dtype != cd for t in (a1, b1, b2)):
        return None
    if a1.stride(1) != 1 or a2.stride(1) != 1 or s2k != 1:
        return None
    if s1k == 1:
        trans, stride_b1 = True, s1n
    elif s1n == 1:
        trans, stride_b1 = False, s1k
    else:
        return None
    esz = a2.element_size()
    if any(t.data_ptr() % 16 for t in (a1, b1, a2, b2)):
        return None
    if any((s * esz) % 16 for s in (a1.stride(0), a2.stride(0), stride_b1, s2n)):
        return None
    return trans, stride_b1


def _launch_gemm_tma(
    a1: Optional[Tensor], b1_kn: Optional[tuple[Tensor, int, int]],
    a2: Tensor, b2_kn: tuple[Tensor, int, int],
    bias: Optional[Tensor], out: Tensor,
) -> bool:
    """The persistent TMA form of :func:`launch_gemm`; False (nothing launched) if unsuitable."""
    if not _tma_device_ok(out.device):
        return False
    has_res = a1 is not None
    if not has_res:  # placeholders of the right layout, never loaded (HAS_RESIDUAL is a constexpr)
        a1, b1_kn = a2, b2_kn
    layout = _tma_layout(a1, b1_kn, a2, b2_kn, out)
    if layout is None:
        return False
    trans, stride_b1 = layout
    M, N = out.shape
    K1, K2 = a1.shape[1], a2.shape[1]
    b1, b2 = b1_kn[0], b2_kn[0]
    sms = 4 if out.device.type != "cuda" else num_sms(out.device.index or 0)
    if out.device.type == "cuda":
        _ensure_tma_allocator()

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(sms, tiles),)

    _fused_residual_lowrank_gemm_tma_kernel[grid](
        a1, b1, a2, b2, bias if bias is not None else out, out,
        M, N, K1, K2, m_bucket(M),
        a1.stride(0), stride_b1, a2.stride(0), b2_kn[2],
        out.stride(0), out.stride(1),
        HAS_RESIDUAL=has_res, HAS_BIAS=bias is not None, B1_TRANS=trans, NUM_SMS=sms,
    )
    return True


def launch_gemm(
    a1: Optional[Tensor], b1_kn: Optional[tuple[Tensor, int, int]],
    a2: Tensor, b2_kn: tuple[Tensor, int, int],
    bias: Optional[Tensor], out: Tensor, precision: Optional[str] = None,
) -> None:
    """``out = a1·B1 + a2·B2 (+ bias)``; each B given as (tensor, stride_k, stride_n).

    Also the large-M path of :mod:`sorsa_kernels.kernels.nf4_gemm` (B1 = a dequantized
    scratch), which passes its own fp32 ``precision`` rule.  On Hopper with 16-bit operands
    of a suitable layout the persistent TMA kernel runs instead (same result).
    """
    if _launch_gemm_tma(a1, b1_kn, a2, b2_kn, bias, out):
        return
    M, N = out.shape
    has_res = a1 is not None
    b2, s2k, s2n = b2_kn
    if has_res:
        b1, s1k, s1n = b1_kn
        K1 = a1.shape[1]
    else:  # placeholders, never read (HAS_RESIDUAL is a constexpr)
        a1, b1, s1k, s1n, K1 = a2, b2, 0, 0, 0
    K2 = a2.shape[1]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _fused_residual_lowrank_gemm_kernel[grid](
        a1, b1, a2, b2, bias if bias is not None else out, out,
        M, N, K1, K2, m_bucket(M), int(s1k == 1), int(s2k == 1),
        a1.stride(0), a1.stride(1), s1k, s1n,
        a2.stride(0), a2.stride(1), s2k, s2n,
        out.stride(0), out.stride(1),
        HAS_RESIDUAL=has_res, HAS_BIAS=bias is not None,
        INPUT_PRECISION=precision or input_precision(a2.dtype),
    )
