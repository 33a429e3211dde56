"""The one way a SORSA layer is built from an ``nn.Linear``, dense or with a quantized residual.

:func:`make_sorsa_linear` maps ``quantize`` (None → :class:`~sorsa_kernels.nn.linear.SORSALinear`,
``"nf4"`` → :class:`~sorsa_kernels.nn.qlinear.QSORSALinear`) to the layer class and calls
its ``from_linear``: it is the only place that picks a layer class (no ``from_linear``
returns another class); :func:`sorsa_kernels.apply_sorsa` and the streaming loader go
through it.  The classes enter the table by registering themselves (:func:`register_layer_class`) when their module is imported, so
this module imports neither of them and ``nn/linear.py`` need not import ``nn/qlinear.py``:
the arrows run ``qlinear → linear → factory``.  ``sorsa_kernels.nn`` imports both layer
modules, so every mode is registered before any caller can reach this module.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .knobs import check_knob

__all__ = ["make_sorsa_linear", "register_layer_class", "layer_class", "quantize_modes",
           "register_experts_class", "experts_class"]

_LAYER_CLASSES: dict[Optional[str], type] = {}
#: The same table for the fused experts of mixture-of-experts layers (``SORSAExperts`` /
#: ``QSORSAExperts``), filled the same way.
_EXPERTS_CLASSES: dict[Optional[str], type] = {}


def register_layer_class(cls: type) -> type:
    """Record ``cls`` as the layer built for ``quantize=cls.quantize``; returns ``cls`` (a class decorator)."""
    _LAYER_CLASSES[cls.quantize] = cls
    return cls


def register_experts_class(cls: type) -> type:
    """Record ``cls`` as the experts layer built for ``quantize=cls.quantize`` (a class decorator)."""
    _EXPERTS_CLASSES[cls.quantize] = cls
    return cls


def experts_class(quantize: Optional[str]) -> type:
    """The SORSA experts class for ``quantize``; a ValueError lists the allowed values otherwise.

    Example::

        >>> experts_class("nf4").__name__
        'QSORSAExperts'
    """
    if quantize not in _EXPERTS_CLASSES:
        allowed = " or ".join(repr(k) if k is not None else "None" for k in
                              (None, *sorted(k for k in _EXPERTS_CLASSES if k is not None)))
        raise ValueError(f"quantize must be {allowed} for expert weights, got {quantize!r}")
    return _EXPERTS_CLASSES[quantize]


def quantize_modes() -> tuple[Optional[str], ...]:
    """The accepted values of ``quantize``: None (dense) first, then the registered storages."""
    return (None, *sorted(k for k in _LAYER_CLASSES if k is not None))


def _allowed() -> str:
    return " or ".join(repr(k) if k is not None else "None" for k in quantize_modes())


def layer_class(quantize: Optional[str]) -> type:
    """The SORSA layer class for ``quantize``; a ValueError lists the allowed values otherwise.

    Example::

        >>> layer_class("nf4").__name__
        'QSORSALinear'
    """
    if quantize not in _LAYER_CLASSES:
        raise ValueError(f"quantize must be {_allowed()}, got {quantize!r}")
    return _LAYER_CLASSES[quantize]


def make_sorsa_linear(
    linear: nn.Linear,
    rank: int,
    *,
    quantize: Optional[str] = None,
    quant_iters: int = 1,
    **kwargs: Any,
) -> nn.Module:
    """SVD-split ``linear`` into a SORSA layer, storing the residual densely or as ``quantize``.

    Returns a :class:`~sorsa_kernels.nn.linear.SORSALinear` (a ``QSORSALinear`` for ``"nf4"``).

    Args:
        linear: the layer to adapt (left untouched).
        rank: r, with ``1 ≤ r ≤ min(in_features, out_features)``.
        quantize: None (dense residual) or ``"nf4"`` (QSORSA).
        quant_iters: error-reducing iterations of a quantized residual (ignored when dense).
        **kwargs: the layer class's ``from_linear`` arguments (``svd``, ``alpha``, ``name``,
            ``quant_report`` for a quantized layer, …).

    Example::

        >>> layer = make_sorsa_linear(torch.nn.Linear(100, 72), 8, quantize="nf4")
        >>> type(layer).__name__
        'QSORSALinear'
    """
    cls = layer_class(quantize)
    check_knob("quant_iters", quant_iters)
    for knob in ("alpha", "dropout", "niter", "oversample"):
        if knob in kwargs:
            check_knob(knob, kwargs[knob])
    if quantize is None:
        return cls.from_linear(linear, rank, **kwargs)
    return cls.from_linear(linear, rank, quant_iters=quant_iters, **kwargs)
