"""Grouped, fused orthonormal-regularizer gradient over every adapter matrix of a model.

For each matrix ``A_i`` (viewed as k×r; a matrix stored r×k is read through swapped strides
when its ``transposed`` flag is set) the three launches below compute, in float32::

    G_i = A_iᵀA_i − I              (launch 1 partial Grams over k-chunks, launch 2 sums them)
    n_i = ‖G_i‖_F                  (launch 2)
    A_i.grad += c·2·A_i·G_i / n_i  (launch 3, c = coeff / N; the update is 0 where n_i = 0)
    value = mean_i n_i             (launch 3, one extra program; a device scalar, no sync)

so a whole 7B model (448 matrices) costs three launches instead of thousands.  The math is
:func:`sorsa_kernels.ops.reference.ortho_value_and_grad_`; this file only makes it fast.

How the matrices reach the kernels: one int64 *matrix table* holds, per matrix, the raw
addresses of the parameter and of its ``.grad`` (``data_ptr()``), its shape, the stride of
its non-unit axis, and a code for (dtype, which axis is contiguous).  Kernels cast the
addresses with ``.to(tl.pointer_type(...))``.  This works in compiled Triton and in the
interpreter (there, CPU ``data_ptr()`` values are plain host addresses).  Each kernel
branches on the per-matrix code; which codes occur is passed as a ``tl.constexpr`` bitmask
so that only the branches a model needs are compiled (a SORSA model with all-bf16,
row-major adapters compiles exactly one).  Loads inside a branch know which axis is
contiguous, so the compiler can still vectorize them.  Two *work tables* list the
programs of launches 1 and 3 (ragged shapes make a flat grid the simplest balanced one).

The tables, the Gram workspace and two per-matrix float32 vectors are built once per set of
matrices and cached (at most _MAX_PLANS sets, least recently used dropped).  The cache key is
what the plan's shape depends on: the parameters (addresses, shapes, strides, dtypes,
``transposed`` flags) and the strides and dtypes of their ``.grad`` — not the ``.grad``
addresses, which change every step under ``zero_grad(set_to_none=True)``: a hit whose grads
moved only rewrites the table's grad-address column (one small host-to-device copy from
pinned memory, no synchronization, no rebuild).

The k-split is a two-phase reduction (partials, then a per-matrix sum) rather than
atomics, and both its chunk size (``k_chunk``) and the step inside a chunk (``gram_step_k``
of configs.fixed_launch_params, per GPU family and precision) are fixed — the autotuner
picks only warps and stages — so the result is bit-for-bit reproducible whichever config
the autotuner picked, and nothing has to be zeroed between steps.

Precision: every accumulator is float32.  Sets with a float32 matrix use ``tf32x3`` dots
(three tensor-core tf32 products per dot, about float32 accuracy: the reference uses full
fp32 matmuls and G − I cancels almost everything when A is near-orthonormal).  Sets of
16-bit matrices use ``tf32`` dots on upcast values, which is exact for the Gram products (a
bf16 or fp16 value fits in tf32's 10-bit mantissa), and — on a GPU, when every matrix has
the same 16-bit dtype — the Gram dot takes the bf16/fp16 tiles directly (also exact
products, twice the tensor-core rate).  The update ``A·D`` keeps tf32 for 16-bit sets (a
bf16 dot would round the fp32 ``D = G − I`` to 8 bits).  The interpreter always upcasts
(its bf16 ``tl.dot`` is wrong).

Not safe to call concurrently on two CUDA streams with the same set of matrices: the cached
workspace is shared.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import ortho_reg_configs as configs
from ._launch import INTERPRET, device_guard, device_target
from .ortho_reg_configs import DEFAULT_K_CHUNK

__all__ = ["grouped_ortho_value_and_grad_", "clear_cache", "DEFAULT_K_CHUNK"]

# Per-matrix codes: dtype index × 2 + (1 if the k axis is the contiguous one else 0).  The
# kernels unroll one branch per code (``tl.static_range(6)``; code c has dtype float32,
# float16 or bfloat16 for c // 2 = 0, 1, 2 and its k axis contiguous when c is odd) and keep
# those the set holds (a constexpr bitmask), so a set of one dtype compiles one branch.
_DTYPE_INDEX = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Matrix-table columns (int64), read by the kernels at these offsets:
#   0 address of A   1 address of A.grad   2 k   3 r   4 A's non-unit stride   5 the grad's
#   6 A's code   7 the grad's code   8 workspace offset (floats)   9 k-chunks   10 r-tiles
#   11 unused (rows of 12 keep each row 32-byte aligned)
_TABLE_COLS = 12


# --------------------------------------------------------------------------- kernels
@triton.jit
def _typed_ptr(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The int64 address ``addr`` as a ``DTYPE*``; with ALIGNED, tell the compiler it is
    16-byte aligned (the hint must follow the cast: int_to_ptr drops what is known)."""
    ptr = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _table_row(table_ptr, mat, TABLE_COLS: tl.constexpr):
    """Matrix ``mat``'s row of the table (the column layout above _TABLE_COLS): ``(a_addr,
    g_addr, k, r, a_stride, g_stride, a_code, g_code, ws_off, n_chunks, n_tiles)``; a kernel
    that does not use a column does not load it (the compiler drops unused loads)."""
    row = table_ptr + mat * TABLE_COLS
    ws_off = tl.multiple_of(tl.load(row + 8), 256)  # host lays matrices out 256 floats apart
    return (tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), ws_off, tl.load(row + 9), tl.load(row + 10))


