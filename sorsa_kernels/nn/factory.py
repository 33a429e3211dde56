"""The one way a SORSA layer is built from an ``nn.Linear``, dense or with a quantized residual.

:func:`make_sorsa_linear` maps ``quantize`` (None → :class:`~sorsa_kernels.nn.linear.SORSALinear`,
``"nf4"`` → :class:`~sorsa_kernels.nn.qlinear.QSORSALinear`) and the adapter kind being built
(:func:`~sorsa_kernels.nn.kinds.building`; ``"sorsa"`` unless a kind added from outside is
chosen) to the layer class and calls its ``from_linear``: it is the only place that picks a
layer class (no ``from_linear`` returns another class); :func:`sorsa_kernels.apply_sorsa`, the
streaming loader and ``load_adapter`` go through it.  The classes enter the table
(:mod:`~sorsa_kernels.nn.kinds`) by registering themselves (:func:`register_layer_class`) when
their module is imported, so this module imports neither of them and ``nn/linear.py`` need not
import ``nn/qlinear.py``: the arrows run ``qlinear → linear → factory → kinds``.
``sorsa_kernels.nn`` imports both layer modules, so every mode is registered before any caller
can reach this module.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .kinds import DEFAULT_METHOD, AdapterKind, find_kind, register_kind, registered_kinds
from .knobs import check_knob

__all__ = ["make_sorsa_linear", "register_layer_class", "layer_class", "quantize_modes",
           "register_experts_class", "experts_class"]


def register_layer_class(cls: type) -> type:
    """Record ``cls`` as the SORSA layer built for ``quantize=cls.quantize``; returns ``cls`` (a class decorator)."""
    register_kind(AdapterKind(DEFAULT_METHOD, cls, quantize=cls.quantize, label="QSORSA" if cls.quantize else "SORSA"))
    return cls


def register_experts_class(cls: type) -> type:
    """Record ``cls`` as the SORSA experts layer built for ``quantize=cls.quantize`` (a class decorator)."""
    register_kind(AdapterKind(DEFAULT_METHOD, cls, quantize=cls.quantize, experts=True,
                              label="QSORSA experts" if cls.quantize else "SORSA experts"))
    return cls


def experts_class(quantize: Optional[str], kind: Optional[str] = None) -> type:
    """The experts class for ``quantize`` of ``kind`` (default: the kind being built, ``"sorsa"``);
    a ValueError lists the allowed values otherwise.

    Example::

        >>> experts_class("nf4").__name__
        'QSORSAExperts'
    """
    return find_kind(kind, quantize, experts=True).module_class


def quantize_modes(kind: str = DEFAULT_METHOD) -> tuple[Optional[str], ...]:
    """The accepted values of ``quantize`` for ``kind``'s layers: None (dense) first, then the registered storages."""
    modes = {k.quantize for k in registered_kinds() if k.method == kind and not k.experts}
    return (None,) * (None in modes) + tuple(sorted(q for q in modes if q is not None))


def layer_class(quantize: Optional[str], kind: Optional[str] = None) -> type:
    """The layer class for ``quantize`` of ``kind`` (default: the kind being built, ``"sorsa"``);
    a ValueError lists the allowed values otherwise.

    Example::

        >>> layer_class("nf4").__name__
        'QSORSALinear'
    """
    return find_kind(kind, quantize).module_class


def make_sorsa_linear(
    linear: nn.Linear,
    rank: int,
    *,
    quantize: Optional[str] = None,
    quant_iters: int = 1,
    kind: Optional[str] = None,
    **kwargs: Any,
) -> nn.Module:
    """SVD-split ``linear`` into a SORSA layer, storing the residual densely or as ``quantize``.

    Returns a :class:`~sorsa_kernels.nn.linear.SORSALinear` (a ``QSORSALinear`` for ``"nf4"``).

    Args:
        linear: the layer to adapt (left untouched).
        rank: r, with ``1 ≤ r ≤ min(in_features, out_features)``.
        quantize: None (dense residual) or ``"nf4"`` (QSORSA).
        quant_iters: error-reducing iterations of a quantized residual (ignored when dense).
        kind: the adapter kind's method (default: :func:`~sorsa_kernels.nn.kinds.building_method`, ``"sorsa"``).
        **kwargs: the layer class's ``from_linear`` arguments (``svd``, ``alpha``, ``name``,
            ``quant_report`` for a quantized layer, …).

    Example::

        >>> layer = make_sorsa_linear(torch.nn.Linear(100, 72), 8, quantize="nf4")
        >>> type(layer).__name__
        'QSORSALinear'
    """
    cls = layer_class(quantize, kind)
    check_knob("quant_iters", quant_iters)
    for knob in ("alpha", "dropout", "niter", "oversample"):
        if knob in kwargs:
            check_knob(knob, kwargs[knob])
    if quantize is None:
        return cls.from_linear(linear, rank, **kwargs)
    return cls.from_linear(linear, rank, quant_iters=quant_iters, **kwargs)
