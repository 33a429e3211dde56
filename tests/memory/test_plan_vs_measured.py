"""The memory plan against one real training step on the CPU, per component, within 10 %.

Scaled-down models — a dense Llama and a Qwen3-MoE, dense and NF4 residuals, with and without
gradient checkpointing, AdamW, bitsandbytes' 8-bit AdamW, gradient release (AdamW per tensor in
its gradient hook, :class:`GradientRelease`), bf16 adapters, and fp32 or bf16 models (bf16 as a GPU
run computes: float32 RMSNorm and loss, bf16 elsewhere) — run a warm-up step, then one step
measured by the profiler's memory events (``tests/memory/measure.py``).  The plan
(``plan_memory(..., device="cpu")``: the reference path, no CUDA context) must give every
component within 10 %: frozen weights, quantization state, adapters, gradients, optimizer state,
activations (the measured most-alive transient bytes against the plan's ``transient_peak``:
activations kept, the loss's logits and gradients or the recomputed layer, the NF4 dequantized
chunk) and the peak.  The models are sized so that activations plus optimizer state are at least
30 % of the measured peak: a plan that only counted weights would fail.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from sorsa_kernels.memory.plan import PlanSettings, plan_memory

from .measure import profile_bytes, tensor_bytes

transformers = pytest.importorskip("transformers")

TOLERANCE = 0.10
BATCH, SEQ, RANK, VOCAB = 2, 128, 8, 256


def _config(kind: str):
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False)
    if kind == "moe":
        return transformers.Qwen3MoeConfig(**common, head_dim=16, moe_intermediate_size=64, num_experts=8,
                                           num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    return transformers.LlamaConfig(**common)


def _optimizer(optim: str, model):
    """The job's optimizer: ``make_optimizer`` (``optim="release"``: AdamW per tensor in its gradient
    hook, ``enable_gradient_release`` with the regularizer's default strength)."""
    from sorsa_kernels.training.gradient_release import enable_gradient_release
    from sorsa_kernels.training.optim import adapter_scales, make_optimizer, optimizer_for_params

    if optim == "release":
        scales = adapter_scales(model)
        return enable_gradient_release(model, lambda ps: optimizer_for_params(ps, "adamw", 1e-3, fp32_state=scales),
                                       gamma=4e-4, lr_max=1e-3)
    if optim != "adamw":
        pytest.importorskip("bitsandbytes")
    return make_optimizer(model, optim, lr=1e-3)


def _optimizer_state(opt) -> dict:
    """``{param: state}`` of the optimizer (each per-parameter optimizer's under gradient release)."""
    if hasattr(opt, "per_param"):
        return {k: v for o in opt.per_param.values() for k, v in o.state.items()}
    return opt.state


def measure_and_plan(kind: str, quantize, checkpointing: bool, optim: str = "adamw", adapter_dtype=None,
                     dtype: str = "float32", loss_chunk: int = 0):
    """``(measured, planned)`` dicts with the same keys, for one scaled-down training step
    (``optim="release"``: AdamW with gradient release; ``dtype``: the model's, bf16 as on a GPU;
    ``loss_chunk``: the chunked cross-entropy over that many positions, as ``ChunkedLossTrainer``)."""
    from sorsa_kernels import apply_sorsa
    from sorsa_kernels.training.loss import chunked_causal_lm_loss, hidden_states_only

    config = _config(kind)
    config.dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    apply_sorsa(model, RANK, progress=False, quantize=quantize,
                adapter_dtype=torch.bfloat16 if adapter_dtype == "bfloat16" else None)
    model.train()
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(optim, model)
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))

    def forward_backward():
        if not loss_chunk:
            model(input_ids=x, labels=x).loss.backward()  # the output (and its logits) dropped, as the Trainer does
            return
        with hidden_states_only(model) as head:
            hidden = model(input_ids=x).logits
        chunked_causal_lm_loss(hidden, head, x, loss_chunk).backward()

    def optimizer_step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forward_backward()
        optimizer_step()  # the optimizer state exists from here on
        fb = profile_bytes(forward_backward)
        # with release the gradients die inside backward: the profiler's gradient tag counts them (it is
        # wrong under checkpointing, where it tags recomputed tensors too, so release runs without it)
        grads = fb["gradients"] if optim == "release" else sum(p.grad.numel() * p.grad.element_size() for p in params)
        step = profile_bytes(optimizer_step)
    held = tensor_bytes(model, _optimizer_state(opt))
    measured = dict(frozen=held["frozen"], quant_state=held["quant_state"], adapters=held["adapters"],
                    gradients=grads, optimizer_state=held["optimizer_state"], activations=fb["transient"],
                    peak=held["persistent"] + max(fb["peak_above_start"], step["peak_above_start"]))
    release = optim == "release"
    plan = plan_memory(config, PlanSettings(rank=RANK, quantize=quantize, max_length=SEQ, batch_size=BATCH,
                                            gradient_checkpointing=checkpointing, optim="adamw" if release else optim,
                                            gradient_release=release, adapter_dtype=adapter_dtype,
                                            loss_chunk_size=loss_chunk, device="cpu"))
    c = plan.components
    planned = dict(frozen=c["frozen_base"], quant_state=c["quant_state"], adapters=c["adapters"],
                   gradients=c["gradients"], optimizer_state=c["optimizer_state"],
                   activations=plan.notes["transient_peak"] + (c["gradients"] + c["optimizer_step"] if release else 0),
                   peak=plan.peak_bytes)
    return measured, planned


