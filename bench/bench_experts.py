"""Grouped SORSA experts (dense and NF4 residual) vs PEFT LoRA on ``target_parameters``: one MoE block.

A ``Qwen3MoeSparseMoeBlock`` (router + fused experts, random weights, ``transformers``'
``grouped_mm`` experts implementation), its router frozen, forward+backward of x (x requires
grad, as inside a network) with the experts adapted by:

* ``lora``   — PEFT ``LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"])``
  (PEFT forms each expert's ΔW = B·A and adds it to the weight), B non-zero as after training;
* ``sorsa``  — :func:`sorsa_kernels.adapters.experts.adapt_experts` (grouped SORSA op, residual in
  the model's dtype, fused kernels on CUDA, no ΔW);
* ``qsorsa`` — the same with ``quantize="nf4"`` (each expert's residual in NF4).

GPU: Qwen3-30B-A3B's layer (E = 128 experts, top-8, hidden 2048, expert intermediate 768),
4096 tokens, r = 64 (:data:`RANK_GPU`), bf16.  CPU (CI, ``--benchmark-disable``): E = 8, top-2,
256 ↔ 128, 256 tokens, r = 8, fp32.  Recorded: median time, peak memory (GPU), the bytes saved
for backward.  Issue 33's target, checked by ``bench/targets.py``: LoRA ÷ SORSA time ≥ 2.0 and
SORSA ÷ LoRA peak memory ≤ 0.5, for the dense and the NF4 experts.  Every case is ``quick``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from . import harness, providers

pytestmark = [*harness.timer_marks(), pytest.mark.quick]

PROVIDERS = ("lora", "sorsa", "qsorsa")
RANK_GPU = 64
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer and the tokens through it."""

    tokens: int
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    rank: int
    dtype: torch.dtype


#: Qwen3-30B-A3B's MoE layer at 4096 tokens.
QWEN3_30B_A3B = MoEShape(tokens=4096, hidden=2048, intermediate=768, experts=128, top_k=8, rank=RANK_GPU,
                         dtype=torch.bfloat16)
CPU_SHAPE = MoEShape(tokens=256, hidden=256, intermediate=128, experts=8, top_k=2, rank=8, dtype=torch.float32)


def shape() -> MoEShape:
    """Qwen3-30B-A3B's layer on the GPU grid, the small one on the CPU grid."""
    return QWEN3_30B_A3B if harness.grid().name == "gpu" else CPU_SHAPE


def moe_block(s: MoEShape) -> torch.nn.Module:
    """A frozen Qwen3-MoE sparse block with seeded random weights, on the benchmark device."""
    import transformers
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    cfg = transformers.Qwen3MoeConfig(
        hidden_size=s.hidden, moe_intermediate_size=s.intermediate, num_experts=s.experts,
        num_experts_per_tok=s.top_k, intermediate_size=2 * s.intermediate, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=s.hidden // 4, vocab_size=64,
    )
    cfg._experts_implementation = "grouped_mm"  # what a loaded model uses
    torch.manual_seed(0)
    with torch.device(harness.DEVICE):
        block = modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    block = block.to(s.dtype)
    for p in block.parameters():
        p.requires_grad_(False)
    return block


def peft_lora_experts(block: torch.nn.Module, rank: int) -> torch.nn.Module:
    """PEFT LoRA on ``block``'s expert parameters (in place): only the LoRA factors train, B non-zero
    as after some training (a zero B would let PEFT's ΔW be zeros)."""
    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_parameters=TARGETS)
    model = peft.inject_adapter_in_model(cfg, block)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model


def build(provider: str, block: torch.nn.Module, rank: int) -> torch.nn.Module:
    """``provider``'s adapted copy of ``block`` (raises :class:`providers.Unavailable` with the reason)."""
    model = copy.deepcopy(block)
    if provider == "lora":
        providers.require_module("lora", "peft", "LoRA on target_parameters")
        try:
            return peft_lora_experts(model, rank)
        except (TypeError, ValueError) as exc:  # a PEFT without target_parameters
            raise providers.Unavailable(f"lora: PEFT cannot adapt target_parameters here ({exc})") from exc
    from sorsa_kernels.adapters.experts import adapt_experts

    options = dict(svd="randomized")
    if provider == "qsorsa":
        providers.require_module("qsorsa", "bitsandbytes", "NF4 quantization of the expert residuals")
        options.update(quantize="nf4", quant_iters=0)  # plain NF4: the init's error reduction is not timed
    try:
        adapt_experts(model.experts, rank, name="experts", **options)
    except (NotImplementedError, ImportError) as exc:
        raise providers.Unavailable(f"{provider}: adapt_experts cannot build it here ({exc})") from exc
    return model


@pytest.mark.parametrize("provider", PROVIDERS)
def test_moe_block_fwd_bwd(benchmark, request, monkeypatch, provider):
    """Time forward+backward of the adapted MoE block; record peak memory and saved bytes."""
    s = shape()
    try:
        model = build(provider, moe_block(s), s.rank)
    except providers.Unavailable as exc:
        benchmark.skipped = True
        pytest.skip(str(exc))
    monkeypatch.setenv("SORSA_KERNELS_BACKEND", "auto")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, f"{provider} left no trainable parameter"
    gen = torch.Generator(device=harness.DEVICE).manual_seed(1)
    x = torch.randn(1, s.tokens, s.hidden, device=harness.DEVICE, dtype=s.dtype, generator=gen).requires_grad_(True)
    dy = torch.randn(1, s.tokens, s.hidden, device=harness.DEVICE, dtype=s.dtype, generator=gen)
    benchmark.group = f"moe block fwd+bwd E={s.experts} top-{s.top_k} {s.hidden}x{s.intermediate} T={s.tokens}"

    def fwd_bwd() -> torch.Tensor:
        x.grad = None
        for p in trainable:
            p.grad = None
        y = model(x)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(dy)
        return y.detach()

    with torch.enable_grad():
        y, median_s = harness.run_benchmark(benchmark, fwd_bwd, config=request.config)
        harness.assert_sane(y, x.shape, "output")
        harness.assert_sane(x.grad, x.shape, "input gradient")
        for i, p in enumerate(trainable):
            harness.assert_sane(p.grad, p.shape, f"gradient of trainable parameter {i}")
        del y
        saved, out = harness.saved_tensor_bytes(lambda: model(x), exclude=harness.model_state(model))
        del out
        peak, peak_delta = harness.peak_memory(fwd_bwd)
    routed = s.tokens * s.top_k
    flops = 3 * 2 * routed * (2 * s.intermediate * s.hidden + s.intermediate * s.hidden)  # fwd + 2× bwd, experts only
    harness.record(
        benchmark, kind="experts", provider=provider, mode="fwd_bwd", tokens=s.tokens, dtype=s.dtype,
        median_s=median_s, flops=flops, peak_bytes=peak, peak_delta_bytes=peak_delta, saved_bytes=saved,
        rank=s.rank, experts=s.experts, top_k=s.top_k, hidden=s.hidden, intermediate=s.intermediate,
        adapter_dtype=harness.dtype_name(trainable[0].dtype),
        trainable_params=sum(p.numel() for p in trainable),
    )
