"""``QSORSAExperts``: SORSA experts whose frozen residual is NF4 per expert (QSORSA for MoE).

Each expert's residual ``Wr_e = W0_e − scale·U0_e·diag(S0_e)·V0_eᵀ`` is computed in float32
and quantized on its own, exactly as :class:`~sorsa_kernels.nn.qlinear.QSORSALinear` stores
one matrix (NF4, blocksize 64, double-quantized absmax, the bitsandbytes layout), after the
same error-reducing iterations (:func:`~sorsa_kernels.nn.qinit.error_reducing_split`, per
expert).  The E experts' storages are stacked on a leading expert dimension, so FSDP2
``fully_shard`` shards them by expert like the dense layers' packed bytes.

The forward (:func:`~sorsa_kernels.ops.experts.qsorsa_experts`) runs, on the Triton path, one
grouped NF4 kernel per projection that dequantizes each expert's tiles inside its K loop; on
the reference path it dequantizes a chunk of the experts that received rows at a time
(``expert_chunk``, capped at half the experts): the E×m×n stack is never formed.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..ops import reference
from ..ops.experts import dequantize_experts, qsorsa_experts
from ..quant.dense_view import NF4DenseView
from ..quant.nf4 import BLOCKSIZE, NESTED_BLOCKSIZE, NF4Weight, quantize_nf4
from .checks import layer_suffix
from .experts import DEFAULT_EXPERT_CHUNK, SORSAExperts, expert_chunks
from .factory import register_experts_class
from .init_spec import SORSAInit
from .qinit import error_reducing_split
from .qlinear import NF4_DTYPES

__all__ = ["QSORSAExperts"]

_SHARDED = (
    "the NF4 experts of this layer are sharded by FSDP2 (fully_shard); outside the forward, "
    "gather them first: `with sorsa_kernels.distributed.fsdp.unsharded(model): ...`"
)


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _check_nf4_dtype(dtype: torch.dtype, name: Optional[str]) -> None:
    if dtype not in NF4_DTYPES:
        raise TypeError(
            f"QSORSA residual_dtype must be float32, float16 or bfloat16 (the dtypes NF4 dequantizes to), "
            f"got {dtype}{layer_suffix(name)}"
        )


class _ExpertsResidualView(NF4DenseView):
    """``residual`` of a :class:`QSORSAExperts`: E×out×in metadata for free; using the values
    dequantizes the whole stack (:meth:`QSORSAExperts.dense_residual`)."""

    @staticmethod
    def __new__(cls, layer: "QSORSAExperts") -> "_ExpertsResidualView":
        shape = (layer.num_experts, layer.out_features, layer.in_features)
        view = Tensor._make_wrapper_subclass(cls, shape, dtype=layer.compute_dtype, device=layer.nf4_packed.device,
                                             requires_grad=False)
        view.nf4 = None
        view._dense = None
        view.layer = layer
        return view

    def dequantize(self) -> Tensor:
        if self._dense is None:
            self._dense = self.layer.dense_residual()
        return self._dense


@register_experts_class
class QSORSAExperts(SORSAExperts):
    """E QSORSA linears in one stack: :class:`SORSAExperts` with each expert's residual in NF4.

    Storage (E = experts, P = ⌈out·in/2⌉ bytes, B = ⌈out·in/64⌉ blocks, N = ⌈B/256⌉):

    * frozen parameters, sharded by FSDP2 on the expert dimension: ``nf4_packed`` uint8 E×P,
      ``nf4_absmax`` uint8 E×B, ``nf4_nested_absmax`` E×N (float32 held bit-cast as int32);
    * buffers: ``nf4_offset`` (E,) (float32 as int32), ``nf4_nested_code`` (256,) and
      ``nf4_code`` (16,) — the constant tables, shared by every expert.

    ``expert_nf4(e)`` is expert e's :class:`~sorsa_kernels.quant.nf4.NF4Weight` (bitsandbytes
    reads it: ``expert_nf4(e).to_bnb()``); ``residual`` is a lazy E×out×in view (metadata
    free); ``dense_residual()`` dequantizes explicitly.

    Example::

        >>> w = torch.randn(4, 32, 16)                          # E × out × in
        >>> layer = QSORSAExperts.from_weight(w, rank=4, quant_iters=1)
        >>> y = layer(torch.randn(10, 16), torch.tensor([3, 0, 5, 2]))
        >>> merged = layer.merged_weight()                     # deq(Q) + U·diag(S)·Vᵀ per expert
    """

    quantize = "nf4"

    @staticmethod
    def check_residual_dtype(dtype: torch.dtype) -> None:
        """The compute dtype of the NF4 residual: one of the NF4 layer's dtypes."""
        _check_nf4_dtype(dtype, None)

    def allocate_residual(self, dtype: torch.dtype, device: Optional[Union[str, torch.device]]) -> None:
        """The NF4 storage per expert (bitsandbytes layout, zeros): packed bytes, absmax codes and
        nested absmax as frozen parameters (so FSDP2 shards them), offsets and code tables as buffers."""
        self.compute_dtype = dtype
        self.blocksize, self.nested_blocksize = BLOCKSIZE, NESTED_BLOCKSIZE
        self.expert_chunk = DEFAULT_EXPERT_CHUNK
        E, numel = self.num_experts, self.out_features * self.in_features
        nblocks = -(-numel // BLOCKSIZE)
        fk = dict(device=device)
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.nf4_packed = frozen(torch.zeros(E, (numel + 1) // 2, dtype=torch.uint8, **fk))
        self.nf4_absmax = frozen(torch.zeros(E, nblocks, dtype=torch.uint8, **fk))
        self.nf4_nested_absmax = frozen(torch.zeros(E, -(-nblocks // NESTED_BLOCKSIZE), dtype=torch.int32, **fk))
        self.register_buffer("nf4_offset", torch.zeros(E, dtype=torch.int32, **fk))
        self.register_buffer("nf4_nested_code", torch.zeros(256, dtype=torch.int32, **fk))
        self.register_buffer("nf4_code", torch.zeros(16, dtype=torch.int32, **fk))

    # ------------------------------------------------------------------ NF4 storage
    def nf4_tensors(self) -> tuple[Tensor, ...]:
        """``(packed, absmax, nested_absmax, nested_code, offset, code)`` stacks, as the op takes them."""
        if _is_dtensor(self.nf4_packed):
            raise RuntimeError(_SHARDED)
        return (self.nf4_packed, self.nf4_absmax, self.nf4_nested_absmax.view(torch.float32),
                self.nf4_nested_code.view(torch.float32), self.nf4_offset.view(torch.float32),
                self.nf4_code.view(torch.float32))

    def expert_nf4(self, e: int) -> NF4Weight:
        """Expert ``e``'s residual as an :class:`NF4Weight` (views of this layer's storage)."""
        packed, absmax, nested_absmax, nested_code, offset, code = self.nf4_tensors()
        return NF4Weight(packed=packed[e].reshape(-1, 1), absmax=absmax[e], nested_absmax=nested_absmax[e],
                         nested_code=nested_code, offset=offset[e], code=code,
                         shape=torch.Size((self.out_features, self.in_features)), dtype=self.compute_dtype,
                         blocksize=self.blocksize, nested_blocksize=self.nested_blocksize)

    def store_residual(self, weight: Tensor, U0: Tensor, S0: Tensor, V0: Tensor, dtype: torch.dtype,
                       expert_chunk: int = DEFAULT_EXPERT_CHUNK) -> None:
        """Store ``NF4(W0_e − scale·U0_e·diag(S0_e)·V0_eᵀ)`` per expert (the residual in float32 a
        chunk of experts at a time; deterministic, so an adapter file needs only the factors)."""
        _check_nf4_dtype(dtype, None)
        E = self.num_experts
        qs = []
        for sl in expert_chunks(E, expert_chunk):
            res = reference.compute_residual(weight[sl], U0[sl], S0[sl], V0[sl], self.scale)
            qs.extend(quantize_nf4(res[i], dtype=dtype) for i in range(res.shape[0]))
            del res
        for label in ("nested_code", "code"):
            first = getattr(qs[0], label)
            if any(not torch.equal(getattr(q, label), first) for q in qs[1:]):  # pragma: no cover - bnb constants
                raise RuntimeError(f"bitsandbytes quantized the experts with different {label} tables")
        stack = lambda label: torch.stack([getattr(q, label).reshape(-1) for q in qs])  # noqa: E731
        frozen = lambda t: nn.Parameter(t.contiguous(), requires_grad=False)  # noqa: E731
        self.nf4_packed = frozen(stack("packed"))
        self.nf4_absmax = frozen(stack("absmax"))
        self.nf4_nested_absmax = frozen(stack("nested_absmax").float().view(torch.int32))
        self.nf4_offset = stack("offset").float().reshape(E).contiguous().view(torch.int32)
        self.nf4_nested_code = qs[0].nested_code.float().reshape(-1).contiguous().view(torch.int32)
        self.nf4_code = qs[0].code.float().reshape(-1).contiguous().view(torch.int32)
        self.compute_dtype = dtype

    @property
    def residual(self) -> Tensor:
        """``deq(Q)`` E×out×in in ``compute_dtype``, lazily: metadata free, values dequantize the stack."""
        return _ExpertsResidualView(self)

    @property
    def residual_dtype(self) -> torch.dtype:
        """The compute dtype of the dequantized residual (no dequantization)."""
        return self.compute_dtype

    def dense_residual(self, dtype: Optional[torch.dtype] = None, experts: Optional[slice] = None) -> Tensor:
        """``deq(Q_e)`` of ``experts`` (default all) as a dense stack in ``dtype`` (default ``compute_dtype``).

        Example::

            >>> Wr = layer.dense_residual(torch.float32, slice(0, 2))   # experts 0 and 1
        """
        idx = range(self.num_experts)[experts] if experts is not None else range(self.num_experts)
        return dequantize_experts(self.nf4_tensors(), (self.out_features, self.in_features), list(idx),
                                  dtype or self.compute_dtype, self.blocksize, self.nested_blocksize)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def split_experts(weight: Tensor, spec: SORSAInit, U0: Tensor, S0: Tensor, V0: Tensor, expert_chunk: int) -> None:
        """Fill ``U0, S0, V0`` with each expert's split after ``spec.quant_iters`` error-reducing
        iterations (:func:`~sorsa_kernels.nn.qinit.error_reducing_split`, as ``QSORSALinear``)."""
        for e in range(weight.shape[0]):
            (U0[e], S0[e], V0[e]), _, _ = error_reducing_split(
                weight[e].detach(), spec.rank, iters=spec.quant_iters, scale=spec.scale, svd=spec.svd,
                niter=spec.niter, oversample=spec.oversample, svd_dtype=spec.svd_dtype, factor_dtype=spec.factor_dtype,
            )

    # ------------------------------------------------------------------ module API
    def forward(self, x: Tensor, counts: Tensor, **routing) -> Tensor:
        """``y`` (M×out) for rows ``x`` (M×in) grouped by expert, ``counts[e]`` rows for expert e;
        ``routing``: see :func:`~sorsa_kernels.ops.experts.sorsa_experts`."""
        return qsorsa_experts(x, counts, self.nf4_tensors(), self.U, self.S, self.V, self.bias, self.scale,
                              blocksize=self.blocksize, nested_blocksize=self.nested_blocksize,
                              expert_chunk=self.expert_chunk, **routing)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}, scale={self.scale:g}, "
            f"residual=nf4(blocksize={self.blocksize}, double-quantized, per expert), "
            f"compute_dtype={self.compute_dtype}, adapter_dtype={self.U.dtype}"
        )
