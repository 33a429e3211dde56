"""``SORSALinear``: a drop-in replacement for ``nn.Linear`` with a SORSA adapter."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..ops import reference
from ..ops.sorsa_linear import sorsa_linear
from .checks import (
    SUPPORTED_DTYPES,
    check_dtype,
    check_factor_shapes,
    check_linear,
    is_conv1d,
    layer_suffix,
    linear_weight,
)
from .factory import register_layer_class
from .init_spec import SORSAInit
from .knobs import check_knob
from .lowrank import init_low_rank

__all__ = ["SORSALinear", "SUPPORTED_DTYPES"]


@register_layer_class
class SORSALinear(nn.Module):
    """A linear layer ``y = x·Wrᵀ + scale·((x·V)·S)·Uᵀ + b`` with a frozen residual.

    Orientation: ``U`` is ``out_features × rank``, ``S`` is ``rank``, and ``V`` is
    ``in_features × rank`` (the paper's ``Vp``, so the principal weight is
    ``U·diag(S)·Vᵀ``).  ``U``, ``S`` and ``V`` are the only trainable parameters;
    ``residual`` (``out_features × in_features``) and ``bias`` are frozen.  ``weight``
    is a read-only alias of the residual for code that reads ``.weight.dtype`` or
    ``.device``.  ``scale`` is ``alpha / rank`` when ``alpha`` is given, else 1; the
    initial ``S`` is ``σ / scale`` so that initialization preserves the layer's output.

    The initial factors ``U0, S0, V0`` are kept on the CPU (``init_factors``) for
    :func:`sorsa_kernels.save_adapter` and :func:`sorsa_kernels.export_peft_lora`.

    A layer built from a ``transformers`` ``Conv1D`` (GPT-2 family, weight stored in×out)
    has ``fan_in_fan_out = True`` (PEFT's name for the same flag): its residual is computed
    from a transposed *view* of the Conv1D weight and stored ``out×in`` like any other, so
    no second copy of the weight exists and the Conv1D's own weight is released with it;
    :meth:`merge` returns a ``Conv1D`` again.

    Example::

        >>> lin = torch.nn.Linear(100, 72)
        >>> layer = SORSALinear.from_linear(lin, rank=8)
        >>> y = layer(torch.randn(4, 100))
        >>> plain = layer.merge()          # an nn.Linear with Wr + U·diag(S)·Vᵀ
    """

    #: Storage of the residual: None (dense) here, "nf4" for QSORSALinear.
    quantize: Optional[str] = None
    #: True when built from a ``Conv1D`` (weight stored in×out): :meth:`merge` then returns a ``Conv1D``.
    fan_in_fan_out: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        residual_dtype: torch.dtype = torch.float32,
        adapter_dtype: torch.dtype = torch.float32,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__()
        self.check_residual_dtype(residual_dtype)
        check_knob("dropout", dropout)
        self.dropout_p = float(dropout)
        init_low_rank(self, in_features, out_features, rank, bias=bias, alpha=alpha, residual_dtype=residual_dtype,
                      adapter_dtype=adapter_dtype, device=device)

    def allocate_residual(self, dtype: torch.dtype, device: Optional[Union[str, torch.device]]) -> None:
        """The frozen residual's (zero) storage: a dense out×in parameter."""
        self.residual = nn.Parameter(torch.zeros(self.out_features, self.in_features, dtype=dtype, device=device),
                                     requires_grad=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: Union[int, SORSAInit],
        *,
        name: Optional[str] = None,
        **options: Any,
    ) -> "SORSALinear":
        """Split ``linear.weight`` by SVD into a trainable top-``rank`` part and a frozen residual.

        The one body for every layer class: a subclass changes how the weight is split
        (:meth:`split_weight`) and what is recorded after (:meth:`after_split`), and declares
        its own keywords in :attr:`layer_options` (QSORSA's ``quant_report``).

        Args:
            linear: the layer to adapt (left untouched): an ``nn.Linear`` or a ``transformers``
                ``Conv1D`` (then ``fan_in_fan_out`` is set).
            rank: r, with ``1 ≤ r ≤ min(in_features, out_features)``, or a whole
                :class:`~sorsa_kernels.nn.init_spec.SORSAInit`.
            name: the layer's name, used in error messages.
            **options: fields of :class:`~sorsa_kernels.nn.init_spec.SORSAInit` (replacing the
                spec's): ``svd`` (``"full"``: ``torch.linalg.svd``; ``"randomized"``:
                ``torch.svd_lowrank`` with ``rank + oversample`` columns and ``niter`` power
                iterations), ``svd_dtype``, ``svd_device`` (default the weight's device),
                ``residual_dtype`` (default the weight's dtype), ``adapter_dtype`` (default
                float32), ``alpha`` (``scale = alpha / rank``), ``dropout``.

        The residual is always dense here; a quantized one (``quantize="nf4"``) is built by
        :func:`sorsa_kernels.nn.make_sorsa_linear` (or :func:`sorsa_kernels.apply_sorsa`),
        the one place that picks the layer class.

        ``Wr = W0 − U0·diag(σ)·V0ᵀ`` is computed in float32 on the weight's device from the
        stored (adapter-dtype) factors, then cast to ``residual_dtype``.
        """
        own = {key: options.pop(key, default) for key, default in cls.layer_options.items()}
        spec = cls.init_spec(linear, rank, name, options)
        W = linear_weight(linear)  # out×in (a transposed view for a Conv1D)
        residual_dtype = spec.residual_dtype or W.dtype
        cls.check_residual_dtype(residual_dtype, name)
        with torch.no_grad():
            w = W.detach().to(spec.svd_device) if spec.svd_device is not None else W.detach()
            factors, details = cls.split_weight(w, spec, **own)
            del w
            factors = tuple(f.to(W.device) for f in factors)
        layer = cls.from_factors(linear, *factors, alpha=spec.alpha, dropout=spec.dropout,
                                 residual_dtype=residual_dtype, name=name)
        layer.after_split(W, factors, spec, details, name=name, **own)
        return layer

    #: Keywords of :meth:`from_linear` beyond :class:`~sorsa_kernels.nn.init_spec.SORSAInit`'s fields,
    #: with their defaults; passed to :meth:`split_weight` and :meth:`after_split`.
    layer_options: dict[str, Any] = {}

    @classmethod
    def split_weight(cls, weight: Tensor, spec: SORSAInit, **own: Any) -> tuple[tuple[Tensor, Tensor, Tensor], Any]:
        """``((U0, S0, V0) in the adapter dtype, details for after_split)``: the principal
        ``spec.rank`` singular triplets of ``weight``, with ``S0 = σ / scale``."""
        U0, sigma, V0 = reference.principal_split(weight, spec.rank, svd=spec.svd, niter=spec.niter,
                                                  oversample=spec.oversample, dtype=spec.svd_dtype)
        return (U0.to(spec.factor_dtype), (sigma / spec.scale).to(spec.factor_dtype), V0.to(spec.factor_dtype)), None

    def after_split(self, weight: Tensor, factors: tuple[Tensor, ...], spec: SORSAInit, details: Any, *,
                    name: Optional[str] = None, **own: Any) -> None:
        """Record what the split found on the built layer (nothing for a dense residual)."""

    @classmethod
    def init_spec(cls, linear: nn.Module, rank: Union[int, SORSAInit], name: Optional[str],
                  options: dict[str, Any]) -> SORSAInit:
        """The :class:`~sorsa_kernels.nn.init_spec.SORSAInit` of a ``from_linear`` call, with
        ``linear`` checked against it (type, rank, dtype, finite values) before any SVD."""
        check_linear(linear, name)
        spec = SORSAInit.for_layer(cls, rank, name, options)
        spec.check_weight(linear_weight(linear), name)
        return spec

    @classmethod
    def from_factors(
        cls,
        linear: nn.Linear,
        U0: Tensor,
        S0: Tensor,
        V0: Tensor,
        *,
        trained: Optional[tuple[Tensor, Tensor, Tensor]] = None,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        residual_dtype: Optional[torch.dtype] = None,
        name: Optional[str] = None,
    ) -> "SORSALinear":
        """Build the layer from known initial factors (no SVD), optionally with trained ones.

        This is how :func:`sorsa_kernels.load_adapter` rebuilds the training-time model:
        the residual is recomputed from ``linear.weight`` and ``(U0, S0, V0)`` by the same
        float32 computation as at initialization, then kept as the class stores it
        (:meth:`store_residual`: dense here, NF4 for :class:`~sorsa_kernels.nn.qlinear.QSORSALinear`).
        ``residual_dtype`` defaults to the weight's dtype.

        Example::

            >>> again = SORSALinear.from_factors(lin, *layer.init_factors, trained=(layer.U, layer.S, layer.V))
        """
        check_linear(linear, name)
        W = linear_weight(linear)  # out×in (a transposed view for a Conv1D)
        m, n = W.shape
        check_factor_shapes(m, n, U0, S0, V0, trained, name)
        residual_dtype = residual_dtype or W.dtype
        cls.check_residual_dtype(residual_dtype, name)
        layer = cls(
            n, m, S0.shape[0], bias=linear.bias is not None, alpha=alpha, dropout=dropout,
            residual_dtype=residual_dtype, adapter_dtype=U0.dtype, device="meta",
        )
        U0, S0, V0 = (t.to(W.device) for t in (U0, S0, V0))
        with torch.no_grad():
            layer.store_residual(reference.compute_residual(W, U0, S0, V0, layer.scale), residual_dtype)
        layer._adopt_factors(linear, U0, S0, V0, trained, residual_dtype)
        return layer

    @classmethod
    def check_residual_dtype(cls, dtype: torch.dtype, name: Optional[str] = None) -> None:
        """Refuse a residual dtype this class cannot store (one line naming the layer)."""
        check_dtype(dtype, "residual_dtype" + layer_suffix(name))

    def store_residual(self, residual: Tensor, dtype: torch.dtype) -> None:
        """Keep the frozen residual ``Wr`` (out×in, float32) as this class stores it: dense, in ``dtype``."""
        self.residual = nn.Parameter(residual.to(dtype), requires_grad=False)

    def _adopt_factors(self, linear: nn.Linear, U0: Tensor, S0: Tensor, V0: Tensor,
                       trained: Optional[tuple[Tensor, Tensor, Tensor]], residual_dtype: torch.dtype) -> None:
        """Set U, S, V (trained ones if given, else the initial ones), the frozen bias,
        ``init_factors`` and ``fan_in_fan_out``; shared by every ``from_factors``."""
        self.fan_in_fan_out = is_conv1d(linear)
        dev = linear.weight.device
        src = trained if trained is not None else (U0, S0, V0)
        self.U = nn.Parameter(src[0].detach().to(dev, U0.dtype).clone())
        self.S = nn.Parameter(src[1].detach().to(dev, U0.dtype).clone())
        self.V = nn.Parameter(src[2].detach().to(dev, U0.dtype).clone())
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().to(residual_dtype).clone(), requires_grad=False)
        self.init_factors = tuple(t.detach().to("cpu").clone() for t in (U0, S0, V0))

    # ------------------------------------------------------------------ module API
    def _apply(self, fn, *args, **kwargs):
        """``Module._apply`` (``.to``, ``.half()``, ``.bfloat16()`` …), with ``init_factors``
        following a cast of the adapter: a cast model then saves in its new dtype.  The
        initial factors stay on the CPU."""
        out = super()._apply(fn, *args, **kwargs)
        init = self.init_factors
        if init is not None and self.U.is_floating_point() and init[0].dtype != self.U.dtype:
            self.init_factors = tuple(t.to(self.U.dtype) for t in init)
        return out

    @property
    def weight(self) -> Tensor:
        """The frozen residual ``Wr`` (read-only alias, for ``.dtype`` / ``.device`` checks)."""
        return self.residual

    @property
    def residual_dtype(self) -> torch.dtype:
        """The dtype the residual is computed in."""
        return self.residual.dtype

    def dense_residual(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The residual ``Wr`` as a dense tensor in ``dtype`` (default its own; dequantized for QSORSA)."""
        return self.residual if dtype is None else self.residual.to(dtype)

    def check_input(self, x: Tensor) -> None:
        """Refuse an input whose last dimension is not ``in_features`` (one line naming both)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} features in its last dimension, expected {self.in_features}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return sorsa_linear(
            x, self.residual, self.U, self.S, self.V, self.bias, self.scale,
            self.dropout_p, self.training,
        )

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable factors ``[U, S, V]``."""
        return [self.U, self.S, self.V]

    def merge(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """A plain ``nn.Linear`` holding ``Wr + scale·U·diag(S)·Vᵀ`` (and the bias).

        Computed in float32 and cast to ``dtype`` (default: the residual's dtype).  A layer
        built from a ``Conv1D`` (``fan_in_fan_out``) merges back into a ``Conv1D``.
        """
        dtype = dtype or self.residual.dtype
        with torch.no_grad():
            w = reference.merged_weight(self.residual, self.U, self.S, self.V, self.scale)
            return self._merged_module(w, dtype)

    def _merged_module(self, w: Tensor, dtype: torch.dtype) -> nn.Module:
        """An ``nn.Linear`` (a ``Conv1D`` when ``fan_in_fan_out``) holding ``w`` (out×in) and the bias, in ``dtype``."""
        if self.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D  # only a Conv1D-built layer gets here

            with torch.device(w.device):
                module = Conv1D(self.out_features, self.in_features).to(dtype)
            module.weight.copy_(w.T.to(dtype))
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                               device=w.device, dtype=dtype)
            module.weight.copy_(w.to(dtype))
        if self.bias is not None:
            module.bias.copy_(self.bias.to(dtype))
        elif self.fan_in_fan_out:
            module.bias.zero_()
        return module

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, scale={self.scale:g}, residual_dtype={self.residual.dtype}, "
            f"adapter_dtype={self.U.dtype}" + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
        )

