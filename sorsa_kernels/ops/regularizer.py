"""The orthonormal-regularizer ops: the value, and the value with its gradient added in place.

Two ``torch.library`` custom ops, each with a fake kernel:

* ``sorsa_kernels::ortho_value`` — ``mean_i ‖A_iᵀA_i − I‖_F``, differentiable through its
  registered autograd formula (:func:`sorsa_kernels.ops.reference.ortho_grad`);
* ``sorsa_kernels::ortho_value_and_grad_`` — the same value, with ``coeff·∂L/∂A_i`` added to
  each ``A_i.grad`` (declared mutated).  :data:`VALUE_AND_GRAD` (a
  :class:`~sorsa_kernels.ops.kernel_op.KernelOp`) runs the grouped Triton kernel
  (:mod:`sorsa_kernels.kernels.ortho_reg`) or :func:`sorsa_kernels.ops.reference.ortho_value_and_grad_`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference
from .kernel_op import KernelOp

__all__ = ["ortho_value", "ortho_value_and_grad_", "VALUE_AND_GRAD"]


def _flags(mats: Sequence[Tensor], transposed: Optional[Sequence[bool]]) -> list[bool]:
    if len(mats) == 0:
        raise ValueError("the regularizer needs at least one adapter matrix")
    if transposed is None:
        return [False] * len(mats)
    if len(transposed) != len(mats):
        raise ValueError(
            f"transposed has {len(transposed)} flags for {len(mats)} matrices; give one per matrix"
        )
    return [bool(t) for t in transposed]


# --------------------------------------------------------------------------- value
@torch.library.custom_op("sorsa_kernels::ortho_value", mutates_args=())
def _value(mats: list[Tensor], transposed: list[bool]) -> Tensor:
    return reference.ortho_norms(mats, transposed).mean()


@_value.register_fake
def _(mats, transposed):
    return mats[0].new_empty((), dtype=torch.float32)


def _value_setup(ctx, inputs, output):
    mats, transposed = inputs
    ctx.save_for_backward(*mats)
    ctx.transposed = transposed


def _value_backward(ctx, grad):
    mats = ctx.saved_tensors
    count = sum(a.shape[0] if a.dim() == 3 else 1 for a in mats)
    return [(grad / count * reference.ortho_grad(a, t)).to(a.dtype) for a, t in zip(mats, ctx.transposed)], None


_value.register_autograd(_value_backward, setup_context=_value_setup)


def ortho_value(mats: Sequence[Tensor], transposed: Optional[Sequence[bool]] = None) -> Tensor:
    """``mean_i ‖A_iᵀA_i − I‖_F`` over k×r matrices, as a float32 scalar (differentiable).

    A stack E×k×r (a MoE layer's experts) counts as its E matrices.

    ``transposed[i]`` marks a matrix stored r×k (its term is ``‖A_i·A_iᵀ − I‖_F``).
    """
    return _value(list(mats), _flags(mats, transposed))


# --------------------------------------------------------------------------- value and gradient
def _grouped_kernel(mats: list[Tensor], coeff: float, tr: list[bool]) -> Tensor:
    from ..kernels.ortho_reg import grouped_ortho_value_and_grad_

    # A compile or launch failure happens before any launch writes a .grad: the reference
    # then starts from the same gradients.
    flat, flags = _per_expert(mats, tr)
    return grouped_ortho_value_and_grad_(flat, coeff, flags)


def _key(mats: list[Tensor], coeff: float, tr: list[bool]) -> tuple:
    return (mats[0].device, len(mats), max(min(m.shape[-2:]) for m in mats),
            tuple(sorted({m.dtype for m in mats}, key=str)))


#: ``(mats, coeff, transposed) -> value``; each ``mats[i].grad`` exists and is updated in place.
VALUE_AND_GRAD = KernelOp(
    name="orthonormal regularizer",
    key=_key,
    shape=lambda mats, coeff, tr: (f"{len(mats)} matrices, largest rank {_key(mats, coeff, tr)[2]}, "
                                   f"{[str(d)[6:] for d in _key(mats, coeff, tr)[3]]}"),
    kernel=_grouped_kernel,
    reference=reference.ortho_value_and_grad_,
    tensors=lambda mats, *_: tuple(mats),
    interpreter_bf16=True,  # the kernels upcast every tile before a dot under the interpreter
)


@torch.library.custom_op("sorsa_kernels::ortho_value_and_grad_", mutates_args=("grads",))
def _value_and_grad(mats: list[Tensor], grads: list[Tensor], coeff: float, transposed: list[bool],
                    kernel: bool) -> Tensor:
    """``grads[i]`` is ``mats[i].grad``: in eager mode the tensors themselves are passed; a
    matrix that arrives without it (a traced copy) is replaced by a detached view holding it."""
    held = []
    for a, g in zip(mats, grads):
        if a.grad is not g:
            a = a.detach()
            a.grad = g
        held.append(a)
    return VALUE_AND_GRAD(kernel, held, coeff, transposed)


@_value_and_grad.register_fake
def _(mats, grads, coeff, transposed, kernel):
    return mats[0].new_empty((), dtype=torch.float32)


def ortho_value_and_grad_(
    mats: Sequence[Tensor], coeff: float, transposed: Optional[Sequence[bool]] = None
) -> Tensor:
    """Add ``coeff·∇(mean_i ‖A_iᵀA_i − I‖_F)`` to each ``A_i.grad``; return the mean (device scalar).

    ``.grad`` is created where it is None; ``transposed[i]`` marks a matrix stored r×k.  A
    stack E×k×r (a MoE layer's experts) counts as its E matrices in the mean.
    Uses the grouped Triton kernel (three launches for the whole set) when
    :data:`VALUE_AND_GRAD` decides so (and the reference loop if the kernels cannot compile
    or launch on this GPU), else the reference loop.

    Example::

        >>> value = ortho_value_and_grad_([layer.U, layer.V], coeff=4e-4 / 3e-5)
    """
    tr = _flags(mats, transposed)
    if _is_sharded(mats):
        return _sharded_value_and_grad_(mats, float(coeff), tr)
    mats = list(mats)
    for a in mats:
        if a.grad is None:
            a.grad = torch.zeros_like(a)
    kernel = VALUE_AND_GRAD.decide(mats, float(coeff), tr)
    with torch.no_grad():  # the value is a report, not part of any graph
        return _value_and_grad(mats, [a.grad for a in mats], float(coeff), tr, kernel)


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
