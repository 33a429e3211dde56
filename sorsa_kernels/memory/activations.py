"""Bytes of the activations a training step keeps, counted from the model's shapes.

Per token, each decoder layer of a Llama-like model (Llama, Mistral, Qwen2/3, Qwen3-MoE,
gpt-oss, …) trained with SORSA layers keeps, for backward (``c`` = bytes of the compute dtype;
RMSNorm works in float32, 4 bytes; ``h`` hidden, ``q``/``kv`` query/key-value widths, ``I`` the MLP
width, ``r`` the rank):

=============================  ============================================  ===========================
what                           tensors saved                                 bytes per token
=============================  ============================================  ===========================
input RMSNorm                  float32 input, ``rsqrt``                      ``4h + 4`` (not layer 0:
                                                                             its input needs no grad)
q, k, v inputs                 the normed hidden (one tensor, three users)   ``c·h``
q/k RMSNorm (Qwen3)            float32 q and k, their ``rsqrt``              ``4(q + kv + heads + kvh)``
attention                      roped q, roped k, v, output, logsumexp        ``c(2q + 2kv) + 4·heads``
                               (SDPA: flash / memory-efficient / CPU flash)
eager attention (gpt-oss)      + the softmax probabilities (with sinks)      ``+ c·heads·(S + 1)``
SORSA low-rank branch          ``u = x·V`` per adapted projection            ``c·r`` each
post-attention RMSNorm         float32 input, ``rsqrt``, normed hidden       ``4h + 4 + c·h``
dense MLP (SwiGLU)             gate, up, act(gate), act·up                   ``4·c·I``
MoE router                     softmax (float32), top-k weights and ids      ``4E + k(4·2 + 8·3)``
routed experts (k rows/token)  gate-up out, act, act·up (down's input),       ``k·c(4I + 2r) + 8k``
                               two ``u``, the slots (int64): the routed op   (gpt-oss's clamped gate:
                               (``ops/experts.py``) reads its input as token ``k·c(6I + 2r) + 8k``)
                               rows (the normed hidden, through the sort:
                               no gathered copy) and folds the scatter and
                               routing multiply in (no M×h rows kept)
=============================  ============================================  ===========================

With gradient checkpointing a layer keeps only its input (``c·h``); the layer being
recomputed in backward holds its full set once, plus its backward's own temporaries
(the MLP's gradients: ``2·c·I + c·h`` per token, ``k·I`` for routed experts).

The loss: ``transformers`` casts the logits to float32 and takes ``log_softmax`` (saved, float32);
at the start of backward the gradient of the saved output and the gradient of the logits
exist beside it: ``3 · 4 · V`` bytes per token at the peak, where the whole sequence is one
chunk.  Chunked cross-entropy (``loss_chunk_size`` tokens at a time, recomputed in backward)
holds that for one chunk plus its bf16/fp32 logits (``c·V``).

The table is checked against measured steps on the CPU reference path
(``tests/memory/test_plan_vs_measured.py``); on a GPU the kernels save the same tensors
(``x`` and ``u``).  On the CPU reference path the NF4 experts dequantize a chunk of experts with
rows per projection (:func:`nf4_expert_chunk_bytes`, sized by ``ops.experts.reference_chunk``) and
NF4 linear layers their whole residual; on a GPU the grouped NF4 experts kernel and the NF4 GEMM
dequantize inside their K loop and hold neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["Shapes", "layer_bytes_per_token", "activation_bytes", "loss_bytes", "nf4_expert_chunk_bytes"]

F32 = 4
INDEX = 8


@dataclass(frozen=True)
class Shapes:
    """The widths that decide activation bytes, read from a ``transformers`` config."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    moe_layers: int = 0
    experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    qk_norm: bool = False
    eager_attention: bool = False
    clamped_gate: bool = False

    @classmethod
    def from_config(cls, config: Any, moe_layers: Optional[int] = None) -> "Shapes":
        """Widths of ``config``; ``moe_layers`` (default: every layer of an MoE config) counts the
        decoder layers with routed experts."""
        heads = config.num_attention_heads
        hidden = config.hidden_size
        experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
        top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "experts_per_token", None) or 0
        model_type = getattr(config, "model_type", "")
        return cls(
            hidden=hidden, heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            intermediate=getattr(config, "intermediate_size", 0) or 0, vocab=config.vocab_size,
            layers=config.num_hidden_layers,
            moe_layers=(config.num_hidden_layers if experts else 0) if moe_layers is None else moe_layers,
            experts=experts, top_k=top_k,
            expert_intermediate=getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", 0),
            qk_norm=model_type.startswith("qwen3"), eager_attention=False,
            clamped_gate=model_type == "gpt_oss",
        )


