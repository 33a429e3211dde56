"""The SORSA experts op: every expert of a mixture-of-experts layer in one call.

Rows of ``x`` arrive grouped by expert (``counts[e]`` consecutive rows for expert e); per
expert ``y_e = x_e·Wr_eᵀ + scale·((x_e·V_e)·S_e)·U_eᵀ + b_e``.  Neither the forward nor the
backward forms an expert's dense ``ΔW`` (let alone the E×m×n stack): the math is
:func:`sorsa_kernels.ops.reference.experts_forward` / ``experts_backward``, and on the Triton
path the grouped kernels of :mod:`sorsa_kernels.kernels.grouped_sorsa` (one launch over all
experts per GEMM).  :func:`~sorsa_kernels.ops.dispatch.use_triton` picks the path.

Only ``x`` and the r-wide ``u = x·V`` are saved for backward.  The residual and the bias
are frozen (a residual that requires grad is rejected).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .dispatch import use_triton

__all__ = ["sorsa_experts"]

# Compute dtypes the Triton kernels cover; anything else (float64) runs the reference.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _impls(t: Tensor, *params: Optional[Tensor]):
    if use_triton(t) and all(p is None or p.dtype in _KERNEL_DTYPES for p in (t, *params)):
        from ..kernels import grouped_sorsa as kernels

        return kernels.grouped_forward, kernels.grouped_backward
    return reference.experts_forward, reference.experts_backward


class _SORSAExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, residual, U, S, V, bias, scale):
        forward, _ = _impls(x, residual, U, S, V)
        y, u = forward(x, counts, residual, U, S, V, bias, scale)
        ctx.save_for_backward(x, counts, u, residual, U, S, V)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, counts, u, residual, U, S, V = ctx.saved_tensors
        _, backward = _impls(dy, residual, U, S, V)
        needs_dx = ctx.needs_input_grad[0]
        dx, dU, dS, dV = backward(dy.contiguous(), x, u, counts, residual, U, S, V, ctx.scale, needs_dx)
        return dx, None, None, dU, dS, dV, None, None


def _check(x: Tensor, counts: Tensor, residual: Optional[Tensor], U: Tensor, S: Tensor, V: Tensor,
           bias: Optional[Tensor]) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows × in_features) with rows grouped by expert, got shape {tuple(x.shape)}")
    if U.dim() != 3 or S.dim() != 2 or V.dim() != 3:
        raise ValueError(
            f"U, S, V must be stacks E×m×r, E×r, E×n×r; got {tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)}"
        )
    E, m, r = U.shape
    n = V.shape[1]
    if tuple(S.shape) != (E, r) or tuple(V.shape) != (E, n, r):
        raise ValueError(
            f"S has shape {tuple(S.shape)} and V {tuple(V.shape)} but U {tuple(U.shape)} needs ({E}, {r}) and ({E}, n, {r})"
        )
    if x.shape[1] != n:
        raise ValueError(f"x has {x.shape[1]} features in its last dimension, expected {n}")
    if residual is not None and tuple(residual.shape) != (E, m, n):
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected ({E}, {m}, {n})")
    if bias is not None and tuple(bias.shape) != (E, m):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({E}, {m})")
    if counts.dim() != 1 or counts.shape[0] != E or counts.dtype.is_floating_point:
        raise ValueError(
            f"counts must be an integer vector of rows per expert with {E} entries, got "
            f"{counts.dtype} of shape {tuple(counts.shape)}"
        )
    for what, t in (("residual", residual), ("bias", bias)):
        if t is not None and t.requires_grad:
            raise ValueError(
                f"the SORSA expert {what} is frozen but was given with requires_grad=True; only U, S, V are "
                f"trainable: call {what}.requires_grad_(False)"
            )


def sorsa_experts(
    x: Tensor,
    counts: Tensor,
    residual: Optional[Tensor],
    U: Tensor,
    S: Tensor,
    V: Tensor,
    bias: Optional[Tensor] = None,
    scale: float = 1.0,
) -> Tensor:
    """Every expert's SORSA linear on rows grouped by expert; returns ``y`` (M×m).

    Args:
        x: M×n rows, the ``counts[0]`` rows of expert 0 first, then expert 1's, ….
        counts: (E,) integer rows per expert (zeros allowed), summing to M.
        residual: the frozen stack Wr E×m×n (None: only the low-rank branch).
        U, S, V: the trainable stacks E×m×r, E×r, E×n×r.
        bias: an optional frozen E×m bias.
        scale: ``alpha / rank`` (1 without alpha).

    Example::

        >>> counts = torch.bincount(expert_of_row, minlength=E)      # rows sorted by expert
        >>> y = sorsa_experts(x, counts, layer.residual, layer.U, layer.S, layer.V)
    """
    _check(x, counts, residual, U, S, V, bias)
    return _SORSAExperts.apply(x, counts, residual, U, S, V, bias, float(scale))
