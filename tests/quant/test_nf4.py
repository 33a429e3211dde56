"""NF4 storage: bit-for-bit agreement with bitsandbytes on CPU, interop, bad input."""
import pytest
import torch

from sorsa_kernels.quant import nf4 as q4
from sorsa_kernels.quant.nf4 import (
    NF4Weight,
    decode_absmax,
    dequantize_nf4,
    dequantize_nf4_bnb,
    pack_nibbles,
    quantize_nf4,
    unpack_nibbles,
)

bnbF = pytest.importorskip("bitsandbytes.functional")

# 72×100: blocks straddle row ends, 7200 = 112.5 blocks; 37×51: odd element count;
# 300×257: several nested (256-absmax) blocks, the last one partial.
SHAPES = [(72, 100), (37, 51), (300, 257)]


def _w(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * (0.1 + 3 * torch.rand(shape[0], 1, generator=g))


def _bnb(w):
    return bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)


def test_code_table_equals_bitsandbytes_nf4():
    assert torch.equal(q4.nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("shape", SHAPES)
def test_unpack_gives_the_codes_bitsandbytes_stored(shape):
    packed, state = _bnb(_w(shape, 1))
    n = shape[0] * shape[1]
    # bitsandbytes' own dequantization with every absmax = 1 yields code[c] per element
    ones = torch.ones(state.absmax.numel(), dtype=torch.float32)
    levels = torch.ops.bitsandbytes.dequantize_4bit.default(packed, ones, 64, "nf4", shape, torch.float32)
    codes_bnb = (levels.reshape(-1, 1) == q4.nf4_code()[None, :]).int().argmax(1)
    assert torch.equal(unpack_nibbles(packed, n).long(), codes_bnb)


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_of_unpack_reproduces_bitsandbytes_bytes(shape):
    packed, _ = _bnb(_w(shape, 2))
    assert torch.equal(pack_nibbles(unpack_nibbles(packed, shape[0] * shape[1])), packed)


def test_pack_puts_first_code_in_high_nibble_and_pads_with_code_of_zero():
    out = pack_nibbles(torch.tensor([1, 2, 15], dtype=torch.uint8))
    assert out.shape == (2, 1) and out.flatten().tolist() == [0x12, 0xF7]


@pytest.mark.parametrize("shape", SHAPES)
def test_decoded_double_quantized_absmax_equals_bitsandbytes(shape):
    _, state = _bnb(_w(shape, 3))
    ours = decode_absmax(state.absmax, state.state2.absmax, state.state2.code, state.offset)
    theirs = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
def test_double_quantization_statistics_are_mean_offset_and_blockwise_max(shape):
    w = _w(shape, 4)
    _, state = _bnb(w)
    n = w.numel()
    flat = torch.cat([w.reshape(-1), w.new_zeros(-n % 64)]).view(-1, 64)
    absmax = flat.abs().amax(1)
    assert torch.equal(state.offset, absmax.mean())
    d = absmax - absmax.mean()
    d = torch.cat([d, d.new_zeros(-d.numel() % 256)]).view(-1, 256)
    assert torch.equal(state.state2.absmax, d.abs().amax(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_plain_pytorch_dequantization_is_bit_exact_to_bitsandbytes(shape, dtype):
    packed, state = _bnb(_w(shape, 5))
    state.dtype = dtype
    theirs = bnbF.dequantize_4bit(packed, state)
    ours = dequantize_nf4(NF4Weight.from_bnb(packed, state))
    assert ours.dtype == dtype and torch.equal(ours, theirs)


def test_quantize_nf4_stores_bitsandbytes_bits():
    w = _w((72, 100), 6)
    packed, state = _bnb(w)
    q = quantize_nf4(w, dtype=torch.bfloat16)
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.nested_absmax, state.state2.absmax) and q.dtype == torch.bfloat16


def test_our_storage_reads_in_bitsandbytes_through_serialized_quant_state():
    q = quantize_nf4(_w((37, 51), 7))
    packed, state = q.to_bnb()
    restored = bnbF.QuantState.from_dict(state.as_dict(packed=True), device=torch.device("cpu"))
    assert torch.equal(bnbF.dequantize_4bit(packed, restored), dequantize_nf4(q))


def test_bitsandbytes_storage_reads_in_ours_and_back():
    packed, state = _bnb(_w((72, 100), 8))
    q = NF4Weight.from_bnb(packed, state)
    p2, s2 = q.to_bnb()
    assert torch.equal(p2, packed) and s2 == state
    assert torch.equal(dequantize_nf4_bnb(q), bnbF.dequantize_4bit(packed, state))


def test_from_bnb_rejects_fp4():
    packed, state = bnbF.quantize_4bit(_w((8, 64), 9), blocksize=64, quant_type="fp4", compress_statistics=True)
    with pytest.raises(ValueError, match="quant_type must be 'nf4'"):
        NF4Weight.from_bnb(packed, state)


def test_from_bnb_rejects_state_without_double_quantization():
    packed, state = bnbF.quantize_4bit(_w((8, 64), 10), blocksize=64, quant_type="nf4")
    with pytest.raises(ValueError, match="compress_statistics=True"):
        NF4Weight.from_bnb(packed, state)


def test_weight_with_inconsistent_absmax_count_names_the_field():
    q = quantize_nf4(_w((8, 64), 11))
    with pytest.raises(ValueError, match=r"NF4Weight.absmax must be uint8 with 8 elements .* got uint8 with 7"):
        NF4Weight(q.packed, q.absmax[:7], q.nested_absmax, q.nested_code, q.offset, q.code, q.shape)


def test_unpack_rejects_wrong_byte_count():
    with pytest.raises(ValueError, match="3 packed bytes cannot hold 8 4-bit codes"):
        unpack_nibbles(torch.zeros(3, 1, dtype=torch.uint8), 8)


def test_quantize_rejects_non_matrix():
    with pytest.raises(ValueError, match="takes a matrix; got shape"):
        quantize_nf4(torch.randn(2, 3, 64))


def test_quantize_rejects_nan():
    w = _w((8, 64), 12)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_nf4(w)


def test_quantize_rejects_integer_matrix():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16; got torch.int64"):
        quantize_nf4(torch.ones(8, 64, dtype=torch.int64))


def test_storage_is_about_4_bits_per_weight():
    q = quantize_nf4(_w((256, 512), 13))
    assert q.nbytes() * 8 / q.numel < 4.2