def layer_bytes_per_token(s: Shapes, c: int, rank: int, adapted_attn: int, adapted_mlp: int, moe: bool,
                          seq: int, first: bool = False, expert_rank: int = 0) -> int:
    """Bytes one decoder layer keeps for backward, per token (see the module docstring).

    ``adapted_attn`` / ``adapted_mlp``: SORSA projections in the attention / dense MLP (each keeps
    its ``u``); ``moe``: the MLP is routed experts (``expert_rank``: their rank when adapted, two
    ``u`` per routed row, else 0); ``seq``: the
    sequence length (eager attention keeps seq-long rows); ``first``: layer 0, whose input needs no grad.
    """
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    out = 0 if first else F32 * s.hidden + F32
    out += c * s.hidden + c * (2 * q + 2 * kv) + F32 * s.heads + c * rank * adapted_attn
    if s.qk_norm:
        out += F32 * (q + kv + s.heads + s.kv_heads)
    if s.eager_attention:
        out += c * s.heads * (seq + 1)
    out += F32 * s.hidden + F32 + c * s.hidden
    if moe:
        k, inter = s.top_k, s.expert_intermediate
        act = 6 * inter if s.clamped_gate else 4 * inter
        out += F32 * s.experts + k * (F32 * 2 + INDEX * 3)
        out += k * c * (act + 2 * expert_rank) + k * INDEX  # + the slots (sorted (token, choice) ids)
    else:
        out += 4 * c * s.intermediate + c * rank * adapted_mlp
    return out


def backward_temporaries_per_token(s: Shapes, c: int, moe: bool) -> int:
    """The largest temporaries of one layer's backward, per token: the gradients of the MLP's
    product and of its two factors (the product's own saved input is freed by then), and the
    incoming gradient of the hidden state."""
    return 2 * c * (s.top_k * s.expert_intermediate if moe else s.intermediate) + c * s.hidden


def loss_bytes(s: Shapes, c: int, tokens: int, chunk: int = 0) -> int:
    """Peak bytes of the logits and the loss: ``3 · 4 · V`` per token of a chunk (the whole
    batch when ``chunk`` is 0), plus the chunk's logits in the compute dtype when chunked.
    ``chunk`` counts tokens: batch × the chunked loss's positions per chunk."""
    if chunk and chunk < tokens:
        return chunk * s.vocab * (3 * F32 + c)
    return tokens * s.vocab * 3 * F32


def activation_bytes(s: Shapes, c: int, tokens: int, seq: int, rank: int, adapted_attn: int, adapted_mlp: int,
                     checkpointing: bool, expert_rank: int = 0) -> tuple[int, int]:
    """``(kept, recompute)``: bytes of the decoder layers' activations kept through the forward
    for ``tokens`` tokens (batch × sequence) — every layer's saved set, or with checkpointing
    every layer's input — and, with checkpointing, the extra bytes of the one layer recomputed
    in backward with its backward temporaries (0 without)."""
    dense = s.layers - s.moe_layers
    kinds = [(False, dense), (True, s.moe_layers)]
    args = (s, c, rank, adapted_attn, adapted_mlp)
    per = {moe: layer_bytes_per_token(*args, moe, seq, expert_rank=expert_rank) for moe, _ in kinds}
    first_moe = s.moe_layers == s.layers
    first = layer_bytes_per_token(*args, first_moe, seq, first=True, expert_rank=expert_rank)
    common = tokens * (INDEX * 3) + 2 * seq * s.head_dim * c  # ids, labels, mask; rotary cos/sin
    if not checkpointing:
        return tokens * (sum(per[moe] * n for moe, n in kinds) - per[first_moe] + first) + common, 0
    biggest = max((per[moe] + backward_temporaries_per_token(s, c, moe)) for moe, n in kinds if n)
    return tokens * s.layers * c * s.hidden + common, tokens * biggest


def nf4_expert_chunk_bytes(out_features: int, in_features: int, chunk: int, c: int) -> int:
    """The reference path's dequantized chunk of NF4 experts (``chunk`` experts × out × in in the
    compute dtype), alive during one projection's forward or backward; the GPU kernel path
    dequantizes inside its K loop and holds none."""
    return chunk * out_features * in_features * c
