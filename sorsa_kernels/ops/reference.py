"""The SORSA math in plain PyTorch, once.

Every Triton kernel in :mod:`sorsa_kernels.kernels` is tested against the functions
in this file, and they are the execution path on machines without a GPU.

Notation (the paper's): a pretrained weight ``W0`` (m×n, ``out_features × in_features``)
is split by SVD into a trainable principal part ``U·diag(S)·Vᵀ`` (U m×r, S r, V n×r)
and a frozen residual ``Wr = W0 − scale·U0·diag(S0)·V0ᵀ``.  The layer computes::

    y = x·Wrᵀ + scale·((x·V)·S)·Uᵀ + b

The dense m×n product ``U·diag(S)·Vᵀ`` is never formed in forward or backward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "principal_split",
    "compute_residual",
    "merged_weight",
    "linear_forward",
    "lowrank_backward",
    "linear_backward",
    "linear_dense",
    "ortho_gram",
    "ortho_norms",
    "ortho_grad",
    "ortho_value_and_grad_",
    "experts_forward",
    "experts_backward",
    "experts_dense",
    "counts_list",
]


# --------------------------------------------------------------------------- init
def principal_split(
    weight: Tensor,
    rank: int,
    *,
    svd: str = "full",
    niter: int = 2,
    oversample: int = 16,
    dtype: torch.dtype = torch.float32,
    generator_seed: Optional[int] = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` singular triplets of ``weight`` (m×n) computed in ``dtype``.

    Returns ``(U, sigma, V)`` with U m×r, sigma r (descending), V n×r.  A batch of
    weights (E×m×n, the experts of a mixture-of-experts layer) is split per matrix in one
    batched call: U E×m×r, sigma E×r, V E×n×r.
    ``svd="full"`` uses ``torch.linalg.svd``; ``svd="randomized"`` uses
    ``torch.svd_lowrank`` with ``rank + oversample`` columns and ``niter`` power
    iterations (seeded for reproducibility).
    """
    w = weight.detach().to(dtype)
    if svd == "full":
        U, s, Vh = torch.linalg.svd(w, full_matrices=False)
        return U[..., :rank].contiguous(), s[..., :rank].contiguous(), Vh[..., :rank, :].mT.contiguous()
    if svd == "randomized":
        q = min(rank + oversample, min(w.shape))
        if generator_seed is None:
            U, s, V = torch.svd_lowrank(w, q=q, niter=niter)
        else:
            with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
                torch.manual_seed(generator_seed)
                U, s, V = torch.svd_lowrank(w, q=q, niter=niter)
        return U[..., :rank].contiguous(), s[..., :rank].contiguous(), V[..., :rank].contiguous()
    raise ValueError(f"svd must be 'full' or 'randomized', got {svd!r}")


def compute_residual(weight: Tensor, U0: Tensor, S0: Tensor, V0: Tensor, scale: float) -> Tensor:
    """``Wr = W0 − scale·U0·diag(S0)·V0ᵀ`` computed in float32 (returned as float32).

    ``weight`` E×m×n with factors E×m×r, E×r, E×n×r: the same per expert (one batched GEMM).

    The same function serves initialization and :func:`sorsa_kernels.load_adapter`,
    so a reloaded model holds bit-for-bit the training-time residual.
    """
    # One m×n float32 allocation (addmm) beside the weight itself: surgery on a 7B model
    # holds about one weight's worth of extra memory at a time.
    if weight.dim() == 3:  # a stack of experts: U0 E×m×r, S0 E×r, V0 E×n×r
        us = U0.float() * (S0.float() * scale).unsqueeze(-2)
        return torch.baddbmm(weight.detach().float(), us, V0.float().mT, alpha=-1.0)
    return torch.addmm(weight.detach().float(), U0.float() * (S0.float() * scale), V0.float().T, alpha=-1.0)


def merged_weight(residual: Tensor, U: Tensor, S: Tensor, V: Tensor, scale: float) -> Tensor:
    """``Wr + scale·U·diag(S)·Vᵀ`` in float32 (used only by merge/export, never in training).

    Also per expert for stacks (residual E×m×n, U E×m×r, S E×r, V E×n×r).
    """
    return residual.float() + (U.float() * (S.float() * scale).unsqueeze(-2)) @ V.float().mT


# --------------------------------------------------------------------------- linear
def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision compute (fp16/bf16), the compute dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    # ``t.to(dtype)`` without the call when nothing changes: the reference runs per layer
    # per step on CPU, where a dozen no-op ``.to`` calls are a visible share of small layers.
    return t if t.dtype == dtype else t.to(dtype)