F32, BF16 = "float32", "bfloat16"  # the model dtype
CASES = [(kind, q, ckpt, "adamw", None, F32) for kind in ("dense", "moe") for q in (None, "nf4") for ckpt in (False, True)]
CASES += [("dense", "nf4", True, "adamw8bit", None, F32), ("moe", "nf4", False, "adamw8bit", None, F32),
          ("dense", "nf4", False, "release", None, F32), ("moe", "nf4", False, "release", None, F32),
          ("dense", "nf4", True, "adamw", "bfloat16", F32), ("moe", "nf4", False, "adamw", "bfloat16", F32),
          ("dense", "nf4", True, "adamw", None, BF16), ("moe", "nf4", False, "adamw", None, BF16),
          ("dense", "nf4", True, "adamw8bit", "bfloat16", F32), ("moe", "nf4", False, "release", "bfloat16", F32)]


@pytest.mark.parametrize("kind,quantize,checkpointing,optim,adapter_dtype,dtype", CASES)
def test_plan_within_10_percent_of_a_measured_step_per_component(kind, quantize, checkpointing, optim, adapter_dtype,
                                                                 dtype):
    measured, planned = measure_and_plan(kind, quantize, checkpointing, optim, adapter_dtype, dtype)
    _assert_within(measured, planned)


def _assert_within(measured: dict, planned: dict) -> None:
    assert (measured["activations"] + measured["optimizer_state"]) >= 0.3 * measured["peak"], measured
    for key, got in measured.items():
        if got == 0:
            assert planned[key] == 0, (key, planned[key])
            continue
        assert abs(planned[key] - got) <= TOLERANCE * got, f"{key}: planned {planned[key]}, measured {got}"


@pytest.mark.parametrize("lever", ["gradient_release", "loss_chunk_size", "adapter_dtype"])
def test_plan_of_each_lever_lowers_its_component(lever):
    """Each lever lowers the component it targets (the peak may not drop: gradient release adds one
    module's gradients to the backward moment, which dominates these activation-heavy models)."""
    config = _config("moe")
    base = PlanSettings(rank=RANK, quantize="nf4", max_length=SEQ, batch_size=BATCH, device="cpu")
    value = {"gradient_release": True, "loss_chunk_size": 32, "adapter_dtype": "bfloat16"}[lever]
    component = {"gradient_release": "gradients", "loss_chunk_size": "logits_loss", "adapter_dtype": "adapters"}[lever]
    import dataclasses

    before, after = plan_memory(config, base), plan_memory(config, dataclasses.replace(base, **{lever: value}))
    assert after.components[component] < before.components[component]


@pytest.mark.parametrize("kind,checkpointing", [("dense", True), ("moe", False)])
def test_chunked_loss_plan_within_10_percent_of_a_measured_step(kind, checkpointing):
    """The chunked cross-entropy (``chunked_causal_lm_loss`` around the model's head, as
    ``ChunkedLossTrainer`` runs it): the plan's ``logits_loss`` for one chunk holds per component."""
    measured, planned = measure_and_plan(kind, "nf4", checkpointing, loss_chunk=SEQ // 4)
    _assert_within(measured, planned)


def test_8bit_state_is_uint8_for_every_matrix_and_fp32_for_s_as_planned():
    """``make_optimizer("adamw8bit")`` keeps uint8 state for every U and V however small (these are
    under bitsandbytes' default 4096-element threshold) and fp32 state for S: the plan's bytes exactly."""
    pytest.importorskip("bitsandbytes")
    from sorsa_kernels import apply_sorsa
    from sorsa_kernels.training.optim import make_optimizer

    config = _config("moe")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    apply_sorsa(model, RANK, progress=False)
    opt = make_optimizer(model, "adamw8bit", lr=1e-3)
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    dtypes = {name: {v.dtype for k, v in opt.state[p].items() if k.startswith("state")}
              for name, p in model.named_parameters() if p.requires_grad}
    assert all(d == {torch.uint8} for n, d in dtypes.items() if n.endswith((".U", ".V"))), dtypes
    assert all(d == {torch.float32} for n, d in dtypes.items() if n.endswith(".S")), dtypes
    measured = tensor_bytes(model, opt.state)["optimizer_state"]
    planned = plan_memory(config, PlanSettings(rank=RANK, optim="adamw8bit", device="cpu")).components
    assert planned["optimizer_state"] == measured
