"""How a SORSA layer is initialized, declared once: :class:`SORSAInit`.

The options that decide a layer's initial split — rank, ``alpha`` (``scale = alpha / rank``),
dropout, the SVD (full or randomized, its power iterations and oversampling, its dtype and
device), the residual and adapter dtypes, the residual's storage (``quantize``) and its
error-reducing iterations — are the fields of one frozen dataclass, checked on
construction.  The same value travels from ``FinetuneConfig`` through
:func:`sorsa_kernels.apply_sorsa` and the experts surgery to every ``from_linear`` /
``from_weight``, instead of each hop re-listing the keywords.  The layers still accept
the keywords (``SORSALinear.from_linear(lin, 8, alpha=16.0)``): :meth:`SORSAInit.of`
builds the spec from them.

Example::

    >>> spec = SORSAInit(rank=8, alpha=16.0, svd="randomized")
    >>> spec.scale
    2.0
    >>> layer = SORSALinear.from_linear(torch.nn.Linear(100, 72), spec)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .checks import check_dtype, check_svd_args, check_weight_for_svd, layer_suffix, validate_rank
from .factory import layer_class
from .knobs import check_knob, check_scale

__all__ = ["SORSAInit", "INIT_FIELDS"]


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SORSAInit:
    """The initialization of SORSA layers; every field is checked on construction (one-line errors
    naming the field).

    Example::

        >>> SORSAInit(rank=8, alpha=0.0)
        Traceback (most recent call last):
        ValueError: alpha must be a positive finite number, got 0.0
    """

    rank: int = _opt(None, "r, with 1 ≤ r ≤ min(in_features, out_features) of every adapted weight")
    alpha: Optional[float] = _opt(None, "scale = alpha / rank (None: scale 1); the initial S is σ / scale")
    dropout: float = _opt(0.0, "dropout on the low-rank branch's input (not supported on expert weights)")
    svd: str = _opt("full", "'full' (torch.linalg.svd) or 'randomized' (torch.svd_lowrank)")
    niter: int = _opt(2, "power iterations of the randomized SVD")
    oversample: int = _opt(16, "extra columns of the randomized SVD (rank + oversample)")
    svd_dtype: torch.dtype = _opt(torch.float32, "dtype the SVD runs in: float32 or float64")
    svd_device: Optional[Union[str, torch.device]] = _opt(
        None, "where the SVD of a linear weight runs (default the weight's device; experts use theirs)")
    residual_dtype: Optional[torch.dtype] = _opt(None, "dtype of the frozen residual (default the weight's)")
    adapter_dtype: Optional[torch.dtype] = _opt(None, "dtype of U, S, V (default float32)")
    quantize: Optional[str] = _opt(None, "storage of the residual: None (dense) or 'nf4' (QSORSA)")
    quant_iters: int = _opt(1, "error-reducing iterations of a quantized residual (0: plain NF4)")

    def __post_init__(self) -> None:
        check_knob("rank", self.rank, required=True)
        for name in ("alpha", "dropout", "niter", "oversample", "quant_iters"):
            check_knob(name, getattr(self, name), required=name != "alpha")
        check_svd_args(self.svd, self.svd_dtype)
        check_dtype(self.residual_dtype, "residual_dtype")
        check_dtype(self.adapter_dtype, "adapter_dtype")
        layer_class(self.quantize)  # an unknown storage names the allowed ones
        check_scale(self.alpha, self.rank, self.adapter_dtype)  # S = σ/scale and scale·S representable

    @classmethod
    def of(cls, rank: Union[int, "SORSAInit"], name: Optional[str] = None, **options: Any) -> "SORSAInit":
        """``rank`` when it is already a spec (with ``options`` replacing its fields), else
        ``SORSAInit(rank=rank, **options)``; a bad value's error ends with the layer ``name``.

        Example::

            >>> SORSAInit.of(SORSAInit(rank=8), alpha=4.0).alpha
            4.0
        """
        unknown = sorted(set(options) - set(INIT_FIELDS))
        if unknown:
            raise TypeError(f"unknown SORSA init option {unknown[0]!r}; allowed: {', '.join(INIT_FIELDS)}")
        try:
            if isinstance(rank, SORSAInit):
                return dataclasses.replace(rank, **options) if options else rank
            return cls(rank=rank, **options)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e}{layer_suffix(name)}") from None

    @classmethod
    def for_layer(cls, layer_cls: type, rank: Union[int, "SORSAInit"], name: Optional[str],
                  options: dict[str, Any]) -> "SORSAInit":
        """:meth:`of` for a ``from_linear`` / ``from_weight`` of ``layer_cls``, whose storage is its own
        (``layer_cls.quantize``): asking one class for another's storage is a TypeError (the factory
        picks the class for a storage)."""
        quantize = options.pop("quantize", getattr(rank, "quantize", layer_cls.quantize))
        if quantize != layer_cls.quantize:
            raise TypeError(f"{layer_cls.__name__} stores a {layer_cls.quantize or 'dense'} residual, not "
                            f"quantize={quantize!r}; sorsa_kernels.nn.factory picks the class for a storage")
        return cls.of(rank, name, quantize=layer_cls.quantize, **options)

    @property
    def scale(self) -> float:
        """``alpha / rank``, or 1 without ``alpha``."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def factor_dtype(self) -> torch.dtype:
        """The dtype of U, S, V: ``adapter_dtype`` or float32."""
        return self.adapter_dtype or torch.float32

    def check_weight(self, weight: Tensor, name: Optional[str] = None) -> None:
        """Refuse a weight (out×in, or a stack E×out×in) this spec cannot split, before any work:
        the rank above min(out, in), an unsupported dtype, NaN/Inf or meta values.

        Example::

            >>> SORSAInit(rank=300).check_weight(torch.randn(512, 256), "model.layers.0.mlp.down_proj")
            Traceback (most recent call last):
            ValueError: rank 300 exceeds min(in_features, out_features) = 256 for layer model.layers.0.mlp.down_proj
        """
        self.check_shape(tuple(weight.shape), name)
        check_dtype(weight.dtype, "weight dtype" + layer_suffix(name))
        check_weight_for_svd(weight, name)

    def check_shape(self, shape: tuple, name: Optional[str] = None) -> None:
        """Refuse a weight shape (…×out×in) whose smaller side is below the rank (no values read)."""
        validate_rank(self.rank, shape[-1], shape[-2], name)


#: The field names of :class:`SORSAInit`: the keywords every ``from_linear`` / ``from_weight`` accepts.
INIT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SORSAInit) if f.name != "rank")
