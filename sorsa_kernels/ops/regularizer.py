"""The orthonormal-regularizer op: value and in-place gradient over a set of matrices.

Dispatches between the grouped Triton kernel (:mod:`sorsa_kernels.kernels.ortho_reg`) and
:func:`sorsa_kernels.ops.reference.ortho_value_and_grad_`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import reference
from .dispatch import use_triton

__all__ = ["ortho_value", "ortho_value_and_grad_"]


def ortho_value(mats: Sequence[Tensor]) -> Tensor:
    """``mean_i ‖A_iᵀA_i − I‖_F`` over k×r matrices, as a float32 scalar (differentiable)."""
    if len(mats) == 0:
        raise ValueError("the regularizer needs at least one adapter matrix")
    return torch.stack([torch.linalg.matrix_norm(reference.ortho_gram(a)) for a in mats]).mean()


def ortho_value_and_grad_(mats: Sequence[Tensor], coeff: float) -> Tensor:
    """Add ``coeff·∇(mean_i ‖A_iᵀA_i − I‖_F)`` to each ``A_i.grad``; return the mean (device scalar)."""
    if len(mats) == 0:
        raise ValueError("the regularizer needs at least one adapter matrix")
    if use_triton(mats[0]):
        from ..kernels import ortho_reg

        return ortho_reg.grouped_ortho_value_and_grad_(list(mats), float(coeff))
    return reference.ortho_value_and_grad_(mats, float(coeff))
