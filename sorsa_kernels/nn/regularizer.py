"""The orthonormal regularizer over every SORSA adapter of a model."""
from __future__ import annotations

from torch import Tensor, nn

from ..ops import regularizer as _ops
from .knobs import check_gamma_rate, check_knob
from .experts import SORSAExperts
from .linear import SORSALinear

__all__ = ["orthonormal_regularizer", "add_regularizer_grad", "adapter_matrices"]


def adapter_matrices(model: nn.Module) -> list[Tensor]:
    """``[U, V]`` of every :class:`SORSALinear` in ``model`` (both stored k×r), in module order.

    A :class:`~sorsa_kernels.nn.experts.SORSAExperts` gives its stacks ``U`` (E×m×r) and
    ``V`` (E×n×r); the regularizer counts each expert's matrix on its own.
    """
    mats: list[Tensor] = []
    for module in model.modules():
        if isinstance(module, (SORSALinear, SORSAExperts)):
            mats.extend((module.U, module.V))
    if not mats:
        raise ValueError("the model has no SORSALinear layers; call sorsa_kernels.apply_sorsa first")
    return mats


def orthonormal_regularizer(model: nn.Module) -> Tensor:
    """``L_reg = mean over all adapter matrices of ‖UᵀU − I‖_F and ‖VᵀV − I‖_F`` (plain norms).

    Every expert of a mixture-of-experts layer counts as its own U and V.

    Differentiable (autograd), returned as a float32 scalar.

    Example::

        >>> model = apply_sorsa(model, rank=8)
        >>> float(orthonormal_regularizer(model))   # ~0 right after SVD init
    """
    return _ops.ortho_value(adapter_matrices(model))


def add_regularizer_grad(model: nn.Module, gamma: float = 4e-4, lr_max: float = 3e-5) -> Tensor:
    """Add ``gamma / lr_max · ∇L_reg`` to every adapter's ``.grad`` in place; return ``L_reg``.

    Call it once per optimizer step, after gradient clipping and before
    ``optimizer.step()`` (the update is never clipped).  ``.grad`` is created where it is
    None.  The gradient of ``‖G‖_F`` at ``G = 0`` is taken as 0.  On CUDA the grouped
    Triton kernel does the whole model in a constant number of launches; the value is
    returned as a device scalar (no host synchronization).

    Example::

        >>> loss.backward()
        >>> torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        >>> add_regularizer_grad(model, gamma=4e-4, lr_max=3e-5)
        >>> optimizer.step()
    """
    check_knob("gamma", gamma, required=True)  # NaN/Inf would poison every adapter's gradient
    check_knob("lr_max", lr_max, required=True)
    mats = adapter_matrices(model)
    check_gamma_rate(gamma, lr_max, mats[0].dtype)  # (gamma/lr·∇)² must fit the optimizer's state
    return _ops.ortho_value_and_grad_(mats, gamma / lr_max)
