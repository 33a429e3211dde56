"""``QSORSALinear``: SORSA with the frozen residual stored in 4-bit NF4 (QSORSA).

The residual ``Wr = W0 − scale·U0·diag(S0)·V0ᵀ`` is computed in float32 and stored as
NF4 with blocksize 64 and double-quantized absmax in the bitsandbytes layout (about
4.127 bits per weight instead of 16), optionally after error-reducing iterations that
re-take the SVD of ``W0 − deq(Q)`` (see :mod:`sorsa_kernels.quant.init`).  Forward and
input gradient run a fused GEMM that dequantizes NF4 tiles inside its K loop.

Note on export: the model trained here computes with ``deq(Q)``, not with ``Wr``.  A
LoRA exported for the *unquantized* base model (``export_peft_lora``) therefore differs
from the quantized training model by the quantization error ``Wr − deq(Q)`` — the same
caveat PEFT states for PiSSA/LoftQ conversions.  Merging (:meth:`QSORSALinear.merge`)
merges into ``deq(Q)``.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..ops import reference
from ..ops.qsorsa_linear import qsorsa_linear
from ..quant.dense_view import NF4DenseView
from ..quant.init import REPORT_MODES, LayerQuantReport, layer_quant_report
from ..quant.nf4 import BLOCKSIZE, NESTED_BLOCKSIZE, NF4Weight, dequantize_nf4_bnb, quantize_nf4
from .checks import layer_suffix
from .factory import register_layer_class
from .init_spec import SORSAInit
from .linear import SORSALinear
from .qinit import error_reducing_split

__all__ = ["QSORSALinear", "NF4_DTYPES", "NF4_PARAMETERS"]

#: dtypes deq(Q) can be produced in (bitsandbytes' QuantState.dtype).
NF4_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float32 NF4 state (absmax scales, offset, code tables) is held bit-cast to int32 so
# that ``model.half()`` / ``model.to(torch.bfloat16)`` — which cast floating tensors —
# leave it exact; ``nf4()`` views it back as float32.
_FLOAT_BUFFERS = ("nf4_nested_absmax", "nf4_nested_code", "nf4_offset", "nf4_code")
# The storage whose size scales with the weight is held as frozen parameters (FSDP2 shards
# parameters, not buffers); the constant tables stay replicated buffers.
NF4_PARAMETERS = ("nf4_packed", "nf4_absmax", "nf4_nested_absmax")


def _frozen(t: Tensor) -> nn.Parameter:
    """A frozen parameter: the per-block NF4 storage, so that FSDP2 ``fully_shard`` shards it."""
    return nn.Parameter(t, requires_grad=False)


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


_SHARDED = (
    "the NF4 residual of this layer is sharded by FSDP2 (fully_shard); outside the forward, "
    "gather it first: `with sorsa_kernels.distributed.fsdp.unsharded(model): ...`"
)


class _ShardedNF4View(NF4DenseView):
    """``residual`` of an FSDP2-sharded layer: dtype/shape/device as usual; using the values
    raises (the bytes are spread over the ranks)."""

    @staticmethod
    def __new__(cls, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> "_ShardedNF4View":
        view = Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)
        view.nf4 = None
        view._dense = None
        return view

    def dequantize(self) -> Tensor:
        raise RuntimeError(_SHARDED)


def _check_nf4_dtype(dtype: torch.dtype, name: Optional[str]) -> None:
    if dtype not in NF4_DTYPES:
        raise TypeError(
            f"QSORSA residual_dtype must be float32, float16 or bfloat16 (the dtypes NF4 dequantizes to), "
            f"got {dtype}{layer_suffix(name)}"
        )


@register_layer_class
class QSORSALinear(SORSALinear):
    """SORSA linear layer whose frozen residual is NF4 (4-bit, blocksize 64, double-quantized).

    Same API as :class:`SORSALinear` — trainable ``U`` (out×r), ``S`` (r), ``V`` (in×r),
    ``scale``, ``init_factors``, ``adapter_parameters()``, ``merge()``, ``from_linear`` /
    ``from_factors`` — but the residual is held as module state (so ``.to(device)`` moves it):

    * frozen parameters (``requires_grad=False``; FSDP2 ``fully_shard`` shards them on dim 0,
      see :mod:`sorsa_kernels.distributed.fsdp`): ``nf4_packed`` uint8 ``[(m·n+1)//2, 1]``,
      ``nf4_absmax`` uint8 (the bitsandbytes layout) and ``nf4_nested_absmax`` (float32
      stored bit-cast as int32);
    * buffers (small constants, replicated): ``nf4_nested_code``, ``nf4_offset``, ``nf4_code``,
      float32 stored bit-cast as int32 — so dtype casts of the model cannot alter any of them.

    ``nf4()`` returns them as an :class:`~sorsa_kernels.quant.nf4.NF4Weight`,
    ``quant_state()`` as bitsandbytes' ``(packed, QuantState)``.  ``residual`` and
    ``weight`` are lazy views of ``deq(Q)`` (m×n in ``compute_dtype``): their ``dtype``,
    ``shape`` and ``device`` are free, and only using their values dequantizes; the
    forward never uses them.
    ``quant_report`` holds the :class:`~sorsa_kernels.quant.init.LayerQuantReport` of
    ``from_linear`` (None after ``from_factors``).

    Example::

        >>> lin = torch.nn.Linear(100, 72)
        >>> layer = QSORSALinear.from_linear(lin, rank=8, quant_iters=1)
        >>> y = layer(torch.randn(4, 100))
        >>> layer.quant_report.fro_reduction      # error removed vs NF4(W0)
        >>> plain = layer.merge()                 # nn.Linear with deq(Q) + U·diag(S)·Vᵀ
    """

    quantize = "nf4"

    def allocate_residual(self, dtype: torch.dtype, device: Optional[Union[str, torch.device]]) -> None:
        """The NF4 storage (bitsandbytes layout, zeros): packed bytes, absmax codes and nested absmax as
        frozen parameters (so FSDP2 shards them), offsets and code tables as buffers; ``dtype`` is the
        compute dtype ``deq(Q)`` is produced in.  ``quant_report`` starts empty (``from_linear`` fills it)."""
        self.quant_report: Optional[LayerQuantReport] = None
        self.compute_dtype = dtype
        self.blocksize = BLOCKSIZE
        self.nested_blocksize = NESTED_BLOCKSIZE
        numel = self.in_features * self.out_features
        nblocks = -(-numel // BLOCKSIZE)
        fk = dict(device=device)
        self.nf4_packed = _frozen(torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8, **fk))
        self.nf4_absmax = _frozen(torch.zeros(nblocks, dtype=torch.uint8, **fk))
        self.nf4_nested_absmax = _frozen(torch.zeros(-(-nblocks // NESTED_BLOCKSIZE), dtype=torch.int32, **fk))
        self.register_buffer("nf4_nested_code", torch.zeros(256, dtype=torch.int32, **fk))
        self.register_buffer("nf4_offset", torch.zeros(1, dtype=torch.int32, **fk))
        self.register_buffer("nf4_code", torch.zeros(16, dtype=torch.int32, **fk))

    # ------------------------------------------------------------------ NF4 storage
    def nf4(self) -> NF4Weight:
        """The residual's NF4 storage (views of this layer's tensors; no copy)."""
        if _is_dtensor(self.nf4_packed):
            raise RuntimeError(_SHARDED)
        return NF4Weight(
            packed=self.nf4_packed,
            absmax=self.nf4_absmax,
            nested_absmax=self.nf4_nested_absmax.view(torch.float32),
            nested_code=self.nf4_nested_code.view(torch.float32),
            offset=self.nf4_offset.view(torch.float32),
            code=self.nf4_code.view(torch.float32),
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.compute_dtype,
            blocksize=self.blocksize,
            nested_blocksize=self.nested_blocksize,
        )

    def set_nf4(self, q: NF4Weight) -> None:
        """Replace the stored residual by ``q`` (same shape; blocksize 64, nested 256).

        Example::

            >>> layer.set_nf4(NF4Weight.from_bnb(packed, quant_state))
        """
        shape = (self.out_features, self.in_features)
        if tuple(q.shape) != shape:
            raise ValueError(f"NF4 residual has shape {tuple(q.shape)} but the layer needs {shape}")
        if (q.blocksize, q.nested_blocksize) != (BLOCKSIZE, NESTED_BLOCKSIZE):
            raise ValueError(
                f"QSORSA stores blocksize {BLOCKSIZE} with nested blocksize {NESTED_BLOCKSIZE}; "
                f"got {q.blocksize} and {q.nested_blocksize}"
            )
        _check_nf4_dtype(q.dtype, None)
        with torch.no_grad():
            self.nf4_packed = _frozen(q.packed.reshape(-1, 1).contiguous())
            self.nf4_absmax = _frozen(q.absmax.reshape(-1).contiguous())
            self.nf4_nested_absmax = _frozen(q.nested_absmax.float().reshape(-1).contiguous().view(torch.int32))
            self.nf4_nested_code = q.nested_code.float().reshape(-1).contiguous().view(torch.int32)
            self.nf4_offset = q.offset.float().reshape(1).contiguous().view(torch.int32)
            self.nf4_code = q.code.float().reshape(-1).contiguous().view(torch.int32)
        self.compute_dtype = q.dtype

    def quant_state(self):
        """``(packed, bitsandbytes.functional.QuantState)`` of the residual, for bitsandbytes.

        ``bitsandbytes.functional.dequantize_4bit(*layer.quant_state())`` equals ``layer.residual``;
        ``state.as_dict(packed=True)`` serializes it as ``bnb.nn.Linear4bit`` does.
        """
        return self.nf4().to_bnb()

    @property
    def residual(self) -> Tensor:
        """``deq(Q)`` (``out×in``, ``compute_dtype``) as a lazy :class:`~sorsa_kernels.quant.dense_view.NF4DenseView`.

        ``.dtype``, ``.shape`` and ``.device`` cost nothing; using the values dequantizes
        (once per access of this property).  :meth:`dense_residual` returns the dense tensor.
        """
        if _is_dtensor(self.nf4_packed):  # FSDP2-sharded: metadata still free, values need a gather
            return _ShardedNF4View((self.out_features, self.in_features), self.compute_dtype,
                                   self.nf4_packed.device)
        return NF4DenseView(self.nf4(), self.compute_dtype)

    def dense_residual(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``deq(Q)`` as a dense ``out×in`` tensor in ``dtype`` (default ``compute_dtype``).

        Example::

            >>> Wr = layer.dense_residual(torch.float32)
        """
        return dequantize_nf4_bnb(self.nf4(), dtype or self.compute_dtype)

    @property
    def residual_dtype(self) -> torch.dtype:
        """The compute dtype of the dequantized residual (no dequantization)."""
        return self.compute_dtype

    @property
    def weight(self) -> Tensor:
        """Alias of :attr:`residual` (lazy: ``.dtype``/``.shape``/``.device`` without dequantizing)."""
        return self.residual

    # ------------------------------------------------------------------ construction
    #: ``quant_report`` of :meth:`~sorsa_kernels.nn.linear.SORSALinear.from_linear`: ``"full"``
    #: (Frobenius and nuclear errors; two extra SVDs of the weight's size), ``"fro"`` (Frobenius
    #: only) or None; stored as ``.quant_report``.
    layer_options = {"quant_report": "full"}

    @classmethod
    def split_weight(cls, weight: Tensor, spec: SORSAInit, *, quant_report: Optional[str] = "full") -> tuple[Any, Any]:
        """The SVD split, then ``spec.quant_iters`` error-reducing iterations (T; 0 = plain: NF4 of
        the SVD residual; they run on ``svd_device`` too); details: ``(history, best_iter)``.
        ``residual_dtype`` is the dtype ``deq(Q)`` is produced in (the compute dtype; default the
        weight's dtype; float32, float16 or bfloat16).  The residual is then rebuilt by
        :meth:`from_factors` from the kept factors, so ``from_factors(linear, *layer.init_factors)``
        reproduces the layer bit for bit."""
        if quant_report not in REPORT_MODES:
            raise ValueError(f"quant_report must be one of {REPORT_MODES}, got {quant_report!r}")
        factors, history, best_iter = error_reducing_split(
            weight, spec.rank, iters=spec.quant_iters, scale=spec.scale, svd=spec.svd, niter=spec.niter,
            oversample=spec.oversample, svd_dtype=spec.svd_dtype, factor_dtype=spec.factor_dtype,
        )
        return factors, (history, best_iter)

    def after_split(self, weight: Tensor, factors: tuple[Tensor, ...], spec: SORSAInit, details: Any, *,
                    name: Optional[str] = None, quant_report: Optional[str] = "full") -> None:
        """Fill ``.quant_report`` (unless ``quant_report`` is None): the NF4 error of the residual."""
        if quant_report is None:
            return
        history, best_iter = details
        with torch.no_grad():
            res = reference.compute_residual(weight, *factors, self.scale)
            self.quant_report = layer_quant_report(
                weight, res, self.nf4(), rank=spec.rank, iters=spec.quant_iters, best_iter=best_iter,
                history=history, nuclear=quant_report == "full", name=name or "",
            )

    @classmethod
    def check_residual_dtype(cls, dtype: torch.dtype, name: Optional[str] = None) -> None:
        """Refuse a compute dtype NF4 cannot dequantize into (float32, float16 or bfloat16 only)."""
        _check_nf4_dtype(dtype, name)

    def store_residual(self, residual: Tensor, dtype: torch.dtype) -> None:
        """Keep ``Q = NF4(Wr)`` with ``dtype`` as the compute dtype: deterministic, so
        :meth:`from_factors` (inherited) re-derives it from the file's factors bit for bit."""
        self.set_nf4(quantize_nf4(residual, dtype=dtype))

    # ------------------------------------------------------------------ module API
    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return qsorsa_linear(
            x, self.nf4(), self.U, self.S, self.V, self.bias, self.scale, self.dropout_p, self.training,
        )

    def merge(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """A plain ``nn.Linear`` holding ``deq(Q) + scale·U·diag(S)·Vᵀ`` (and the bias).

        Computed in float32 and cast to ``dtype`` (default ``compute_dtype``, the original
        weight's dtype — bf16 for a bf16 model).  A layer built from a ``Conv1D``
        (``fan_in_fan_out``) merges back into a ``Conv1D``.
        """
        dtype = dtype or self.compute_dtype
        with torch.no_grad():
            res = self.dense_residual(torch.float32)
            w = reference.merged_weight(res, self.U, self.S, self.V, self.scale)
            del res
            return self._merged_module(w, dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, scale={self.scale:g}, residual=nf4(blocksize={self.blocksize}, "
            f"double-quantized), compute_dtype={self.compute_dtype}, adapter_dtype={self.U.dtype}"
            + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
        )
