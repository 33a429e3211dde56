"""NF4 storage of the frozen SORSA residual, in the bitsandbytes layout.

QSORSA stores ``Wr`` as 4-bit NormalFloat (NF4, QLoRA) with blocksize 64 and
double-quantized absmax, laid out exactly as ``bitsandbytes.functional.quantize_4bit(
w, blocksize=64, quant_type="nf4", compress_statistics=True)`` lays it out, so a residual
written by us reads in bitsandbytes and the other way round:

* the matrix is flattened row-major (blocks run across row ends: for ``n = 100`` the
  second block holds the last 36 values of row 0 and the first 28 of row 1);
* element ``i`` has the 4-bit code ``c_i``; byte ``i // 2`` of ``packed`` (shape
  ``[(numel + 1) // 2, 1]``, uint8) holds ``c_{2j}`` in its high and ``c_{2j+1}`` in its
  low nibble (an odd count pads one zero nibble);
* block ``b = i // 64`` has a float32 absmax ``a_b``, itself quantized ("double
  quantization") with the 8-bit dynamic code ``nested_code`` in blocks of 256 after
  subtracting ``offset = mean(a)``: ``a_b ≈ nested_code[absmax[b]] · nested_absmax[b // 256] + offset``;
* the value is ``code[c_i] · a_b`` computed in float32, then cast to ``dtype``.

Quantization itself is bitsandbytes' own (it runs on CPU and CUDA); this module adds
what bitsandbytes lacks: a plain-PyTorch dequantization (the oracle of the fused
kernel in :mod:`sorsa_kernels.kernels.nf4_gemm`, equal to bitsandbytes' bit for bit),
the nibble pack/unpack and absmax decoding steps as readable functions, and the
conversion between :class:`NF4Weight` and ``bitsandbytes.functional.QuantState``.

bitsandbytes is imported lazily, inside the functions that need it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = [
    "NF4_CODE",
    "BLOCKSIZE",
    "NESTED_BLOCKSIZE",
    "NF4Weight",
    "nf4_code",
    "pack_nibbles",
    "unpack_nibbles",
    "decode_absmax",
    "dequantize_nf4",
    "dequantize_nf4_bnb",
    "quantize_nf4",
]

#: The 16 NF4 levels (quantiles of N(0, 1) normalized to [-1, 1], with an exact zero),
#: as published with QLoRA.  Tests check them against ``bitsandbytes.functional.get_4bit_type``.
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
#: Values per absmax block (bitsandbytes' default for 4-bit, and QLoRA's choice).
BLOCKSIZE = 64
#: absmax values per block of the double quantization (fixed by bitsandbytes).
NESTED_BLOCKSIZE = 256

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def nf4_code(device: Optional[torch.device] = None) -> Tensor:
    """The NF4 code table as a float32 tensor of 16 values.

    Example::

        >>> nf4_code()[7]
        tensor(0.)
    """
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@dataclass
class NF4Weight:
    """A matrix stored in NF4 with double-quantized absmax (the bitsandbytes layout).

    Attributes:
        packed: uint8 ``[(numel + 1) // 2, 1]``, two 4-bit codes per byte, high nibble first.
        absmax: uint8 ``[ceil(numel / blocksize)]``, the 8-bit codes of the block absmax.
        nested_absmax: float32 ``[ceil(len(absmax) / nested_blocksize)]``.
        nested_code: float32 ``[256]``, the 8-bit dynamic code of the absmax.
        offset: float32, one element: the mean absmax that was subtracted before quantizing.
        code: float32 ``[16]``, the NF4 table.
        shape: the logical ``(out_features, in_features)``.
        dtype: the dtype dequantization produces (bitsandbytes' ``QuantState.dtype``).
        blocksize, nested_blocksize: 64 and 256 by default.

    Example::

        >>> q = quantize_nf4(torch.randn(72, 100))
        >>> w = dequantize_nf4(q)                     # 72×100 float32
        >>> packed, state = q.to_bnb()                # bitsandbytes reads it
        >>> q2 = NF4Weight.from_bnb(packed, state)    # and the other way round
    """

    packed: Tensor
    absmax: Tensor
    nested_absmax: Tensor
    nested_code: Tensor
    offset: Tensor
    code: Tensor
    shape: torch.Size
    dtype: torch.dtype = torch.float32
    blocksize: int = BLOCKSIZE
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        self.offset = self.offset.reshape(1)
        self.validate()

    # ------------------------------------------------------------------ checks
    @property
    def numel(self) -> int:
        """Number of logical (unpacked) elements."""
        return self.shape.numel()

    def validate(self) -> None:
        """Raise a ValueError naming the first field whose dtype or size is inconsistent."""
        if len(self.shape) != 2:
            raise ValueError(f"NF4Weight stores a matrix; got shape {tuple(self.shape)}")
        if self.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"NF4 dequantization dtype must be float32, float16 or bfloat16, got {self.dtype}")
        n = self.numel
        nblocks = -(-n // self.blocksize)
        expect = {
            "packed": (torch.uint8, (n + 1) // 2),
            "absmax": (torch.uint8, nblocks),
            "nested_absmax": (torch.float32, -(-nblocks // self.nested_blocksize)),
            "nested_code": (torch.float32, 256),
            "offset": (torch.float32, 1),
            "code": (torch.float32, 16),
        }
        for name, (dtype, count) in expect.items():
            t = getattr(self, name)
            if t.dtype != dtype or t.numel() != count:
                raise ValueError(
                    f"NF4Weight.{name} must be {str(dtype).replace('torch.', '')} with {count} elements "
                    f"for shape {tuple(self.shape)} and blocksize {self.blocksize}; "
                    f"got {str(t.dtype).replace('torch.', '')} with {t.numel()}"
                )

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(packed, absmax, nested_absmax, nested_code, offset, code)``, the order the ops take."""
        return (self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset, self.code)

    def to(self, device: Any) -> "NF4Weight":
        """A copy on ``device`` (the tensors are moved, the metadata kept)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("packed", "absmax", "nested_absmax", "nested_code", "offset", "code"):
            kw[name] = kw[name].to(device)
        return NF4Weight(**kw)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def nbytes(self) -> int:
        """Bytes held by the quantized storage (what replaces ``numel · itemsize``)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # ------------------------------------------------------------------ bitsandbytes interop
    def to_bnb(self) -> tuple[Tensor, Any]:
        """``(packed, bitsandbytes.functional.QuantState)`` sharing this storage.

        ``bitsandbytes.functional.dequantize_4bit(packed, state)`` then returns
        :func:`dequantize_nf4` of this weight, and ``state.as_dict(packed=True)``
        serializes it the way ``bnb.nn.Linear4bit`` does.
        """
        from bitsandbytes.functional import QuantState

        state2 = QuantState(
            absmax=self.nested_absmax, code=self.nested_code,
            blocksize=self.nested_blocksize, dtype=torch.float32,
        )
        state = QuantState(
            absmax=self.absmax, shape=self.shape, code=self.code, blocksize=self.blocksize,
            quant_type="nf4", dtype=self.dtype, offset=self.offset.reshape(()), state2=state2,
        )
        return self.packed, state

    @classmethod
    def from_bnb(cls, packed: Tensor, state: Any) -> "NF4Weight":
        """Wrap the output of ``bitsandbytes.functional.quantize_4bit`` (NF4, double-quantized).

        Raises a ValueError when the state is not NF4, not double-quantized
        (``compress_statistics=True``), or not a matrix.
        """
        if getattr(state, "quant_type", None) != "nf4":
            raise ValueError(f"quant_type must be 'nf4' for an NF4 residual, got {state.quant_type!r}")
        if not getattr(state, "nested", False):
            raise ValueError(
                "the QuantState is not double-quantized; quantize with compress_statistics=True "
                "(absmax must be the 8-bit codes of a nested state)"
            )
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        if state.shape is None or len(state.shape) != 2:
            raise ValueError(f"NF4Weight stores a matrix; got QuantState.shape {state.shape}")
        return cls(
            packed=packed.reshape(-1, 1),
            absmax=state.absmax,
            nested_absmax=state.state2.absmax.float(),
            nested_code=state.state2.code.float(),
            offset=torch.as_tensor(state.offset, dtype=torch.float32, device=packed.device),
            code=state.code.float(),
            shape=torch.Size(state.shape),
            dtype=state.dtype,
            blocksize=int(state.blocksize),
            nested_blocksize=int(state.state2.blocksize),
        )


# --------------------------------------------------------------------------- pure PyTorch steps
def pack_nibbles(codes: Tensor, pad: int = 7) -> Tensor:
    """Pack 4-bit codes (uint8 values 0..15, any shape, read row-major) two per byte.

    Element ``2j`` goes to the high nibble of byte ``j`` and ``2j+1`` to its low nibble;
    an odd count is padded with ``pad`` (default 7, the NF4 code of 0.0, which is what
    bitsandbytes writes there).  Returns uint8 ``[(numel + 1) // 2, 1]``, bitsandbytes'
    ``packed`` layout.

    Example::

        >>> pack_nibbles(torch.tensor([1, 2, 15], dtype=torch.uint8)).flatten().tolist()
        [18, 247]
    """
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_full((1,), pad)])
    return ((c[0::2] << 4) | (c[1::2] & 0xF)).unsqueeze(1)


def unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    """The inverse of :func:`pack_nibbles`: uint8 codes ``[numel]``.

    Example::

        >>> unpack_nibbles(torch.tensor([[18], [240]], dtype=torch.uint8), 3).tolist()
        [1, 2, 15]
    """
    p = packed.reshape(-1).view(torch.uint8)
    if p.numel() != (numel + 1) // 2:
        raise ValueError(f"{p.numel()} packed bytes cannot hold {numel} 4-bit codes; expected {(numel + 1) // 2}")
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel]


def _pad_to_blocks(x: Tensor, blocksize: int) -> Tensor:
    n = x.numel()
    pad = -n % blocksize
    x = x.reshape(-1)
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, blocksize)


def decode_absmax(
    absmax: Tensor, nested_absmax: Tensor, nested_code: Tensor, offset: Tensor,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> Tensor:
    """Float32 block absmax from their 8-bit codes: ``code[q]·nested_absmax[b // 256] + offset``.

    Multiply, then add, in float32 — the operations (and so the bits) of bitsandbytes'
    ``dequantize_blockwise(absmax, state2) + offset``.

    Example::

        >>> a = decode_absmax(q.absmax, q.nested_absmax, q.nested_code, q.offset)
    """
    idx = torch.arange(absmax.numel(), device=absmax.device) // nested_blocksize
    vals = nested_code.float()[absmax.reshape(-1).long()] * nested_absmax.float()[idx]
    return vals + offset.float().reshape(())


def dequantize_nf4(q: NF4Weight, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Plain-PyTorch dequantization: unpack nibbles, look up the code, scale by the decoded absmax.

    Equal bit for bit to ``bitsandbytes.functional.dequantize_4bit`` (computed in float32,
    then cast to ``dtype``, default ``q.dtype``); the oracle of the fused NF4 GEMM.

    Example::

        >>> w = dequantize_nf4(quantize_nf4(torch.randn(72, 100)))
    """
    dtype = dtype or q.dtype
    n = q.numel
    codes = unpack_nibbles(q.packed, n)
    vals = q.code.float()[codes.long()]
    a = decode_absmax(q.absmax, q.nested_absmax, q.nested_code, q.offset, q.nested_blocksize)
    blocks = _pad_to_blocks(vals, q.blocksize) * a[:, None]
    return blocks.reshape(-1)[:n].view(q.shape).to(dtype)


def dequantize_nf4_bnb(q: NF4Weight, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Dequantization by bitsandbytes' own kernels (CPU or CUDA), as a ``q.shape`` matrix.

    The reference path of :mod:`sorsa_kernels.ops.qsorsa_linear` uses this.

    Example::

        >>> w = dequantize_nf4_bnb(q, torch.bfloat16)
    """
    from bitsandbytes.functional import dequantize_4bit

    packed, state = q.to_bnb()
    state.dtype = dtype or q.dtype
    return dequantize_4bit(packed, state).view(q.shape)


def quantize_nf4(w: Tensor, *, dtype: Optional[torch.dtype] = None, blocksize: int = BLOCKSIZE) -> NF4Weight:
    """NF4-quantize matrix ``w`` with double-quantized absmax, by bitsandbytes (CPU or CUDA).

    ``dtype`` is the dtype dequantization will produce (default ``w.dtype``); it does not
    change the stored bits.  QSORSA quantizes the float32 residual.

    Example::

        >>> q = quantize_nf4(residual_fp32, dtype=torch.bfloat16)
    """
    from bitsandbytes.functional import quantize_4bit

    if w.dim() != 2:
        raise ValueError(f"quantize_nf4 takes a matrix; got shape {tuple(w.shape)}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize_nf4 takes float32, float16 or bfloat16; got {w.dtype}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("cannot NF4-quantize a matrix with NaN or Inf values")
    packed, state = quantize_4bit(
        w.contiguous(), blocksize=blocksize, quant_type="nf4", compress_statistics=True
    )
    state.dtype = dtype or w.dtype
    return NF4Weight.from_bnb(packed, state)

