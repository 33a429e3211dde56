"""The paper's Section 3 analysis: drift of singular values (ΔΣ) and vectors (ΔD).

For a weight ``W_t`` against its initial ``W_0`` (both m×n, k = min(m, n)), with full
SVDs computed in float64 on the CPU::

    ΔΣ = (1/k)·Σ_i |σ_t^i − σ_0^i|                                   (Eq. 1)
    ΔD = 1 − (1/2k)·Σ_i (|⟨u_t^i, u_0^i⟩| + |⟨v_t^i, v_0^i⟩|)         (Eq. 2–4)

:func:`singular_drift` is the math on two matrices; :func:`model_singular_drift` walks a
model's SORSA layers (found by :func:`~sorsa_kernels.adapters.surgery.sorsa_layers`)
and rebuilds each one's initial and current weight.  It lives in ``adapters/``
because the ``analyze`` job and the public API are its users and it reads whole models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .surgery import sorsa_layers

__all__ = ["SingularDrift", "singular_drift", "model_singular_drift"]


@dataclass(frozen=True)
class SingularDrift:
    """ΔΣ and ΔD of one layer: the mean change of its singular values and of their directions (0 = none).

    Example::

        >>> singular_drift(layer.merge().weight, W0).delta_sigma   # how far training moved the spectrum
        0.0123
    """

    delta_sigma: float
    delta_d: float


def singular_drift(weight: Tensor, initial: Tensor) -> SingularDrift:
    """ΔΣ and ΔD (Eq. 1–4) of ``weight`` against ``initial``, in float64 on the CPU.

    Example::

        >>> singular_drift(W0, W0)
        SingularDrift(delta_sigma=0.0, delta_d=0.0)
    """
    if weight.shape != initial.shape or weight.dim() != 2:
        raise ValueError(f"need two matrices of one shape, got {tuple(weight.shape)} and {tuple(initial.shape)}")
    Ut, st, Vht = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=False)
    U0, s0, Vh0 = torch.linalg.svd(initial.detach().to("cpu", torch.float64), full_matrices=False)
    k = st.shape[0]
    d_sigma = (st - s0).abs().mean()
    du = (Ut * U0).sum(0).abs()           # |⟨u_t^i, u_0^i⟩| over columns
    dv = (Vht * Vh0).sum(1).abs()         # |⟨v_t^i, v_0^i⟩| over rows of Vᵀ
    d_d = 1.0 - (du.sum() + dv.sum()) / (2 * k)
    return SingularDrift(float(d_sigma), float(d_d))


def model_singular_drift(model: nn.Module) -> dict[str, SingularDrift]:
    """ΔΣ and ΔD of every SORSA layer's current weight against its initial weight.

    The current weight is ``Wr + scale·U·diag(S)·Vᵀ`` and the initial one
    ``Wr + scale·U0·diag(S0)·V0ᵀ`` (for QSORSA ``Wr`` is the dequantized residual),
    both assembled in float64 on the CPU.  A model without SORSA layers is an error:
    :func:`~sorsa_kernels.merge_sorsa` replaces them in place, so analyze a copy made before merging.

    Example::

        >>> adapted = copy.deepcopy(model); merge_sorsa(model)
        >>> drift = model_singular_drift(adapted)      # {layer name: SingularDrift(delta_sigma, delta_d)}
    """
    layers = sorsa_layers(model)
    if not layers:
        raise ValueError("the model has no SORSA layers to analyze (merge_sorsa works in place: "
                         "analyze a copy made before merging)")
    out = {}
    for name, layer in layers.items():
        if layer.init_factors is None:
            raise ValueError(f"layer {name} has no initial factors")
        res = layer.dense_residual().detach().to("cpu", torch.float64)  # dequantized for QSORSA
        U0, S0, V0 = (t.double() for t in layer.init_factors)
        U, S, V = (t.detach().to("cpu", torch.float64) for t in (layer.U, layer.S, layer.V))
        w0 = res + (U0 * (S0 * layer.scale)) @ V0.T
        wt = res + (U * (S * layer.scale)) @ V.T
        out[name] = singular_drift(wt, w0)
    return out
