"""The SORSA experts ops: every expert of a mixture-of-experts layer in one call.

Grouped rows arrive ordered by expert (``counts[e]`` consecutive rows for expert e); per expert
``y_e = a_e·Wr_eᵀ + scale·((a_e·V_e)·S_e)·U_eᵀ + b_e``.  A routed layer passes its routing
instead of gathered copies: ``slots`` (the (token, choice) slot of each grouped row: the sort
of the router's expert ids), ``gather`` (x holds token rows, read through the slots),
``scatter`` (y holds token rows: each row adds into its token, the top-k sum included) and
``weights`` (the routing weight of each slot, multiplied in; its gradient is returned, it
flows through the router).  The math is :func:`sorsa_kernels.ops.reference.experts_forward` /
``experts_backward``; on the Triton path the grouped kernels of
:mod:`sorsa_kernels.kernels.grouped_sorsa` (one launch over all experts per GEMM; the gather,
the routing multiply and the scatter happen as tiles are loaded and stored) and, for an NF4
residual, :mod:`sorsa_kernels.kernels.grouped_nf4` (each expert's residual dequantized inside
the K loop, one launch per projection).

Registered as ``torch.library`` custom ops (``sorsa_kernels::experts_fwd`` / ``experts_bwd``
and ``qexperts_fwd`` / ``qexperts_bwd``) with fake implementations and an autograd formula,
so ``torch.compile`` sees one node per call and no graph break.  The kernel-or-reference
decision is made once per call and passed to both ops; each direction is a
:class:`~sorsa_kernels.ops.kernel_op.KernelOp` (:data:`~sorsa_kernels.ops.experts_paths.FORWARD`,
``BACKWARD``), so a kernel that cannot compile or launch falls back to the reference for that
shape.  ``counts`` must sum to the number
of grouped rows: checked on the device (``torch._assert_async``), without a host sync.  The
kernel path has no host sync at all; the reference path reads ``counts`` on the host.

Only ``x`` and the r-wide ``u`` are saved for backward; the residual and the bias are frozen.
The reference path of the NF4 op dequantizes (bitsandbytes) a chunk of experts that have rows
at a time: at most ``expert_chunk``, at most half the experts and at most
:data:`REFERENCE_DEQUANT_BYTES` — never the whole stack, never an expert without rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .experts_paths import (BACKWARD, FORWARD, REFERENCE_DEQUANT_BYTES, NF4Residual, check_rows, dequantize_experts,
                            empty_if_none, grouped_rows, reference_chunk)

__all__ = ["sorsa_experts", "qsorsa_experts", "dequantize_experts", "reference_chunk", "REFERENCE_DEQUANT_BYTES"]


# --------------------------------------------------------------------------- custom ops
def _fake_forward(x, U, slots, top_k, scatter):
    M = grouped_rows(x, slots)
    return x.new_empty(M // top_k if scatter else M, U.shape[1]), x.new_empty(M, U.shape[2])


def _fake_backward(x, U, S, V, weights, needs_dx, needs_dw):
    dw = weights.new_empty(weights.shape) if needs_dw and weights is not None else x.new_empty(0)
    return (x.new_empty(x.shape) if needs_dx else x.new_empty(0)), U.new_empty(U.shape), S.new_empty(S.shape), \
        V.new_empty(V.shape), dw


def _run_forward(x, counts, res, U, S, V, bias, scale, route, kernel):
    check_rows(counts, grouped_rows(x, route[0]))
    return FORWARD(kernel, x, counts, res, U, S, V, bias, scale, route)


def _run_backward(dy, x, u, counts, res, U, S, V, bias, scale, route, needs_dx, needs_dw, kernel):
    """``(dx, dU, dS, dV, dw)`` with empty tensors for the ``dx`` / ``dw`` not needed."""
    dx, dU, dS, dV, dw = BACKWARD(kernel, dy, x, u, counts, res, U, S, V, bias, scale, route, needs_dx, needs_dw)
    return empty_if_none(dx, x), dU, dS, dV, empty_if_none(dw, x)


@torch.library.custom_op("sorsa_kernels::experts_fwd", mutates_args=())
def experts_fwd(x: Tensor, counts: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor,
                bias: Optional[Tensor], scale: float, slots: Optional[Tensor], weights: Optional[Tensor],
                top_k: int, gather: bool, scatter: bool, kernel: bool) -> tuple[Tensor, Tensor]:
    """``(y, u)`` of :func:`sorsa_experts` (``kernel``: the call's dispatch decision)."""
    return _run_forward(x, counts, residual, U, S, V, bias, scale, (slots, top_k, gather, scatter, weights), kernel)


@experts_fwd.register_fake
def _(x, counts, residual, U, S, V, bias, scale, slots, weights, top_k, gather, scatter, kernel):
    return _fake_forward(x, U, slots, top_k, scatter)


@torch.library.custom_op("sorsa_kernels::experts_bwd", mutates_args=())
def experts_bwd(dy: Tensor, x: Tensor, u: Tensor, counts: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor,
                V: Tensor, bias: Optional[Tensor], scale: float, slots: Optional[Tensor], weights: Optional[Tensor],
                top_k: int, gather: bool, scatter: bool, needs_dx: bool, needs_dw: bool,
                kernel: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dU, dS, dV, dw)``; ``dx`` / ``dw`` are empty tensors when not needed."""
    return _run_backward(dy, x, u, counts, residual, U, S, V, bias, scale, (slots, top_k, gather, scatter, weights),
                         needs_dx, needs_dw, kernel)


@experts_bwd.register_fake
def _(dy, x, u, counts, residual, U, S, V, bias, scale, slots, weights, top_k, gather, scatter, needs_dx, needs_dw,
      kernel):
    return _fake_backward(x, U, S, V, weights, needs_dx, needs_dw)


def _setup(ctx, inputs, output):
    x, counts, residual, U, S, V, bias, scale, slots, weights, top_k, gather, scatter, kernel = inputs
    ctx.save_for_backward(x, counts, output[1], residual, U, S, V, bias, slots, weights)
    ctx.meta = (scale, top_k, gather, scatter, kernel)


def _grads(ctx, dy, _du):
    x, counts, u, residual, U, S, V, bias, slots, weights = ctx.saved_tensors
    scale, top_k, gather, scatter, kernel = ctx.meta
    needs_dx, needs_dw = ctx.needs_input_grad[0], weights is not None and ctx.needs_input_grad[9]
    dx, dU, dS, dV, dw = experts_bwd(dy.contiguous(), x, u, counts, residual, U, S, V, bias, scale, slots, weights,
                                     top_k, gather, scatter, needs_dx, needs_dw, kernel)
    return (dx if needs_dx else None, None, None, dU, dS, dV, None, None, None, dw if needs_dw else None,
            None, None, None, None)


experts_fwd.register_autograd(_grads, setup_context=_setup)


@torch.library.custom_op("sorsa_kernels::qexperts_fwd", mutates_args=())
def qexperts_fwd(x: Tensor, counts: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor,
                 nested_code: Tensor, offset: Tensor, code: Tensor, meta: list[int], U: Tensor, S: Tensor,
                 V: Tensor, bias: Optional[Tensor], scale: float, slots: Optional[Tensor],
                 weights: Optional[Tensor], top_k: int, gather: bool, scatter: bool,
                 kernel: bool) -> tuple[Tensor, Tensor]:
    """``(y, u)`` of :func:`qsorsa_experts`; ``meta`` = (m, n, blocksize, nested_blocksize, expert_chunk)."""
    res = NF4Residual((packed, absmax, nested_absmax, nested_code, offset, code), meta, counts, x.dtype)
    return _run_forward(x, counts, res, U, S, V, bias, scale, (slots, top_k, gather, scatter, weights), kernel)


@qexperts_fwd.register_fake
def _(x, counts, packed, absmax, nested_absmax, nested_code, offset, code, meta, U, S, V, bias, scale, slots,
      weights, top_k, gather, scatter, kernel):
    return _fake_forward(x, U, slots, top_k, scatter)


@torch.library.custom_op("sorsa_kernels::qexperts_bwd", mutates_args=())
def qexperts_bwd(dy: Tensor, x: Tensor, u: Tensor, counts: Tensor, packed: Tensor, absmax: Tensor,
                 nested_absmax: Tensor, nested_code: Tensor, offset: Tensor, code: Tensor, meta: list[int],
                 U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor], scale: float, slots: Optional[Tensor],
                 weights: Optional[Tensor], top_k: int, gather: bool, scatter: bool, needs_dx: bool,
                 needs_dw: bool, kernel: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dU, dS, dV, dw)`` of :func:`qsorsa_experts`; ``dx`` / ``dw`` empty when not needed."""
    res = NF4Residual((packed, absmax, nested_absmax, nested_code, offset, code), meta, counts, dy.dtype)
    return _run_backward(dy, x, u, counts, res, U, S, V, bias, scale, (slots, top_k, gather, scatter, weights),
                         needs_dx, needs_dw, kernel)


@qexperts_bwd.register_fake
def _(dy, x, u, counts, packed, absmax, nested_absmax, nested_code, offset, code, meta, U, S, V, bias, scale, slots,
      weights, top_k, gather, scatter, needs_dx, needs_dw, kernel):
    return _fake_backward(x, U, S, V, weights, needs_dx, needs_dw)


def _qsetup(ctx, inputs, output):
    (x, counts, packed, absmax, nested_absmax, nested_code, offset, code, meta, U, S, V, bias, scale, slots,
     weights, top_k, gather, scatter, kernel) = inputs
    ctx.save_for_backward(x, counts, output[1], packed, absmax, nested_absmax, nested_code, offset, code,
                          U, S, V, bias, slots, weights)
    ctx.meta = (meta, scale, top_k, gather, scatter, kernel)


def _qgrads(ctx, dy, _du):
    x, counts, u, *nf4, U, S, V, bias, slots, weights = ctx.saved_tensors
    meta, scale, top_k, gather, scatter, kernel = ctx.meta
    needs_dx, needs_dw = ctx.needs_input_grad[0], weights is not None and ctx.needs_input_grad[15]
    dx, dU, dS, dV, dw = qexperts_bwd(dy.contiguous(), x, u, counts, *nf4, meta, U, S, V, bias, scale, slots,
                                      weights, top_k, gather, scatter, needs_dx, needs_dw, kernel)
    return ((dx if needs_dx else None,) + (None,) * 8 + (dU, dS, dV, None, None, None, dw if needs_dw else None)
            + (None,) * 4)


qexperts_fwd.register_autograd(_qgrads, setup_context=_qsetup)


# --------------------------------------------------------------------------- public
def _check(x: Tensor, counts: Tensor, residual, U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor],
           slots: Optional[Tensor], top_k: int, gather: bool, scatter: bool, weights: Optional[Tensor]) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows × in_features) with rows grouped by expert, got shape {tuple(x.shape)}")
    if U.dim() != 3 or S.dim() != 2 or V.dim() != 3:
        raise ValueError(
            f"U, S, V must be stacks E×m×r, E×r, E×n×r; got {tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)}")
    (E, m, r), n = U.shape, V.shape[1]
    if tuple(S.shape) != (E, r) or tuple(V.shape) != (E, n, r):
        raise ValueError(
            f"S has shape {tuple(S.shape)} and V {tuple(V.shape)} but U {tuple(U.shape)} needs ({E}, {r}) and "
            f"({E}, n, {r})")
    if x.shape[1] != n:
        raise ValueError(f"x has {x.shape[1]} features in its last dimension, expected {n}")
    for what, t, want in (("residual", residual, (E, m, n)), ("bias", bias, (E, m))):
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {want}")
        if t is not None and t.requires_grad:
            raise ValueError(f"the SORSA expert {what} is frozen but was given with requires_grad=True; only U, S, V "
                             f"are trainable: call {what}.requires_grad_(False)")
    if counts.dim() != 1 or counts.shape[0] != E or counts.dtype.is_floating_point:
        raise ValueError(f"counts must be an integer vector of rows per expert with {E} entries, got "
                         f"{counts.dtype} of shape {tuple(counts.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int (choices per token), got {top_k!r}")
    if (gather or scatter) and slots is None:
        raise ValueError("gather and scatter need slots (the (token, choice) slot of each grouped row)")
    M = grouped_rows(x, slots)
    if slots is not None and (slots.dim() != 1 or slots.dtype.is_floating_point or M % top_k
                              or (gather and x.shape[0] * top_k != M) or (not gather and x.shape[0] != M)):
        raise ValueError(f"slots must be an integer vector of the {x.shape[0] * (top_k if gather else 1)} grouped "
                         f"rows' slots, a multiple of top_k = {top_k}; got {slots.dtype} of shape {tuple(slots.shape)}")
    if weights is not None and (tuple(weights.shape) != (M,) or not weights.dtype.is_floating_point):
        raise ValueError(f"weights must be a float vector of the {M} routing weights, got {weights.dtype} of shape "
                         f"{tuple(weights.shape)}")


