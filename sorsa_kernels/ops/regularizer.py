"""The orthonormal-regularizer op: value and in-place gradient over a set of matrices.

Dispatches between the grouped Triton kernel (:mod:`sorsa_kernels.kernels.ortho_reg`) and
:func:`sorsa_kernels.ops.reference.ortho_value_and_grad_`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference
from .dispatch import fallen_back, kernel_path, run_with_fallback

__all__ = ["ortho_value", "ortho_value_and_grad_"]


def ortho_value(mats: Sequence[Tensor], transposed: Optional[Sequence[bool]] = None) -> Tensor:
    """``mean_i ‖A_iᵀA_i − I‖_F`` over k×r matrices, as a float32 scalar (differentiable).

    A stack E×k×r (a MoE layer's experts) counts as its E matrices.

    ``transposed[i]`` marks a matrix stored r×k (its term is ``‖A_i·A_iᵀ − I‖_F``).
    """
    if len(mats) == 0:
        raise ValueError("the regularizer needs at least one adapter matrix")
    return reference.ortho_norms(mats, transposed).mean()


def ortho_value_and_grad_(
    mats: Sequence[Tensor], coeff: float, transposed: Optional[Sequence[bool]] = None
) -> Tensor:
    """Add ``coeff·∇(mean_i ‖A_iᵀA_i − I‖_F)`` to each ``A_i.grad``; return the mean (device scalar).

    ``.grad`` is created where it is None; ``transposed[i]`` marks a matrix stored r×k.  A
    stack E×k×r (a MoE layer's experts) counts as its E matrices in the mean.
    Uses the grouped Triton kernel (three launches for the whole set) when
    :func:`~sorsa_kernels.ops.dispatch.kernel_path` says so (and the reference loop if
    the kernels cannot compile or launch on this GPU), else the reference loop.

    Example::

        >>> value = ortho_value_and_grad_([layer.U, layer.V], coeff=4e-4 / 3e-5)
    """
    if len(mats) == 0:
        raise ValueError("the regularizer needs at least one adapter matrix")
    if transposed is not None and len(transposed) != len(mats):
        raise ValueError(
            f"transposed has {len(transposed)} flags for {len(mats)} matrices; give one per matrix"
        )
    tr = None if transposed is None else [bool(t) for t in transposed]
    if _is_sharded(mats):
        return _sharded_value_and_grad_(mats, float(coeff), tr)
    key = (mats[0].device, len(mats), max(min(m.shape[-2:]) for m in mats),
           tuple(sorted({m.dtype for m in mats}, key=str)))
    op = "orthonormal regularizer"

    def ref():
        return reference.ortho_value_and_grad_(mats, float(coeff), tr)

    # interpreter_bf16: the regularizer's kernels upcast every tile before a dot there.
    if kernel_path(*mats, interpreter_bf16=True) and not fallen_back(op, key):
        from ..kernels import ortho_reg

        # A compile or launch failure happens before any launch writes a .grad: the
        # reference then starts from the same gradients.
        def kernels():
            flat, flags = _per_expert(mats, tr)
            return ortho_reg.grouped_ortho_value_and_grad_(flat, float(coeff), flags)

        return run_with_fallback(
            op, key, mats[0].device, f"{len(mats)} matrices, largest rank {key[2]}, {[str(d)[6:] for d in key[3]]}",
            kernels, ref)
    return ref()


def _per_expert(mats: Sequence[Tensor], tr: Optional[list[bool]]) -> tuple[list[Tensor], Optional[list[bool]]]:
    """The grouped kernel's 2-D matrices: each stack E×k×r (a MoE layer's experts) becomes its
    E views, whose ``.grad`` are the matching views of the stack's ``.grad`` (created as zeros
    where it is None), so the kernel's in-place update lands in the stack's gradient.  The
    kernel then covers every expert of every layer in its three launches; the only per-expert
    Python work is the ``.grad`` assignment of each view."""
    if all(a.dim() == 2 for a in mats):
        return list(mats), tr
    out: list[Tensor] = []
    flags: list[bool] = []
    for i, a in enumerate(mats):
        t = False if tr is None else tr[i]
        if a.dim() != 3:
            out.append(a)
            flags.append(t)
            continue
        if a.grad is None:
            a.grad = torch.zeros_like(a)
        views = a.detach().unbind(0)
        for v, g in zip(views, a.grad.unbind(0)):
            v.grad = g
        out.extend(views)
        flags.extend([t] * len(views))
    return out, flags


def _is_sharded(mats: Sequence[Tensor]) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, DTensor) for m in mats)


def _sharded_value_and_grad_(mats: Sequence[Tensor], coeff: float, tr) -> Tensor:
    """FSDP2: gather each factor, apply the regularizer to the full copy, add back each shard.

    Every rank must call it (the gathers are collectives).  The full copies are r-wide, so
    the extra memory is one adapter set at a time.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = [m.full_tensor().detach() if isinstance(m, DTensor) else m.detach() for m in mats]
    for f in full:
        f.grad = torch.zeros_like(f)
    value = ortho_value_and_grad_(full, coeff, tr)
    for m, f in zip(mats, full):
        g = distribute_tensor(f.grad, m.device_mesh, m.placements) if isinstance(m, DTensor) else f.grad
        if m.grad is None:
            m.grad = g
        else:
            m.grad.add_(g)
    return value
