"""One training step of a 2-layer Llama with adapters on every projection.

``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` with random weights: 7B width
on GPU (hidden 4096, intermediate 11008, 32 heads, vocab 32000, bf16, 2×2048 tokens),
scaled down on CPU (hidden 256, intermediate 688, 4 heads, vocab 1000, fp32, 2×128 tokens).

Providers (q, k, v, o, gate, up and down projections adapted, everything else frozen):

* ``sorsa``  — ``sorsa_kernels.apply_sorsa(model, rank)`` (fused kernels on CUDA);
* ``lora``   — PEFT ``get_peft_model`` with ``LoraConfig(r=rank, lora_dropout=0)``;
* ``qlora``  — the projections as bitsandbytes NF4 ``Linear4bit``, then PEFT LoRA (CUDA only);
* ``qsorsa`` — ``apply_sorsa(model, rank, quantize="nf4")``.

A step: ``zero_grad``, forward with ``labels`` (causal-LM loss), backward, the orthonormal
regularizer's gradient for SORSA providers, AdamW step.  Recorded: tokens/s, achieved
TFLOP/s, peak memory (GPU) and the bytes saved for backward.
"""
from __future__ import annotations

import pytest
import torch

from . import harness, providers

pytestmark = harness.timer_marks()

E2E_PROVIDERS = ("sorsa", "lora", "qlora", "qsorsa")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(size: harness.LlamaSize, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=size.hidden, intermediate_size=size.intermediate, num_attention_heads=size.heads,
        num_key_value_heads=size.heads, num_hidden_layers=size.layers, vocab_size=size.vocab,
        max_position_embeddings=size.seq, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(harness.DEVICE):  # initialize on the GPU directly: the CPU init is slow
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def _import_apply_sorsa():
    try:
        from sorsa_kernels import apply_sorsa
    except ImportError as exc:
        raise providers.Unavailable(f"sorsa_kernels.apply_sorsa does not import ({exc})") from exc
    return apply_sorsa


def _adapt(provider: str, model: torch.nn.Module, rank: int, dtype: torch.dtype):
    """Adapt ``model`` in place (or wrap it); return ``(model, regularize or None)``."""
    if provider in ("sorsa", "qsorsa"):
        from sorsa_kernels import add_regularizer_grad

        apply_sorsa = _import_apply_sorsa()
        if provider == "qsorsa":
            providers.check_available("qsorsa")  # bitsandbytes quantizes the residuals
        # Randomized SVD and no quantization report only to build faster; neither changes what is timed.
        kwargs = dict(svd="randomized", progress=False)
        if provider == "qsorsa":
            kwargs.update(quantize="nf4", quant_report=None)
        try:
            apply_sorsa(model, rank, TARGETS, **kwargs)
        except NotImplementedError as exc:
            raise providers.Unavailable(f"{provider}: apply_sorsa raised NotImplementedError ({exc})") from exc
        except ImportError as exc:  # a library apply_sorsa imports lazily is missing
            raise providers.Unavailable(f"{provider}: apply_sorsa needs a library missing here ({exc})") from exc
        return model, (lambda: add_regularizer_grad(model, gamma=providers.GAMMA, lr_max=providers.LR))
    providers.check_available(provider)  # lora / qlora: peft, and CUDA + bitsandbytes for qlora
    from peft import get_peft_model

    if provider == "qlora":
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] in TARGETS and isinstance(module, torch.nn.Linear):
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, providers.to_linear4bit(module, dtype))
        model.is_loaded_in_4bit = True  # how PEFT recognizes a bitsandbytes 4-bit model
    return get_peft_model(model, providers.lora_config(rank, TARGETS)), None


@pytest.mark.parametrize("rank", harness.grid().ranks, ids=lambda r: f"r{r}")
@pytest.mark.parametrize("provider", E2E_PROVIDERS)
def test_llama_train_step(benchmark, request, monkeypatch, provider, rank):
    """Time one optimizer step of the adapted 2-layer Llama; record tokens/s and memory."""
    grid = harness.grid()
    size, dtype = grid.llama, grid.dtypes[0]
    if provider == "qlora":
        try:
            providers.check_available("qlora")
        except providers.Unavailable as exc:
            benchmark.skipped = True
            pytest.skip(str(exc))
    monkeypatch.setenv("SORSA_KERNELS_BACKEND", "auto")
    try:
        model, regularize = _adapt(provider, _llama(size, dtype), rank, dtype)
    except providers.Unavailable as exc:
        benchmark.skipped = True
        pytest.skip(str(exc))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, f"{provider} left no trainable parameter"
    optimizer = torch.optim.AdamW(trainable, lr=providers.LR)
    gen = torch.Generator(device=harness.DEVICE).manual_seed(0)
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), device=harness.DEVICE, generator=gen)
    benchmark.group = f"e2e llama train step h={size.hidden} T={size.tokens} {harness.dtype_name(dtype)}"

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if regularize is not None:
            regularize()
        optimizer.step()
        return loss.detach()

    loss, median_s = harness.run_benchmark(benchmark, step, config=request.config)
    harness.assert_sane(loss, (), "loss")
    for i, p in enumerate(trainable):
        harness.assert_sane(p.detach(), p.shape, f"trainable parameter {i} after the step")
    saved, out = harness.saved_tensor_bytes(
        lambda: model(input_ids=ids, labels=ids).loss, exclude=harness.model_state(model)
    )
    del out
    peak, peak_delta = harness.peak_memory(step)

    harness.record(
        benchmark, kind="e2e", provider=provider, mode="train_step", tokens=size.tokens, dtype=dtype,
        median_s=median_s, flops=harness.llama_step_flops(size, rank),
        peak_bytes=peak, peak_delta_bytes=peak_delta, saved_bytes=saved,
        rank=rank, hidden=size.hidden, intermediate=size.intermediate, heads=size.heads,
        layers=size.layers, vocab=size.vocab, batch=size.batch, seq=size.seq,
        adapter_dtype=harness.dtype_name(trainable[0].dtype),
        trainable_params=sum(p.numel() for p in trainable),
    )
