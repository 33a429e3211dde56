"""The paper's Section 3 analysis: drift of singular values (ΔΣ) and vectors (ΔD).

For a weight ``W_t`` against its initial ``W_0`` (both m×n, k = min(m, n)), with full
SVDs computed in float64 on the CPU::

    ΔΣ = (1/k)·Σ_i |σ_t^i − σ_0^i|                                   (Eq. 1)
    ΔD = 1 − (1/2k)·Σ_i (|⟨u_t^i, u_0^i⟩| + |⟨v_t^i, v_0^i⟩|)         (Eq. 2–4)

:func:`singular_drift` is the math on two matrices; :func:`model_singular_drift` walks a
model's SORSA layers (found by :func:`~sorsa_kernels.adapters.surgery.sorsa_layers`) and its
SORSA experts projections (per expert, summarised per projection) and rebuilds each one's
initial and current weight.  It lives in ``adapters/``
because the ``analyze`` job and the public API are its users and it reads whole models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn.experts import SORSAExperts
from .surgery import sorsa_layers

__all__ = ["SingularDrift", "Spectrum", "spectrum", "drift_from", "singular_drift", "expert_singular_drift",
           "model_singular_drift"]


@dataclass(frozen=True)
class SingularDrift:
    """ΔΣ and ΔD of one layer: the mean change of its singular values and of their directions (0 = none).

    Example::

        >>> singular_drift(layer.merge().weight, W0).delta_sigma   # how far training moved the spectrum
        0.0123
    """

    delta_sigma: float
    delta_d: float


@dataclass(frozen=True)
class Spectrum:
    """The thin SVD ``W = U·diag(S)·Vh`` of a reference weight, float64 on the CPU: what ΔΣ/ΔD need
    of ``W0``, computed once and reused for every later weight (:func:`drift_from`)."""

    U: Tensor
    S: Tensor
    Vh: Tensor

    @property
    def norm(self) -> float:
        """``‖W‖_F``."""
        return float(self.S.square().sum().sqrt())


def spectrum(weight: Tensor) -> Spectrum:
    """The float64 thin SVD of a matrix (see :class:`Spectrum`)."""
    if weight.dim() != 2:
        raise ValueError(f"need a matrix, got shape {tuple(weight.shape)}")
    U, S, Vh = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=False)
    return Spectrum(U, S, Vh)


def drift_from(weight: Tensor, initial: Spectrum) -> SingularDrift:
    """ΔΣ and ΔD (Eq. 1–4) of ``weight`` against the SVD of the initial weight.

    Example::

        >>> drift_from(W0, spectrum(W0)).delta_sigma
        0.0
    """
    if tuple(weight.shape) != (initial.U.shape[0], initial.Vh.shape[1]):
        raise ValueError(f"need two matrices of one shape, got {tuple(weight.shape)} and "
                         f"{(initial.U.shape[0], initial.Vh.shape[1])}")
    now = spectrum(weight)
    k = now.S.shape[0]
    d_sigma = (now.S - initial.S).abs().mean()
    du = (now.U * initial.U).sum(0).abs()        # |⟨u_t^i, u_0^i⟩| over columns
    dv = (now.Vh * initial.Vh).sum(1).abs()      # |⟨v_t^i, v_0^i⟩| over rows of Vᵀ
    d_d = 1.0 - (du.sum() + dv.sum()) / (2 * k)
    return SingularDrift(float(d_sigma), float(d_d))


def singular_drift(weight: Tensor, initial: Tensor) -> SingularDrift:
    """ΔΣ and ΔD (Eq. 1–4) of ``weight`` against ``initial``, in float64 on the CPU.

    Example::

        >>> singular_drift(W0, W0)
        SingularDrift(delta_sigma=0.0, delta_d=0.0)
    """
    if weight.shape != initial.shape or weight.dim() != 2:
        raise ValueError(f"need two matrices of one shape, got {tuple(weight.shape)} and {tuple(initial.shape)}")
    return drift_from(weight, spectrum(initial))


def expert_singular_drift(module: SORSAExperts) -> list[SingularDrift]:
    """ΔΣ and ΔD of every expert of one SORSA experts projection (E×out×in stacks), in expert order.

    Each expert's current weight ``Wr_e + scale·U_e·diag(S_e)·V_eᵀ`` against its initial one
    (``U0, S0, V0`` of ``init_factors``), one expert at a time in float64 on the CPU.
    """
    if module.init_factors is None:
        raise ValueError("a SORSA experts projection has no initial factors (init_factors)")
    out = []
    for e in range(module.num_experts):
        res = module.dense_residual(experts=slice(e, e + 1))[0].detach().to("cpu", torch.float64)
        U0, S0, V0 = (t[e].double() for t in module.init_factors)
        U, S, V = (t[e].detach().to("cpu", torch.float64) for t in (module.U, module.S, module.V))
        w0 = res + (U0 * (S0 * module.scale)) @ V0.T
        wt = res + (U * (S * module.scale)) @ V.T
        out.append(singular_drift(wt, w0))
    return out


def model_singular_drift(model: nn.Module) -> dict[str, SingularDrift]:
    """ΔΣ and ΔD of every SORSA layer's current weight against its initial weight, and of every
    SORSA experts projection (the mean over its experts; :func:`expert_singular_drift` gives each).

    The current weight is ``Wr + scale·U·diag(S)·Vᵀ`` and the initial one
    ``Wr + scale·U0·diag(S0)·V0ᵀ`` (for QSORSA ``Wr`` is the dequantized residual),
    both assembled in float64 on the CPU.  A model with neither SORSA layers nor SORSA experts
    is an error: :func:`~sorsa_kernels.merge_sorsa` replaces them in place, so analyze a copy
    made before merging.

    Example::

        >>> adapted = copy.deepcopy(model); merge_sorsa(model)
        >>> drift = model_singular_drift(adapted)      # {layer name: SingularDrift(delta_sigma, delta_d)}
    """
    layers = sorsa_layers(model)
    experts = {n: m for n, m in model.named_modules() if isinstance(m, SORSAExperts)}
    if not layers and not experts:
        raise ValueError("the model has no SORSA layers or SORSA experts to analyze (merge_sorsa works in place: "
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
    for name, module in experts.items():
        if module.init_factors is None:
            raise ValueError(f"experts projection {name} has no initial factors")
        per_expert = expert_singular_drift(module)
        out[name] = SingularDrift(sum(d.delta_sigma for d in per_expert) / len(per_expert),
                                  sum(d.delta_d for d in per_expert) / len(per_expert))
    return out
