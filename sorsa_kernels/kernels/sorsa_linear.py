"""Fused Triton kernels for the SORSA linear layer ``y = x·Wrᵀ + scale·((x·V)·S)·Uᵀ + b``.

The math (and the oracle every kernel here is tested against) is
:func:`sorsa_kernels.ops.reference.linear_forward` / ``linear_backward``.  This file holds
the skinny low-rank kernels, the weight-gradient reductions and the two entry points
(:func:`fused_forward`, :func:`fused_backward`); the residual + low-rank GEMM they launch
(``_fused_residual_lowrank_gemm_kernel`` and its Hopper TMA form) is
:mod:`sorsa_kernels.kernels.residual_gemm`.

Forward, two launches::

    _lowrank_down_kernel                 u = x·V,  t = u·σ          (σ = scale·S, fp32)
    _fused_residual_lowrank_gemm_kernel  y = [x | t]·[Wr | U]ᵀ (+ b)

The GEMM's K loop runs over ``n`` against ``Wr`` and then over ``r`` against ``U``, so every
output tile is written once and ``x·V`` is computed once per row block, not per output tile.

Backward (``Wr`` and ``b`` frozen), four launches::

    _lowrank_up_grad_kernel              s = dy·U  →  ss = s·σ,  per-row-block Σ u⊙s (for dS)
                                         (split-K: fp32 partials of s; ss, dS formed by torch)
    _lowrank_weight_grad_kernel  (×2)    dU = dyᵀ·(u·σ),  dV = xᵀ·ss   (reductions over M)
    _fused_residual_lowrank_gemm_kernel  dx = [dy | ss]·[Wr ; Vᵀ]

``s``, ``ss`` and the ``dS`` partials come from one read of ``dy``.  Only ``x`` and ``u`` are
saved by the op.

The two skinny kernels (x·V and dy·U: an M×r output, a K = n or m long reduction) have only
cdiv(M, row tile) × rank-tile programs — 32-64 at M = 4096, r ≤ 128, under half a wave on
H100's 132 SMs.  When that grid is below two waves they split K into a fixed number of
chunks (split-K, see configs.k_per_split): each program writes an fp32 partial [split, M, r], which
the launcher sums with ``torch.sum`` before forming u, t (forward) or ss and dS (backward).

dU stays a separate launch that re-reads dy: folding dU = dyᵀ·t into the up-grad kernel's
read of dy would need an m×r fp32 dU partial per row tile (dy·U reduces over m while dU
reduces over M, so one of the two accumulators can never stay on chip) — 128 MB at
M = m = 4096, r = 128 against the 32 MB of dy it would save.

Reductions go through small fp32 partial buffers summed by ``torch.sum`` (no atomics).
Their boundaries (the dS row tile configs.UP_BLOCK_M, the dU/dV splits of configs.rows_per_split rows and
the step configs.WG_STEP_M inside a split, the skinny kernels' K chunks of configs.k_per_split columns) are
fixed by the launcher from the shapes and the SM count, never by the autotuned config, so
dU, dS and dV (and the split-K sums in u and s) are the same bits run to run and process to
process whatever config the autotuner's timing picked.

Every launch runs under a CUDA device guard on the input's device (models spread over
several GPUs).

Precision: tiles are multiplied in the compute dtype (``x.dtype``) with fp32 accumulators.
U and V are cast to it once per call by the launchers; the residual and the bias are cast
on load, as the reference casts them.  For fp32 inputs ``tl.dot`` uses TF32 unless
``torch.get_float32_matmul_precision() == "highest"`` (PyTorch's own default), in which case
it uses IEEE fp32 — the same rule ``torch.matmul`` follows for the reference.

Tuning notes
------------
The block sizes, autotune configs, their device prunes and the split heuristics are
:mod:`sorsa_kernels.kernels.sorsa_linear_configs` (untuned starting points from the Triton
matmul tutorial and NVIDIA's Hopper/Ampere guidance, to be measured with ``bench/``; sized
to each GPU's shared memory per block by the prunes).  Under ``TRITON_INTERPRET=1`` each
kernel gets one small config (16-wide tiles, rank tiles of at most 32) so the autotuner
never benchmarks and CI tests exercise multi-tile loops, several rank tiles and masks on
small shapes.

Autotune keys bucket M to the next power of two so that training with varying sequence
lengths does not re-tune on every new batch shape.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import sorsa_linear_configs as configs
from ._launch import device_guard, input_precision, m_bucket
from .residual_gemm import launch_gemm

__all__ = ["fused_forward", "fused_backward", "SUPPORTED_DTYPES"]

#: Compute dtypes the kernels accept (``x.dtype``).  float64 goes to the reference (ops/ decides).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# =============================================================================== kernels
@triton.jit
def _skinny_dot_tile(
    a_ptr, b_ptr, part_ptr, M, K, R, k_per_split, stride_am, stride_ak, stride_bk, stride_br, stride_ps, stride_pm,
    INPUT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """This program's fp32 tile of ``A·B`` (A M×K, B K×R, B cast to A's dtype on load) over its
    K chunk: grid axis 0 the row tile, 1 the rank tile, 2 the chunk of ``k_per_split`` columns.
    ``SPLIT_K``: the tile is a partial, stored here to ``part[chunk]`` (unit stride along R).
    Returns the tile, its int64 row / rank indices, its mask and the rank mask, for the
    caller's epilogue (which ``SPLIT_K`` skips: the launcher sums the partials)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R
    rm = offs_m.to(tl.int64)
    rr = offs_r.to(tl.int64)
    cdt = a_ptr.dtype.element_ty
    k_start = pid_s * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < k_end
        rk = kk.to(tl.int64)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rr[None, :] * stride_br,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(a, b.to(cdt), acc, input_precision=INPUT_PRECISION)
    mask = mask_m[:, None] & mask_r[None, :]
    if SPLIT_K:
        tl.store(part_ptr + pid_s.to(tl.int64) * stride_ps + rm[:, None] * stride_pm + rr[None, :], acc, mask=mask)
    return acc, rm, rr, mask, mask_r