def sorsa_experts(x: Tensor, counts: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor,
                  bias: Optional[Tensor] = None, scale: float = 1.0, *, slots: Optional[Tensor] = None,
                  top_k: int = 1, gather: bool = False, scatter: bool = False,
                  weights: Optional[Tensor] = None) -> Tensor:
    """Every expert's SORSA linear on rows grouped by expert; returns ``y``.

    Args:
        x: M×n rows, the ``counts[0]`` rows of expert 0 first, then expert 1's, … (T×n token
            rows with ``gather``: grouped row i reads ``x[slots[i] // top_k]``).
        counts: (E,) integer rows per expert (zeros allowed), summing to M (checked on the device).
        residual, U, S, V: the frozen stack Wr E×m×n (None: the low-rank branch alone) and the
            trainable E×m×r, E×r, E×n×r.
        bias: an optional frozen E×m bias.  scale: ``alpha / rank`` (1 without alpha).
        slots: (M,) the (token·top_k + choice) slot of each grouped row (a permutation of M).
        scatter: y is (M / top_k)×m, each token the sum of its top_k rows.
        weights: (M,) routing weights in slot order, multiplied into each row (gradient returned).

    Example::

        >>> _, slots = torch.sort(top_k_index.reshape(-1), stable=True)
        >>> h = sorsa_experts(hidden, counts, Wr, U, S, V, slots=slots, top_k=2, gather=True)
    """
    _check(x, counts, residual, U, S, V, bias, slots, top_k, gather, scatter, weights)
    kernel = FORWARD.decide(x, counts, residual, U, S, V, bias, scale, (slots, top_k, gather, scatter, weights))
    return experts_fwd(x, counts, residual, U, S, V, bias, float(scale), slots, weights, top_k, gather, scatter,
                       kernel)[0]


