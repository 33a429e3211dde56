"""The two paths of the SORSA experts ops (:mod:`sorsa_kernels.ops.experts`): the grouped Triton
kernels and the reference, each direction described once as a
:class:`~sorsa_kernels.ops.kernel_op.KernelOp` (:data:`FORWARD`, :data:`BACKWARD`: key, shapes,
kernel, reference, fallback), the device-side row-count check and the NF4 residual as each
path reads it.

Both directions take the op's arguments with the routing as one tuple ``route`` =
``(slots, top_k, gather, scatter, weights)``: forward ``(x, counts, res, U, S, V, bias, scale,
route)``, backward ``(dy, x, u, counts, res, U, S, V, bias, scale, route, needs_dx, needs_dw)``.
``res`` is None, a dense E×m×n stack, or an NF4 stack (the ``nf4`` tuple when deciding,
:class:`NF4Residual` inside the custom op).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..quant.nf4 import NF4Weight, dequantize_nf4_bnb
from . import reference
from .dispatch import pow2_bucket
from .kernel_op import KernelOp

__all__ = ["FORWARD", "BACKWARD", "REFERENCE_DEQUANT_BYTES", "dequantize_experts", "reference_chunk",
           "NF4Residual", "grouped_rows", "fallback_key", "check_rows", "empty_if_none"]

#: Bytes of dequantized residual the NF4 reference path holds at once (beside the half-stack cap).
REFERENCE_DEQUANT_BYTES = 256 << 20


# --------------------------------------------------------------------------- NF4 residual
def dequantize_experts(nf4: tuple[Tensor, ...], shape: tuple[int, int], experts, dtype: torch.dtype,
                       blocksize: int = 64, nested_blocksize: int = 256) -> Tensor:
    """``deq(Q_e)`` of each expert in ``experts`` (indices), stacked len×m×n in ``dtype``.

    ``nf4`` is ``(packed E×P, absmax E×B, nested_absmax E×N float32, nested_code, offset (E,),
    code)``: each expert's matrix quantized on its own, in the bitsandbytes layout.
    Dequantization is bitsandbytes' (float64 goes through float32, bitsandbytes' widest).
    """
    packed, absmax, nested_absmax, nested_code, offset, code = nf4
    dq = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    out = torch.empty((len(experts), *shape), dtype=dtype, device=packed.device)
    for i, e in enumerate(experts):
        q = NF4Weight(packed=packed[e].reshape(-1, 1), absmax=absmax[e], nested_absmax=nested_absmax[e],
                      nested_code=nested_code, offset=offset[e], code=code, shape=torch.Size(shape), dtype=dq,
                      blocksize=blocksize, nested_blocksize=nested_blocksize)
        out[i] = dequantize_nf4_bnb(q, dq)
    return out


def reference_chunk(E: int, m: int, n: int, dtype: torch.dtype, expert_chunk: int) -> int:
    """Experts the NF4 reference path dequantizes at once: ``expert_chunk``, capped at half the
    experts and at :data:`REFERENCE_DEQUANT_BYTES` (at least one)."""
    per_expert = m * n * torch.empty((), dtype=dtype).element_size()
    return max(1, min(expert_chunk, E // 2, REFERENCE_DEQUANT_BYTES // per_expert))


class NF4Residual:
    """An NF4 experts stack as the ops see it: ``[e]`` dequantizes (reference path) the chunk of
    experts with rows that starts at e, dropping the previous chunk first; :meth:`kernel` is
    the stack the grouped NF4 kernel reads."""

    def __init__(self, nf4, meta, counts: Tensor, dtype: torch.dtype):
        self.nf4, self.counts, self.dtype = tuple(nf4), counts, dtype
        self.m, self.n, self.blocksize, self.nested_blocksize, self.chunk = meta
        self._chunk: dict = {}
        self._active: Optional[list[int]] = None

    def __getitem__(self, e: int) -> Tensor:
        if e not in self._chunk:
            if self._active is None:
                self._active = [i for i, c in enumerate(reference.counts_list(self.counts)) if c > 0]
            i = self._active.index(e)
            idx = self._active[i:i + reference_chunk(len(self.counts), self.m, self.n, self.dtype, self.chunk)]
            self._chunk = {}  # the previous chunk goes before the next one is made
            stack = dequantize_experts(self.nf4, (self.m, self.n), idx, self.dtype, self.blocksize,
                                       self.nested_blocksize)
            self._chunk = {k: stack[j] for j, k in enumerate(idx)}
        return self._chunk[e]

    def kernel(self):
        from ..kernels.grouped_nf4 import NF4Experts

        return NF4Experts(self.nf4, (self.m, self.n), self.blocksize, self.nested_blocksize)


# --------------------------------------------------------------------------- both paths
def grouped_rows(x: Tensor, slots: Optional[Tensor]) -> int:
    return slots.shape[0] if slots is not None else x.shape[0]


def fallback_key(x: Tensor, res, U: Tensor, bias: Optional[Tensor], route: tuple) -> tuple:
    """The fallback key of a call: device, dtype, rows (bucketed), in_features, (E, m, r), kinds."""
    slots, top_k, gather, scatter, weights = route
    return (x.device, x.dtype, pow2_bucket(grouped_rows(x, slots)), x.shape[1], *U.shape,
            "none" if res is None else "dense" if isinstance(res, Tensor) else "nf4",
            bias is not None, top_k, gather, scatter, weights is not None)


def _shape(x: Tensor, U: Tensor) -> str:
    return f"x {tuple(x.shape)} {str(x.dtype)[6:]}, (experts, out, r) = {tuple(U.shape)}"


def check_rows(counts: Tensor, M: int) -> None:
    """On the device, no host sync: a grouped-row count other than M would read and write out of bounds."""
    torch._assert_async((counts.sum() == M) & (counts.min() >= 0),
                        f"sorsa_experts: counts must be non-negative and sum to the {M} grouped rows")


def route_rows(route: tuple, M: int):
    """``(a_idx, row_w, dy_idx)`` of the kernels: the token row each grouped row reads, its routing
    weight (fp32) and the token row of dy it reads."""
    slots, top_k, gather, scatter, weights = route
    tok = None if slots is None else slots // top_k
    row_w = None if weights is None else (weights if slots is None else weights[slots]).float().contiguous()
    return (tok if gather else None), row_w, (tok if scatter else None)


def _kernel_forward(x, counts, res, U, S, V, bias, scale, route):
    from ..kernels import grouped_sorsa as K  # on the first kernel call: it needs Triton

    slots, top_k, _, scatter, _ = route
    M = grouped_rows(x, slots)
    a_idx, row_w, _ = route_rows(route, M)
    kres = res.kernel() if isinstance(res, NF4Residual) else res
    y, u = K.grouped_forward(x.contiguous(), counts, kres, U, S, V, bias, scale,
                             K.RowMap(a_idx, row_w, slots if scatter else None), M)
    if scatter:  # each row sits in its (token, choice) slot: the top-k sum per token
        y = y.view(M // top_k, top_k, -1).sum(1)
    return y, u


def _kernel_backward(dy, x, u, counts, res, U, S, V, bias, scale, route, needs_dx, needs_dw):
    from ..kernels import grouped_sorsa as K

    slots, top_k, gather, _, weights = route
    M = u.shape[0]
    a_idx, row_w, dy_idx = route_rows(route, M)
    dw = None
    kres = res.kernel() if isinstance(res, NF4Residual) else res
    direct = gather and weights is None  # dx rows go straight to their slots
    da, dU, dS, dV = K.grouped_backward(dy.contiguous(), x.contiguous(), u, counts, kres, U, S, V, scale,
                                        needs_dx or needs_dw, dy_idx,
                                        K.RowMap(a_idx, row_w, slots if direct else None))
    if weights is not None and needs_dw:  # dw = da·x_row + g·b_e, per grouped row, in slot order
        xr = x[a_idx] if gather else x
        dwr = torch.bmm(da.unsqueeze(1), xr.unsqueeze(2)).view(M).float()
        if bias is not None:
            expert = torch.repeat_interleave(torch.arange(U.shape[0], device=counts.device), counts, output_size=M)
            g = dy[dy_idx] if dy_idx is not None else dy
            dwr += (g.float() * bias.float()[expert]).sum(1)
        dw = torch.empty_like(weights)
        dw[slots if slots is not None else slice(None)] = dwr.to(weights.dtype)
    if needs_dx and weights is not None:
        da = da.mul_(row_w.to(da.dtype)[:, None])
        if gather:
            buf = torch.empty_like(da)
            buf[slots] = da
            da = buf
    if not needs_dx:  # da was made for dw only
        return None, dU, dS, dV, dw
    return (da.view(M // top_k, top_k, -1).sum(1) if gather else da), dU, dS, dV, dw


def _reference_forward(x, counts, res, U, S, V, bias, scale, route):
    slots, top_k, gather, scatter, weights = route
    return reference.experts_forward(x, counts, res, U, S, V, bias, scale, slots=slots, top_k=top_k,
                                     gather=gather, scatter=scatter, weights=weights)


def _reference_backward(dy, x, u, counts, res, U, S, V, bias, scale, route, needs_dx, needs_dw):
    slots, top_k, gather, scatter, weights = route
    return reference.experts_backward(dy, x, u, counts, res, U, S, V, scale, needs_dx, bias=bias, slots=slots,
                                      top_k=top_k, gather=gather, scatter=scatter, weights=weights,
                                      needs_dw=needs_dw)


def _decision_tensors(x, res, U, S, V) -> tuple:
    """x first (the compute dtype); a dense residual's dtype decides too, an NF4 one's does not."""
    return x, (res if isinstance(res, Tensor) else None), U, S, V


#: ``(x, counts, res, U, S, V, bias, scale, route) -> (y, u)``.
FORWARD = KernelOp(
    name="sorsa_experts forward",
    key=lambda x, counts, res, U, S, V, bias, scale, route: fallback_key(x, res, U, bias, route),
    shape=lambda x, counts, res, U, *_: _shape(x, U),
    kernel=_kernel_forward,
    reference=_reference_forward,
    tensors=lambda x, counts, res, U, S, V, *_: _decision_tensors(x, res, U, S, V),
)

#: ``(dy, x, u, counts, res, U, S, V, bias, scale, route, needs_dx, needs_dw) -> (dx, dU, dS, dV, dw)``.
BACKWARD = KernelOp(
    name="sorsa_experts backward",
    key=lambda dy, x, u, counts, res, U, S, V, bias, scale, route, *_: fallback_key(x, res, U, bias, route),
    shape=lambda dy, x, u, counts, res, U, *_: _shape(x, U),
    kernel=_kernel_backward,
    reference=_reference_backward,
    tensors=lambda dy, x, u, counts, res, U, S, V, *_: _decision_tensors(x, res, U, S, V),
)


def empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