def linear_forward(x: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor,
                   bias: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """Forward on 2-D ``x`` (M×n).  Returns ``(y, u)`` with ``u = x·V`` (M×r), saved for backward.

    Computation runs in ``x.dtype``; adapters and residual are cast to it.  ``residual=None``
    computes only the low-rank branch (used for the dropout path).

    One M×m allocation, ``y``: the bias rides in the residual GEMM (``addmm``) and the
    low-rank product is accumulated into ``y`` in place (``addmm_``), so no M×m temporary
    is formed; the scale and ``S`` are folded into the r-wide ``u``.
    """
    cd = x.dtype
    u = torch.mm(x, _as(V, cd))
    t = u * (_as(S, cd) * scale)
    Ut = _as(U, cd).T
    if residual is None:
        y = torch.mm(t, Ut)
        if bias is not None:
            y.add_(_as(bias, cd))
        return y, u
    Wt = _as(residual, cd).T
    y = torch.mm(x, Wt) if bias is None else torch.addmm(_as(bias, cd), x, Wt)
    y.addmm_(t, Ut)
    return y, u


def lowrank_backward(
    dy: Tensor,
    x: Tensor,
    u: Tensor,
    U: Tensor,
    S: Tensor,
    V: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The low-rank branch's backward, written once for every path (dense, QSORSA, experts).

    With ``s = dy·U`` and ``u = x·V`` (saved by the forward)::

        dS = scale·Σ_rows(u ⊙ s)      dU = scale·dyᵀ·(u·S)      dV = scale·xᵀ·(s·S)

    Returns ``(ss, dU, dS, dV)`` with ``ss = scale·s·S`` (M×r, compute dtype), the r-wide
    operand of the input gradient's low-rank term ``ss·Vᵀ``; each adapter grad in its
    parameter's dtype.  ``dS`` is reduced in float32 when the compute dtype is fp16/bf16 (in
    the compute dtype otherwise).
    """
    cd = dy.dtype
    acc = _accumulate_dtype(cd)
    s = torch.mm(dy, _as(U, cd))
    dS = (_as(u, acc) * _as(s, acc)).sum(0).mul_(scale)
    Ss = _as(S, cd) * scale
    dU = torch.mm(dy.T, u * Ss)
    ss = s.mul_(Ss)  # s is not needed any more: scale it in place
    # dV as (ssᵀ·x)ᵀ: MKL/oneDNN run the r×n output about 10-30 % faster than the n×r one on
    # CPU (1 thread, n = 1024-4096); the transposed copy back is only n×r.
    dV = torch.mm(ss.T, x).T.contiguous()
    return ss, _as(dU, U.dtype), _as(dS, S.dtype), _as(dV, V.dtype)


def linear_backward(dy: Tensor, x: Tensor, u: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor,
                    V: Tensor, scale: float, needs_dx: bool = True) -> tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
    """Gradients of :func:`linear_forward` (Wr and bias are frozen): ``(dx, dU, dS, dV)``.

    The adapters' by :func:`lowrank_backward`; ``dx = dy·Wr + ss·Vᵀ`` (None unless
    ``needs_dx``) is the only M×n allocation: the low-rank term is accumulated into
    ``dy·Wr`` in place (``addmm_``).
    """
    ss, dU, dS, dV = lowrank_backward(dy, x, u, U, S, V, scale)
    dx = None
    if needs_dx:
        Vt = _as(V, dy.dtype).T
        if residual is None:
            dx = torch.mm(ss, Vt)
        else:
            dx = torch.mm(dy, _as(residual, dy.dtype))
            dx.addmm_(ss, Vt)
    return dx, dU, dS, dV


def linear_dense(
    x: Tensor,
    residual: Tensor,
    U: Tensor,
    S: Tensor,
    V: Tensor,
    bias: Optional[Tensor],
    scale: float,
) -> Tensor:
    """The formula written the obvious way, for autograd oracles in tests (any dtype)."""
    y = x @ residual.T + scale * ((x @ V) * S) @ U.T
    return y if bias is None else y + bias


# --------------------------------------------------------------------------- regularizer
# Each function takes 2-D matrices or stacks of them (E×k×r, the experts of a MoE layer); a
# stack counts as its E matrices, computed batched (no Python loop over experts).
def _as_k_by_r(A: Tensor, transposed: bool) -> Tensor:
    return A.mT if transposed else A


def _matrix_count(A: Tensor) -> int:
    return A.shape[0] if A.dim() == 3 else 1


def ortho_gram(A: Tensor, transposed: bool = False) -> Tensor:
    """``G = AᵀA − I`` in float32 for A k×r (or ``A·Aᵀ − I`` for A r×k when ``transposed``).

    Batched over a leading expert axis.
    """
    a = _as_k_by_r(A, transposed).float()
    return a.mT @ a - torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)


def ortho_norms(mats: Sequence[Tensor], transposed: Optional[Sequence[bool]] = None) -> Tensor:
    """Plain Frobenius norms ``‖AᵀA − I‖_F`` of each matrix (each expert of a stack), as a float32 vector."""
    tr = transposed or [False] * len(mats)
    return torch.cat([torch.linalg.matrix_norm(ortho_gram(a, t)).reshape(-1) for a, t in zip(mats, tr)])


def ortho_grad(A: Tensor, transposed: bool = False) -> Tensor:
    """Gradient of ``‖AᵀA − I‖_F`` w.r.t. A: ``2·A·G/‖G‖_F`` (zero where ``G = 0``), float32.

    Batched over a leading expert axis (each expert's own norm).
    """
    a = _as_k_by_r(A, transposed).float()
    G = a.mT @ a - torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    n = torch.linalg.matrix_norm(G)[..., None, None]
    inv = torch.where(n > 0, 1.0 / n, torch.zeros_like(n))
    g = (2.0 * inv) * (a @ G)
    return _as_k_by_r(g, transposed)


def ortho_value_and_grad_(
    mats: Sequence[Tensor], coeff: float, transposed: Optional[Sequence[bool]] = None
) -> Tensor:
    """The regularizer ``L = mean_i ‖A_iᵀA_i − I‖_F`` and, in place, ``A_i.grad += coeff·∂L/∂A_i``.

    ``.grad`` is created (zeros, parameter dtype) where it is None.  Returns L as a
    float32 device scalar (no host synchronization).  A stack E×k×r counts as E matrices in
    the mean.  This is the oracle of the fused kernel in :mod:`sorsa_kernels.kernels.ortho_reg`.
    """
    if len(mats) == 0:
        raise ValueError("the regularizer needs at least one adapter matrix")
    tr = transposed or [False] * len(mats)
    count = sum(_matrix_count(a) for a in mats)
    per = coeff / count
    total = torch.zeros((), dtype=torch.float32, device=mats[0].device)
    with torch.no_grad():
        for a, t in zip(mats, tr):
            total = total + torch.linalg.matrix_norm(ortho_gram(a, t)).sum()
            g = ortho_grad(a, t)
            if a.grad is None:
                a.grad = torch.zeros_like(a)
            a.grad.copy_(a.grad.float() + per * g)  # accumulate in fp32, store in grad dtype
    return total / count


# --------------------------------------------------------------------------- experts
# A MoE layer keeps E weights in one stack (residual E×m×n, U E×m×r, S E×r, V E×n×r); its
# grouped rows are ordered by expert, ``counts[e]`` consecutive rows for expert e.  Per expert
# the math is the linear layer's (one formula per gradient, shared); no m×n tensor is formed
# unless the residual must be cast (one expert at a time).  ``residual[e]`` may be any lookup
# (the NF4 op dequantizes there).  Routed (top-k) layers: grouped row i has slot p_i (token·top_k
# + choice; ``slots`` permutes the M slots) and computes, with w the routing weight,
#     a_i = w_{p_i}·x[p_i // top_k]                                    (gather, weights)
#     y[p_i // top_k] += a_i·Wr_eᵀ + scale·((a_i·V_e)·S_e)·U_eᵀ + w_{p_i}·b_e        (scatter)
# since w·(x·Wᵀ + b) = (w·x)·Wᵀ + w·b; backward: g_i = dy[p_i // top_k], da_i the linear
# input gradient, dw_{p_i} = da_i·x[p_i // top_k] + g_i·b_e, dx[p_i // top_k] += w_{p_i}·da_i.
# An expert's rows are gathered, computed and scattered in turn: the M×n gathered input and
# the M×m output rows never exist whole.
def counts_list(counts) -> list[int]:
    """Rows per expert as a Python list (one host sync for a tensor)."""
    return [int(c) for c in (counts.tolist() if isinstance(counts, Tensor) else counts)]


def _expert_rows(counts, slots: Optional[Tensor], top_k: int):
    """``(e, rows, slot, token)`` of every expert with rows: its slice of grouped rows, their slots
    and their tokens (``slot // top_k``, divided once per call)."""
    start, tokens = 0, None if slots is None else slots // top_k
    for e, c in enumerate(counts_list(counts)):
        if c == 0:
            continue
        rows = slice(start, start + c)
        yield e, rows, (None if slots is None else slots[rows]), (None if slots is None else tokens[rows])
        start += c


def _routed_input(x: Tensor, rows: slice, slot: Optional[Tensor], tok: Optional[Tensor], gather: bool,
                  weights: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(x_e, a_e, w_e)``: the expert's input rows, weighted (``a = w·x``), and their weights."""
    xe = x[tok] if gather else x[rows]
    if weights is None:
        return xe, xe, None
    we = (weights[slot] if slot is not None else weights[rows]).to(x.dtype)
    return xe, xe * we[:, None], we


def experts_forward(
    x: Tensor, counts, residual, U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor], scale: float, *,
    slots: Optional[Tensor] = None, top_k: int = 1, gather: bool = False, scatter: bool = False,
    weights: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``y[rows_e] = x_e·Wr_eᵀ + scale·((x_e·V_e)·S_e)·U_eᵀ + b_e`` (routing: the comment above).

    ``x`` M×n (T×n with ``gather``), ``counts`` (E,) summing to M.  Returns ``(y, u)``, ``u =
    a_e·V_e`` (M×r, saved for backward), ``y`` M×m or (M / top_k)×m with ``scatter``."""
    E, m, r = U.shape
    M = slots.numel() if slots is not None else x.shape[0]
    y = x.new_zeros(M // top_k, m) if scatter else x.new_empty(M, m)
    u = x.new_empty(M, r)
    for e, rows, slot, tok in _expert_rows(counts, slots, top_k):
        _, a, we = _routed_input(x, rows, slot, tok, gather, weights)
        be = None if bias is None else bias[e]
        ye, u[rows] = linear_forward(a, None if residual is None else residual[e], U[e], S[e], V[e],
                                     be if we is None else None, scale)
        if we is not None and be is not None:
            ye.addr_(we, _as(be, ye.dtype))
        if scatter:
            y.index_add_(0, tok, ye)
        else:
            y[rows] = ye
    return y, u


def experts_backward(
    dy: Tensor, x: Tensor, u: Tensor, counts, residual, U: Tensor, S: Tensor, V: Tensor, scale: float,
    needs_dx: bool = True, *, bias: Optional[Tensor] = None, slots: Optional[Tensor] = None, top_k: int = 1,
    gather: bool = False, scatter: bool = False, weights: Optional[Tensor] = None, needs_dw: bool = False,
) -> tuple[Optional[Tensor], Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients of :func:`experts_forward`: ``(dx, dU, dS, dV, dw)`` (``dw``: the routing weights',
    when ``needs_dw``; ``bias`` is read only for it).  Experts with no rows get zero gradients."""
    dU, dS, dV = torch.zeros_like(U), torch.zeros_like(S), torch.zeros_like(V)
    dx = (x.new_zeros(x.shape) if gather else x.new_empty(x.shape)) if needs_dx else None
    dw = torch.zeros_like(weights) if needs_dw and weights is not None else None
    for e, rows, slot, tok in _expert_rows(counts, slots, top_k):
        g = dy[tok] if scatter else dy[rows]
        xe, a, we = _routed_input(x, rows, slot, tok, gather, weights)
        want_da = needs_dx or dw is not None
        res = None if residual is None or not want_da else residual[e]  # read only for da
        da, dU[e], dS[e], dV[e] = linear_backward(g, a, u[rows], res, U[e], S[e], V[e], scale, want_da)
        if dw is not None:
            dwe = (da * xe).sum(1)
            if bias is not None:
                dwe += g @ _as(bias[e], g.dtype)
            dw[slot if slot is not None else rows] = dwe.to(dw.dtype)
        if needs_dx:
            dxe = da if we is None else da.mul_(we[:, None])
            if gather:
                dx.index_add_(0, tok, dxe)
            else:
                dx[rows] = dxe
    return dx, dU, dS, dV, dw


def experts_dense(
    x: Tensor, counts, residual: Tensor, U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor], scale: float,
) -> Tensor:
    """The expert formula written the obvious way (each expert's ΔW formed), for autograd oracles in tests."""
    out = []
    start = 0
    for e, c in enumerate(counts_list(counts)):
        xe = x[start:start + c]
        out.append(linear_dense(xe, residual[e], U[e], S[e], V[e], None if bias is None else bias[e], scale))
        start += c
    return torch.cat(out) if out else x.new_zeros(0, U.shape[1])