def qsorsa_experts(x: Tensor, counts: Tensor, nf4: tuple[Tensor, ...], U: Tensor, S: Tensor, V: Tensor,
                   bias: Optional[Tensor] = None, scale: float = 1.0, *, blocksize: int = 64,
                   nested_blocksize: int = 256, expert_chunk: int = 8, **routing) -> Tensor:
    """:func:`sorsa_experts` with each expert's residual in NF4 (``routing``: its keywords).

    ``nf4`` is ``(packed E×P uint8, absmax E×B uint8, nested_absmax E×N float32, nested_code
    (256,), offset (E,), code (16,))`` (see :func:`dequantize_experts`).  The kernel path
    dequantizes inside the grouped GEMM's K loop; the reference path a chunk of experts with
    rows at a time (:func:`reference_chunk`).

    Example::

        >>> y = qsorsa_experts(x, counts, layer.nf4_tensors(), layer.U, layer.S, layer.V)
    """
    route = {"slots": None, "top_k": 1, "gather": False, "scatter": False, "weights": None, **routing}
    _check(x, counts, None, U, S, V, bias, *route.values())
    (E, m, _), n = U.shape, V.shape[1]
    if nf4[0].dim() != 2 or nf4[0].shape[0] != E or nf4[0].shape[1] != (m * n + 1) // 2:
        raise ValueError(f"packed NF4 experts have shape {tuple(nf4[0].shape)}, expected ({E}, {(m * n + 1) // 2})")
    if isinstance(expert_chunk, bool) or not isinstance(expert_chunk, int) or expert_chunk < 1:
        raise ValueError(f"expert_chunk must be a positive int (experts dequantized at a time), got {expert_chunk!r}")
    meta = [m, n, int(blocksize), int(nested_blocksize), expert_chunk]
    kernel = FORWARD.decide(x, counts, nf4, U, S, V, bias, scale, tuple(route.values()))
    return qexperts_fwd(x, counts, *nf4, meta, U, S, V, bias, float(scale), route["slots"], route["weights"],
                        route["top_k"], route["gather"], route["scatter"], kernel)[0]