@triton.autotune(configs=configs.skinny_configs(), key=["M_BUCKET", "K", "R"],
                 prune_configs_by={"early_config_prune": configs.prune_skinny_configs})
@triton.jit
def _lowrank_down_kernel(
    x_ptr, v_ptr, sigma_ptr, u_ptr, t_ptr, part_ptr,
    M, K, R, M_BUCKET, k_per_split,
    stride_xm, stride_xk,
    stride_vk, stride_vr,
    stride_um, stride_ur,
    stride_tm, stride_tr,
    stride_ps, stride_pm,
    INPUT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``u = x·V`` (M×R) and ``t = u·σ``; one program per (row tile, rank tile, K split).

    ``SPLIT_K``: grid axis 2 splits K into chunks of ``k_per_split`` (from the launcher,
    never from the config) and each program stores its fp32 partial of ``x·V`` to
    ``part[split]`` (unit stride along R); the launcher sums them and forms u and t.
    """
    acc, rm, rr, mask, mask_r = _skinny_dot_tile(
        x_ptr, v_ptr, part_ptr, M, K, R, k_per_split, stride_xm, stride_xk, stride_vk, stride_vr, stride_ps, stride_pm,
        INPUT_PRECISION, SPLIT_K, BLOCK_R, BLOCK_M, BLOCK_K)
    if not SPLIT_K:
        sigma = tl.load(sigma_ptr + rr, mask=mask_r, other=0.0).to(tl.float32)
        tl.store(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur,
                 acc.to(u_ptr.dtype.element_ty), mask=mask)
        t = acc * sigma[None, :]
        tl.store(t_ptr + rm[:, None] * stride_tm + rr[None, :] * stride_tr,
                 t.to(t_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=configs.up_grad_configs(), key=["M_BUCKET", "K", "R"],
                 prune_configs_by={"early_config_prune": configs.prune_up_grad_configs})
@triton.jit
def _lowrank_up_grad_kernel(
    dy_ptr, up_ptr, u_ptr, sigma_ptr, ss_ptr, dsp_ptr, part_ptr,
    M, K, R, M_BUCKET, k_per_split,
    stride_dym, stride_dyk,
    stride_upk, stride_upr,
    stride_um, stride_ur,
    stride_ssm, stride_ssr,
    stride_dspm,
    stride_ps, stride_pm,
    INPUT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One read of dy: ``s = dy·U`` → stores ``ss = s·σ`` and this row tile's ``Σ_rows u⊙s``.

    ``up_ptr`` is U (K×R with K = out_features); the dS partial goes to row ``pid_m`` of
    ``dsp`` (fp32), summed over row tiles by the launcher.  ``SPLIT_K``: grid axis 2 splits
    K into chunks of ``k_per_split`` (from the launcher) and each program stores only its
    fp32 partial of ``s`` to ``part[split]`` (unit stride along R); the launcher sums them
    and forms ``ss`` and dS.
    """
    s, rm, rr, mask, mask_r = _skinny_dot_tile(
        dy_ptr, up_ptr, part_ptr, M, K, R, k_per_split, stride_dym, stride_dyk, stride_upk, stride_upr, stride_ps,
        stride_pm, INPUT_PRECISION, SPLIT_K, BLOCK_R, BLOCK_M, BLOCK_K)
    if not SPLIT_K:
        sigma = tl.load(sigma_ptr + rr, mask=mask_r, other=0.0).to(tl.float32)
        ss = s * sigma[None, :]
        tl.store(ss_ptr + rm[:, None] * stride_ssm + rr[None, :] * stride_ssr,
                 ss.to(ss_ptr.dtype.element_ty), mask=mask)
        u = tl.load(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur, mask=mask, other=0.0).to(tl.float32)
        part = tl.sum(u * s, axis=0)
        tl.store(dsp_ptr + tl.program_id(0).to(tl.int64) * stride_dspm + rr, part, mask=mask_r)


@triton.autotune(configs=configs.weight_grad_configs(), key=["M_BUCKET", "K", "R"],
                 prune_configs_by={"early_config_prune": configs.prune_weight_grad_configs})
@triton.jit
def _lowrank_weight_grad_kernel(
    a_ptr, b_ptr, out_ptr,
    M, K, R, M_BUCKET, rows_per_split,
    stride_am, stride_ak,
    stride_bm, stride_br,
    stride_os, stride_ok, stride_or,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``out[split] = Σ_{rows of this split} Aᵀ·B`` (K×R, fp32): a reduction over M.

    dU: A = dy, B = t = u·σ (formed by the launcher).  dV: A = x, B = ss.  Grid axis 1
    splits M into contiguous chunks of ``rows_per_split`` rows (so small K×R outputs still
    fill the GPU); the launcher sums the fp32 partials.  ``rows_per_split`` and the step
    ``BLOCK_M`` come from the launcher, never from the autotuned config (which only picks
    the output tile ``BLOCK_K``, warps and stages), so the summation order — and the bits of
    the result — do not depend on the autotuner's choice.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_r = tl.cdiv(R, BLOCK_R)
    pid_k = pid // num_pid_r
    pid_r = pid % num_pid_r
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    rk = offs_k.to(tl.int64)
    rr = offs_r.to(tl.int64)
    cdt = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        rm = offs_m.to(tl.int64)
        # Aᵀ tile read straight from A's strides: [BLOCK_K, BLOCK_M].
        at = tl.load(a_ptr + rk[:, None] * stride_ak + rm[None, :] * stride_am,
                     mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        b = tl.load(b_ptr + rm[:, None] * stride_bm + rr[None, :] * stride_br,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(at, b.to(cdt), acc, input_precision=INPUT_PRECISION)

    out_ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + rk[:, None] * stride_ok + rr[None, :] * stride_or
    tl.store(out_ptrs, acc, mask=mask_k[:, None] & mask_r[None, :])


# =============================================================================== launchers
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_common(
    x2d: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor, name: str
) -> None:
    if x2d.dim() != 2:
        raise ValueError(f"{name} expects a 2-D input (M × in_features), got {x2d.dim()}-D with shape {tuple(x2d.shape)}")
    if x2d.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} computes in float16, bfloat16 or float32; got input dtype {_dtype_name(x2d.dtype)}"
        )
    if U.dim() != 2 or S.dim() != 1 or V.dim() != 2:
        raise ValueError(
            f"{name} expects U (out×r), S (r) and V (in×r); got shapes "
            f"{tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)}"
        )
    m, r = U.shape
    n = x2d.shape[1]
    if S.shape[0] != r or V.shape[1] != r:
        raise ValueError(
            f"rank mismatch: U has rank {r}, S has {S.shape[0]}, V has {V.shape[1]} (they must agree)"
        )
    if V.shape[0] != n:
        raise ValueError(f"V has {V.shape[0]} rows but the input has {n} features (V must be in_features × r)")
    if residual is not None and tuple(residual.shape) != (m, n):
        raise ValueError(
            f"residual has shape {tuple(residual.shape)} but U and the input need (out, in) = {(m, n)}"
        )
    for label, t in (("residual", residual), ("U", U), ("S", S), ("V", V)):
        if t is None:
            continue
        if t.device != x2d.device:
            raise ValueError(f"{label} is on {t.device} but the input is on {x2d.device}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{label} dtype {_dtype_name(t.dtype)} is not supported; allowed: float16, bfloat16, float32"
            )


def _launch_weight_grad(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``Σ_rows aᵀ·b`` (K×r) in ``dtype``, via fp32 split-M partials."""
    M, K = a.shape
    r = b.shape[1]
    block_r = configs.rank_tile(r)
    rows = configs.rows_per_split(M, K, r, a.device)
    splits = triton.cdiv(M, rows)
    part = torch.empty((splits, K, r), dtype=torch.float32, device=a.device)

    def grid(meta):
        return (triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(r, block_r), splits)

    _lowrank_weight_grad_kernel[grid](
        a, b, part,
        M, K, r, m_bucket(M), rows,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        part.stride(0), part.stride(1), part.stride(2),
        INPUT_PRECISION=input_precision(a.dtype),
        BLOCK_R=block_r, BLOCK_M=configs.WG_STEP_M,
    )
    out = part[0] if splits == 1 else part.sum(0)
    return out.to(dtype)


def fused_forward(x2d: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor,
                  bias: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """Fused SORSA forward on 2-D ``x`` (M×n): returns ``(y, u)`` with ``u = x·V`` (M×r).

    Same signature and semantics as :func:`sorsa_kernels.ops.reference.linear_forward`:
    computes in ``x.dtype`` (fp16, bf16 or fp32) with fp32 accumulation; ``residual``,
    ``U``, ``S``, ``V`` and ``bias`` may have other dtypes (the residual and the bias are
    cast on load; U and V are cast once to ``x.dtype`` here, as the reference casts them);
    ``residual=None`` computes only the low-rank branch.  Any strides are accepted.  The
    launches run on ``x``'s device (a CUDA device guard).  Called by
    :mod:`sorsa_kernels.ops.sorsa_linear`, not by users.

    Example::

        >>> y, u = fused_forward(x.reshape(-1, n), layer.residual, layer.U, layer.S, layer.V,
        ...                      layer.bias, layer.scale)
    """
    _check_common(x2d, residual, U, S, V, "fused_forward")
    M, n = x2d.shape
    m, r = U.shape
    if bias is not None:
        if tuple(bias.shape) != (m,):
            raise ValueError(f"bias has shape {tuple(bias.shape)} but the layer has {m} outputs")
        if bias.device != x2d.device:
            raise ValueError(f"bias is on {bias.device} but the input is on {x2d.device}")
    cd = x2d.dtype
    dev = x2d.device
    with device_guard(x2d):
        y = torch.empty((M, m), dtype=cd, device=dev)
        u = torch.empty((M, r), dtype=cd, device=dev)
        if M == 0:
            return y, u
        sigma = S.detach().to(torch.float32) * float(scale)  # σ = scale·S, fp32 (never fp64)
        # One cast of the r-wide adapters per call (a no-op when they are already in ``cd``),
        # instead of a cast per tile in the kernels: fp32 adapters would otherwise take fp32
        # tiles of shared memory and registers in the GEMM.
        Uc = U.detach().to(cd)
        Vc = V.detach().to(cd)
        t = torch.empty((M, r), dtype=cd, device=dev)
        block_r = configs.rank_tile(r)
        prec = input_precision(cd)

        kps, splits = configs.k_splits(M, n, r, configs.SKINNY_NOMINAL_M, dev)
        part = torch.empty((splits, M, r) if splits > 1 else (1, 1, 1), dtype=torch.float32, device=dev)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(r, block_r), splits)

        _lowrank_down_kernel[grid](
            x2d, Vc, sigma, u, t, part,
            M, n, r, m_bucket(M), kps,
            x2d.stride(0), x2d.stride(1),
            Vc.stride(0), Vc.stride(1),
            u.stride(0), u.stride(1),
            t.stride(0), t.stride(1),
            part.stride(0), part.stride(1),
            INPUT_PRECISION=prec, SPLIT_K=splits > 1, BLOCK_R=block_r,
        )
        if splits > 1:  # fixed-order fp32 sum of the K chunks, then the kernel's epilogue
            acc = part.sum(0)
            u.copy_(acc)
            t.copy_(acc * sigma)
        # y = [x | t]·[Wr | U]ᵀ: B1 = Wrᵀ (k = in index, n = out index), B2 = Uᵀ.
        b1 = (residual, residual.stride(1), residual.stride(0)) if residual is not None else None
        launch_gemm(
            x2d if residual is not None else None, b1,
            t, (Uc, Uc.stride(1), Uc.stride(0)),
            bias, y,
        )
    return y, u


def fused_backward(dy2d: Tensor, x2d: Tensor, u: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor,
                   V: Tensor, scale: float, needs_dx: bool = True) -> tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
    """Fused SORSA backward: returns ``(dx, dU, dS, dV)`` (``dx`` None unless ``needs_dx``).

    Same signature and semantics as :func:`sorsa_kernels.ops.reference.linear_backward`
    (``Wr`` frozen; the bias gradient, a plain row sum of ``dy``, is the op's); the formulas
    are :func:`sorsa_kernels.ops.reference.lowrank_backward`'s, with ``dx = [dy | ss]·[Wr ; Vᵀ]``
    in one GEMM.

    ``dy``, ``x`` and ``u`` share the compute dtype; ``dx`` is returned in it and each
    adapter gradient in its parameter's dtype.  The bits of dU, dS and dV do not depend on
    the autotuned configs (fixed reduction splits).  Launches run on ``x``'s device.

    Example::

        >>> dx, dU, dS, dV = fused_backward(dy2d, x2d, u, layer.residual, layer.U, layer.S,
        ...                                 layer.V, layer.scale, needs_dx=True)
    """
    _check_common(x2d, residual, U, S, V, "fused_backward")
    M, n = x2d.shape
    m, r = U.shape
    if dy2d.dim() != 2 or tuple(dy2d.shape) != (M, m):
        raise ValueError(f"dy has shape {tuple(dy2d.shape)} but the output is (M, out) = {(M, m)}")
    if tuple(u.shape) != (M, r):
        raise ValueError(f"u has shape {tuple(u.shape)} but x·V is (M, r) = {(M, r)}")
    for label, t in (("dy", dy2d), ("u", u)):
        if t.dtype != x2d.dtype:
            raise TypeError(
                f"{label} dtype {_dtype_name(t.dtype)} differs from the input dtype "
                f"{_dtype_name(x2d.dtype)}; they must match"
            )
        if t.device != x2d.device:
            raise ValueError(f"{label} is on {t.device} but the input is on {x2d.device}")
    cd = x2d.dtype
    dev = x2d.device
    with device_guard(x2d):
        if M == 0:  # no rows: every gradient is zero (and the kernels would get an empty grid)
            dx = torch.empty((0, n), dtype=cd, device=dev) if needs_dx else None
            return dx, torch.zeros_like(U), torch.zeros_like(S), torch.zeros_like(V)

        sigma = S.detach().to(torch.float32) * float(scale)
        Uc = U.detach().to(cd)  # cast once per call, not per tile (see fused_forward)
        block_r = configs.rank_tile(r)
        prec = input_precision(cd)

        # 1. one read of dy: ss = scale·(dy·U)·S and the per-row-tile partials of Σ u⊙(dy·U).
        #    With split-K (see configs.k_per_split) the kernel writes fp32 partials of s instead and
        #    ss and dS are formed here from their fixed-order sum.
        ss = torch.empty((M, r), dtype=cd, device=dev)
        n_row_tiles = triton.cdiv(M, configs.UP_BLOCK_M)
        kps, splits = configs.k_splits(M, m, r, configs.UP_BLOCK_M, dev)
        ds_part = torch.empty((n_row_tiles, r), dtype=torch.float32, device=dev)
        part = torch.empty((splits, M, r) if splits > 1 else (1, 1, 1), dtype=torch.float32, device=dev)
        _lowrank_up_grad_kernel[(n_row_tiles, triton.cdiv(r, block_r), splits)](
            dy2d, Uc, u, sigma, ss, ds_part, part,
            M, m, r, m_bucket(M), kps,
            dy2d.stride(0), dy2d.stride(1),
            Uc.stride(0), Uc.stride(1),
            u.stride(0), u.stride(1),
            ss.stride(0), ss.stride(1),
            ds_part.stride(0),
            part.stride(0), part.stride(1),
            INPUT_PRECISION=prec, SPLIT_K=splits > 1, BLOCK_R=block_r, BLOCK_M=configs.UP_BLOCK_M,
        )
        if splits > 1:
            s = part.sum(0)
            ss.copy_(s * sigma)
            ds_sum = (u.to(torch.float32) * s).sum(0)
        else:
            ds_sum = ds_part.sum(0)
        dS = (ds_sum * float(scale)).to(S.dtype)

        # 2. reductions over M: dU = dyᵀ·(u·σ), dV = xᵀ·ss.
        #    t = u·σ is formed here, the fp32 product of the saved u and σ rounded to the
        #    compute dtype (the same bits the kernel used to form per tile): scaling inside
        #    the kernel made its fp32 variant spill 15-85 KB per thread on sm_90 in every
        #    config (compile facts), for an M×r pass of ~3 % of the dy read beside it.
        t = (u.to(torch.float32) * sigma).to(cd)
        dU = _launch_weight_grad(dy2d, t, U.dtype)
        dV = _launch_weight_grad(x2d, ss, V.dtype)

        # 3. dx = [dy | ss]·[Wr ; Vᵀ]: B1 = Wr (k = out index, n = in index), B2 = Vᵀ.
        dx = None
        if needs_dx:
            Vc = V.detach().to(cd)
            dx = torch.empty((M, n), dtype=cd, device=dev)
            b1 = (residual, residual.stride(0), residual.stride(1)) if residual is not None else None
            launch_gemm(
                dy2d if residual is not None else None, b1,
                ss, (Vc, Vc.stride(1), Vc.stride(0)),
                None, dx,
            )
    return dx, dU, dS, dV