@triton.jit
def _gram_partial_tile(
    a_ptr, stride, k_lo, k_hi, r, ri, rj,
    BLOCK_K: tl.constexpr, K_CONTIG: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    """Σ over rows k_lo ≤ p < k_hi of a[p, ri]ᵀ·a[p, rj] (a BLOCK_R × BLOCK_R fp32 tile).

    a[p, j] lives at ``a_ptr + p + j·stride`` when K_CONTIG, else ``a_ptr + p·stride + j``.
    NATIVE_DOT multiplies the tiles in their own (16-bit) dtype, else upcast to fp32.
    """
    acc = tl.zeros((ri.shape[0], rj.shape[0]), dtype=tl.float32)
    mi = ri < r
    mj = rj < r
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < k_hi
        if K_CONTIG:
            at = tl.load(a_ptr + ri[:, None] * stride + kk[None, :], mask=mi[:, None] & mk[None, :], other=0.0)
            aj = tl.load(a_ptr + kk[:, None] + rj[None, :] * stride, mask=mk[:, None] & mj[None, :], other=0.0)
        else:
            at = tl.load(a_ptr + kk[None, :] * stride + ri[:, None], mask=mi[:, None] & mk[None, :], other=0.0)
            aj = tl.load(a_ptr + kk[:, None] * stride + rj[None, :], mask=mk[:, None] & mj[None, :], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(at, aj, acc)
        else:
            acc = tl.dot(at.to(tl.float32), aj.to(tl.float32), acc, input_precision=DOT_PRECISION)
    return acc


@triton.autotune(configs=configs.gram_configs(), key=["BLOCK_R", "COMBOS", "DOT_PRECISION", "ALIGNED", "NATIVE_DOT"],
                 prune_configs_by={"early_config_prune": configs.prune_gram_configs})
@triton.jit
def _ortho_gram_partial_kernel(
    table_ptr, items_ptr, ws_ptr, k_chunk,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, COMBOS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGNED: tl.constexpr, TABLE_COLS: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    """Launch 1: one program = (matrix, Gram tile ti ≤ tj, k-chunk) → one partial tile.

    The partial goes to ``ws[off + chunk·P² + rows·P + cols]`` with P = n_tiles·BLOCK_R;
    the workspace is padded to whole tiles, so the store needs no mask (padding is 0).
    """
    pid = tl.program_id(0)
    mat = tl.load(items_ptr + pid * 4 + 0).to(tl.int64)
    ti = tl.load(items_ptr + pid * 4 + 1).to(tl.int64)
    tj = tl.load(items_ptr + pid * 4 + 2).to(tl.int64)
    chunk = tl.load(items_ptr + pid * 4 + 3).to(tl.int64)
    addr, _, k, r, stride, _, code, _, ws_off, _, n_tiles = _table_row(table_ptr, mat, TABLE_COLS)
    k_lo = chunk * k_chunk
    k_hi = tl.minimum(k, k_lo + k_chunk)
    if ALIGNED:  # host-checked: strides, k, r and k_chunk are multiples of 8 (see _build_plan)
        stride = tl.multiple_of(stride, 8)
        r = tl.multiple_of(r, 8)
        k_hi = tl.multiple_of(k_hi, 8)
    ri = ti * BLOCK_R + tl.arange(0, BLOCK_R)
    rj = tj * BLOCK_R + tl.arange(0, BLOCK_R)

    acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for c in tl.static_range(6):  # one branch per (dtype, layout) code the set holds
        if COMBOS & (1 << c):
            if code == c:
                a_ptr = _typed_ptr(addr, tl.float32 if c < 2 else tl.float16 if c < 4 else tl.bfloat16, ALIGNED)
                acc = _gram_partial_tile(a_ptr, stride, k_lo, k_hi, r, ri, rj, BLOCK_K, c % 2 == 1, DOT_PRECISION,
                                         NATIVE_DOT)

    P = n_tiles * BLOCK_R
    dst = ws_ptr + ws_off + chunk * P * P + ri[:, None] * P + rj[None, :]
    tl.store(dst, acc)


@triton.jit
def _ortho_norm_kernel(
    table_ptr, ws_ptr, norms_ptr, scales_ptr, coeff,
    BLOCK_R: tl.constexpr, TABLE_COLS: tl.constexpr,
):
    """Launch 2: one program per matrix.  Sums the chunk partials of each upper tile, subtracts
    I, writes D = G − I (both triangles) over chunk 0, and stores ‖D‖_F and the update scale
    ``2·coeff/‖D‖_F`` (0 where ‖D‖_F = 0, so an exactly orthonormal matrix gets no update and
    no NaN).  All workspace accesses are in-bounds by construction (padded whole tiles).
    """
    mat = tl.program_id(0).to(tl.int64)
    _, _, _, r, _, _, _, _, ws_off, n_chunks, n_tiles = _table_row(table_ptr, mat, TABLE_COLS)
    P = n_tiles * BLOCK_R
    base = ws_ptr + ws_off
    offs = tl.arange(0, BLOCK_R)
    # Row sums of the squares (a vector, not a tile: a 128×128 fp32 tile here spilled 836 B
    # per thread on sm_90 beside the tiles being summed, compile facts).
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for ti in range(0, n_tiles):
        ri = ti * BLOCK_R + offs
        for tj in range(ti, n_tiles):
            rj = tj * BLOCK_R + offs
            tile = ri[:, None] * P + rj[None, :]
            g = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
            for c in range(0, n_chunks):
                g += tl.load(base + c * P * P + tile)
            eye = (ri[:, None] == rj[None, :]) & (ri[:, None] < r)
            d = g - tl.where(eye, 1.0, 0.0)
            weight = tl.where(ti == tj, 1.0, 2.0)  # an off-diagonal tile stands for two
            sq += tl.sum(weight * d * d, axis=1)
            tl.store(base + tile, d)
            if ti != tj:  # mirror into the lower triangle for launch 3
                tl.store(base + rj[None, :] * P + ri[:, None], d)
    norm = tl.sqrt(tl.sum(sq, axis=0))
    safe = tl.where(norm > 0.0, norm, 1.0)
    scale = tl.where(norm > 0.0, 2.0 * tl.cast(coeff, tl.float32) / safe, 0.0)
    tl.store(norms_ptr + mat, norm)
    tl.store(scales_ptr + mat, scale)


@triton.jit
def _a_times_d_tile(
    a_ptr, stride, k, r, rows, cols, d_ptr, P, n_tiles,
    BLOCK_R: tl.constexpr, R_STEP: tl.constexpr, K_CONTIG: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """a[rows, :]·D[:, cols] in fp32, looping over the r axis R_STEP columns at a time."""
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    mrow = rows < k
    for r0 in range(0, n_tiles * BLOCK_R, R_STEP):
        ri = r0 + tl.arange(0, R_STEP)
        mask = mrow[:, None] & (ri < r)[None, :]
        if K_CONTIG:
            a = tl.load(a_ptr + rows[:, None] + ri[None, :] * stride, mask=mask, other=0.0)
        else:
            a = tl.load(a_ptr + rows[:, None] * stride + ri[None, :], mask=mask, other=0.0)
        d = tl.load(d_ptr + ri[:, None] * P + cols[None, :])  # padded tiles: in bounds
        acc = tl.dot(a.to(tl.float32), d, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _add_to_grad_tile(g_ptr, stride, k, r, rows, cols, update, K_CONTIG: tl.constexpr):
    """grad[rows, cols] = grad + update, added in fp32 and stored in the grad's dtype."""
    mask = (rows < k)[:, None] & (cols < r)[None, :]
    if K_CONTIG:
        ptrs = g_ptr + rows[:, None] + cols[None, :] * stride
    else:
        ptrs = g_ptr + rows[:, None] * stride + cols[None, :]
    g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (g + update).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ortho_grad_update_kernel(
    table_ptr, items_ptr, ws_ptr, norms_ptr, scales_ptr, value_ptr, n_items, n_mats,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, R_STEP: tl.constexpr,
    COMBOS: tl.constexpr, G_COMBOS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGNED: tl.constexpr, TABLE_COLS: tl.constexpr,
    MEAN_BLOCK: tl.constexpr,
):
    """Launch 3: one program = (matrix, block of BLOCK_K rows, column tile tj) adds
    ``scale_i·A[rows]·D[:, cols]`` to ``grad[rows, cols]``.  Program ``n_items`` instead writes
    the mean of the norms to ``value_ptr`` (launch 2 has finished, so all norms are there).
    """
    pid = tl.program_id(0)
    if pid == n_items:
        total = tl.zeros((MEAN_BLOCK,), dtype=tl.float32)
        for start in range(0, n_mats, MEAN_BLOCK):
            idx = start + tl.arange(0, MEAN_BLOCK)
            total += tl.load(norms_ptr + idx, mask=idx < n_mats, other=0.0)
        tl.store(value_ptr, tl.sum(total, axis=0) / n_mats)
    else:
        mat = tl.load(items_ptr + pid * 3 + 0).to(tl.int64)
        kb = tl.load(items_ptr + pid * 3 + 1).to(tl.int64)
        tj = tl.load(items_ptr + pid * 3 + 2).to(tl.int64)
        (a_addr, g_addr, k, r, a_stride, g_stride, a_code, g_code, ws_off, _,
         n_tiles) = _table_row(table_ptr, mat, TABLE_COLS)
        if ALIGNED:  # host-checked: strides, k and r are multiples of 8 (see _build_plan)
            a_stride = tl.multiple_of(a_stride, 8)
            g_stride = tl.multiple_of(g_stride, 8)
            k = tl.multiple_of(k, 8)
            r = tl.multiple_of(r, 8)
        P = n_tiles * BLOCK_R
        d_ptr = ws_ptr + ws_off
        rows = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = tj * BLOCK_R + tl.arange(0, BLOCK_R)

        acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
        for c in tl.static_range(6):  # one branch per (dtype, layout) code the set holds
            if COMBOS & (1 << c):
                if a_code == c:
                    a_ptr = _typed_ptr(a_addr, tl.float32 if c < 2 else tl.float16 if c < 4 else tl.bfloat16, ALIGNED)
                    acc = _a_times_d_tile(a_ptr, a_stride, k, r, rows, cols, d_ptr, P, n_tiles, BLOCK_R, R_STEP,
                                          c % 2 == 1, DOT_PRECISION)

        update = acc * tl.load(scales_ptr + mat)
        for c in tl.static_range(6):
            if G_COMBOS & (1 << c):
                if g_code == c:
                    g_ptr = _typed_ptr(g_addr, tl.float32 if c < 2 else tl.float16 if c < 4 else tl.bfloat16, ALIGNED)
                    _add_to_grad_tile(g_ptr, g_stride, k, r, rows, cols, update, c % 2 == 1)


# --------------------------------------------------------------------------- launch wrappers
class _Plan:
    """Everything the three launches need for one set of matrices (built once, cached)."""

    __slots__ = (
        "table", "gram_items", "update_items", "ws", "norms", "scales", "block_r",
        "k_chunk", "combos", "g_combos", "dot_precision", "native_dot", "aligned", "n_mats",
        "grad_ptrs", "grad_ptrs_host",
    )


_PLANS: "OrderedDict[tuple, _Plan]" = OrderedDict()
_MAX_PLANS = 8  # a training run needs one; a few more cover evaluation or a second model
_plan_builds = 0  # how many plans were built (tests read it to check the cache)


def _layout(shape: tuple[int, int], strides: tuple[int, int], transposed: bool, what: str) -> tuple[int, int]:
    """(1 if the k axis is contiguous else 0, stride of the other axis) for a k×r view."""
    (k, r), (sk, sr) = (shape[::-1], strides[::-1]) if transposed else (shape, strides)
    if r <= 1 or sr == 1:
        return 0, (sk if k > 1 else 0)
    if k <= 1 or sk == 1:
        return 1, (sr if r > 1 else 0)
    raise ValueError(
        f"{what} has strides {tuple(strides)} for shape {tuple(shape)}; the Triton regularizer "
        "needs one axis with stride 1 (make the tensor contiguous)"
    )


def _check(mats: Sequence[Tensor], transposed: Optional[Sequence[bool]]) -> list[bool]:
    if len(mats) == 0:
        raise ValueError("the regularizer needs at least one adapter matrix")
    tr = [False] * len(mats) if transposed is None else [bool(t) for t in transposed]
    if len(tr) != len(mats):
        raise ValueError(f"transposed has {len(tr)} flags for {len(mats)} matrices; give one per matrix")
    device = mats[0].device
    for i, a in enumerate(mats):
        if a.dim() != 2:
            raise ValueError(f"matrix {i} has shape {tuple(a.shape)}; adapter matrices must be 2-D")
        if a.dtype not in _DTYPE_INDEX:
            raise TypeError(
                f"matrix {i} has dtype {a.dtype}; the Triton regularizer supports float32, float16 "
                "and bfloat16"
            )
        if a.device != device:
            raise ValueError(f"matrix {i} is on {a.device} but matrix 0 is on {device}; all must share a device")
    return tr


def _build_plan(mats: Sequence[Tensor], tr: Sequence[bool], k_chunk: int, block_r: Optional[int]) -> _Plan:
    global _plan_builds
    device = mats[0].device
    dims = [(a.shape[1], a.shape[0]) if t else (a.shape[0], a.shape[1]) for a, t in zip(mats, tr)]
    max_r = max(r for _, r in dims)
    if block_r is None:
        # One tile covers r ≤ 128 (the usual SORSA ranks): A is read once per k-block.
        block_r = min(128, max(16, triton.next_power_of_2(max_r)))
    rows, gram_items, update_items = [], [], []
    combos = g_combos = 0
    # ALIGNED lets the kernels issue 16-byte vector loads: every address 16-byte aligned and
    # every stride, k, r and k_chunk a multiple of 8 elements (so masks are constant over 8).
    aligned = k_chunk % 8 == 0
    ws_size = 0
    any_fp32 = False
    _check_distinct_grads(mats)
    for i, (a, t, (k, r)) in enumerate(zip(mats, tr, dims)):
        g = a.grad
        a_contig, a_stride = _layout(tuple(a.shape), a.stride(), t, f"matrix {i}")
        g_contig, g_stride = _layout(tuple(g.shape), g.stride(), t, f"the .grad of matrix {i}")
        d = _DTYPE_INDEX[a.dtype]
        any_fp32 |= d == 0
        a_code, g_code = 2 * d + a_contig, 2 * d + g_contig
        combos |= 1 << a_code
        g_combos |= 1 << g_code
        aligned &= a.data_ptr() % 16 == 0 and g.data_ptr() % 16 == 0
        aligned &= a_stride % 8 == 0 and g_stride % 8 == 0 and k % 8 == 0 and r % 8 == 0
        n_tiles = triton.cdiv(r, block_r)
        n_chunks = max(1, triton.cdiv(k, k_chunk))
        P = n_tiles * block_r
        rows.append([a.data_ptr(), g.data_ptr(), k, r, a_stride, g_stride, a_code, g_code,
                     ws_size, n_chunks, n_tiles, 0])
        ws_size += max(n_chunks * P * P, 256)  # keeps every offset a multiple of 256
        ti, tj = torch.triu_indices(n_tiles, n_tiles)
        pairs = torch.stack([ti, tj], 1).repeat_interleave(n_chunks, 0)
        chunks = torch.arange(n_chunks).repeat(ti.numel())
        gram_items.append(torch.cat([torch.full((pairs.shape[0], 1), i), pairs, chunks[:, None]], 1))
        kb = torch.arange(triton.cdiv(k, configs.UPDATE_BLOCK_K)).repeat_interleave(n_tiles)
        cols = torch.arange(n_tiles).repeat(triton.cdiv(k, configs.UPDATE_BLOCK_K))
        update_items.append(torch.stack([torch.full_like(kb, i), kb, cols], 1))
    plan = _Plan()
    plan.table = torch.tensor(rows, dtype=torch.int64).to(device)
    plan.gram_items = torch.cat(gram_items).to(torch.int32).contiguous().to(device)
    plan.update_items = torch.cat(update_items).to(torch.int32).contiguous().to(device)
    plan.ws = torch.empty(ws_size, dtype=torch.float32, device=device)
    plan.norms = torch.empty(len(mats), dtype=torch.float32, device=device)
    plan.scales = torch.empty(len(mats), dtype=torch.float32, device=device)
    plan.block_r = block_r
    plan.k_chunk = k_chunk
    plan.combos, plan.g_combos = combos, g_combos
    plan.dot_precision = "tf32x3" if any_fp32 else "tf32"
    # One 16-bit dtype in the whole set (codes 2·d and 2·d+1 of one d ≥ 1): the Gram dot can
    # take the tiles as they are (exact products); not in the interpreter (wrong bf16 dot).
    plan.native_dot = (not INTERPRET and not any_fp32
                       and len({a.dtype for a in mats}) == 1)
    plan.grad_ptrs = [a.grad.data_ptr() for a in mats]
    plan.grad_ptrs_host = None
    plan.aligned = bool(aligned)
    plan.n_mats = len(mats)
    _plan_builds += 1
    return plan


def _check_distinct_grads(mats: Sequence[Tensor]) -> None:
    # Launch 3 updates every grad tile once, in parallel: a shared grad would lose updates.
    owner: dict[int, int] = {}
    for i, a in enumerate(mats):
        g = a.grad
        if g.numel() and owner.setdefault(g.data_ptr(), i) != i:
            raise ValueError(
                f"matrices {owner[g.data_ptr()]} and {i} share one .grad tensor; pass each adapter once"
            )


def _refresh_grad_addresses(plan: _Plan, mats: Sequence[Tensor]) -> bool:
    """Point the cached table at the current ``.grad`` tensors (recreated by set_to_none).

    False when the plan cannot be kept: it assumed 16-byte aligned grads and one is not.
    """
    ptrs = [a.grad.data_ptr() for a in mats]
    if ptrs == plan.grad_ptrs:
        return True
    if plan.aligned and any(p % 16 for p in ptrs):
        return False
    _check_distinct_grads(mats)
    host = torch.tensor(ptrs, dtype=torch.int64)
    if plan.table.is_cuda:
        # Pinned + non_blocking: no host synchronization.  The caching host allocator keeps
        # the pinned block alive until the copy has run; holding it on the plan is belt and braces.
        host = host.pin_memory()
        plan.table[:, 1].copy_(host, non_blocking=True)
    else:
        plan.table[:, 1].copy_(host)
    plan.grad_ptrs_host = host
    plan.grad_ptrs = ptrs
    return True


def _plan_for(mats: Sequence[Tensor], tr: Sequence[bool], k_chunk: int, block_r: Optional[int]) -> _Plan:
    # The key holds everything the tables depend on except the .grad addresses, which are
    # refreshed in place on a hit (see the module docstring).  Two tensors that agree on all
    # of it are, to the kernels, the same matrix.
    key = (mats[0].device, k_chunk, block_r) + tuple(
        (a.data_ptr(), a.shape, a.stride(), a.dtype, a.grad.shape, a.grad.stride(), a.grad.dtype, t)
        for a, t in zip(mats, tr)
    )
    plan = _PLANS.get(key)
    if plan is not None and _refresh_grad_addresses(plan, mats):
        _PLANS.move_to_end(key)
        return plan
    plan = _build_plan(mats, tr, k_chunk, block_r)
    _PLANS[key] = plan
    _PLANS.move_to_end(key)
    while len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


def clear_cache() -> None:
    """Drop every cached plan (tables and workspace)."""
    _PLANS.clear()


def grouped_ortho_value_and_grad_(
    mats: list[Tensor],
    coeff: float,
    transposed: Optional[list[bool]] = None,
    *,
    k_chunk: int = DEFAULT_K_CHUNK,
    block_r: Optional[int] = None,
) -> Tensor:
    """``L = mean_i ‖A_iᵀA_i − I‖_F`` and, in place, ``A_i.grad += coeff·∂L/∂A_i``, in 3 launches.

    Same semantics as :func:`sorsa_kernels.ops.reference.ortho_value_and_grad_`: each
    matrix is k×r (r×k with ``transposed[i]``), float32, float16 or bfloat16, all on one
    device; ``.grad`` is created as zeros where it is None; the update is
    ``coeff/N · 2·A·G/‖G‖_F`` (0 where ``G = 0``), added in float32 and stored in the grad's
    dtype.  Returns ``L`` as a float32 device scalar without synchronizing.

    ``k_chunk`` (rows per Gram partial) and ``block_r`` (Gram tile width, a power of two
    ≥ 16; default from the largest r) only change how the work is split.

    Example::

        >>> mats = [layer.U for layer in layers] + [layer.V for layer in layers]
        >>> value = grouped_ortho_value_and_grad_(mats, coeff=gamma / lr_max)
    """
    tr = _check(mats, transposed)
    if k_chunk < 1:
        raise ValueError(f"k_chunk must be positive, got {k_chunk}")
    if block_r is not None and (block_r < 16 or block_r & (block_r - 1)):
        raise ValueError(f"block_r must be a power of two ≥ 16, got {block_r}")
    for a in mats:
        if a.grad is None:
            a.grad = torch.zeros_like(a)
    plan = _plan_for(mats, tr, int(k_chunk), block_r)
    value = torch.empty((), dtype=torch.float32, device=mats[0].device)
    n_gram = plan.gram_items.shape[0]
    n_update = plan.update_items.shape[0]
    fixed = configs.fixed_launch_params(device_target(mats[0].device), plan.block_r, plan.dot_precision)
    with device_guard(mats[0]):
        if n_gram:
            _ortho_gram_partial_kernel[(n_gram,)](
                plan.table, plan.gram_items, plan.ws, plan.k_chunk,
                BLOCK_R=plan.block_r, BLOCK_K=fixed.gram_step_k, COMBOS=plan.combos,
                DOT_PRECISION=plan.dot_precision, ALIGNED=plan.aligned, TABLE_COLS=_TABLE_COLS,
                NATIVE_DOT=plan.native_dot,
            )
        _ortho_norm_kernel[(plan.n_mats,)](
            plan.table, plan.ws, plan.norms, plan.scales, float(coeff) / plan.n_mats,
            BLOCK_R=plan.block_r, TABLE_COLS=_TABLE_COLS, num_warps=fixed.norm_warps,
        )
        _ortho_grad_update_kernel[(n_update + 1,)](
            plan.table, plan.update_items, plan.ws, plan.norms, plan.scales, value, n_update, plan.n_mats,
            BLOCK_K=configs.UPDATE_BLOCK_K, BLOCK_R=plan.block_r, R_STEP=fixed.update_r_step,
            COMBOS=plan.combos, G_COMBOS=plan.g_combos,
            DOT_PRECISION=plan.dot_precision, ALIGNED=plan.aligned, TABLE_COLS=_TABLE_COLS,
            MEAN_BLOCK=configs.MEAN_BLOCK, num_warps=fixed.update_warps, num_stages=fixed.update_stages,
        )
    return value

