"""Which modules SORSA adapts: each architecture's projections, ``"all-linear"``, and the heads it trains.

:data:`TARGETS_BY_MODEL_TYPE` maps ``config.model_type`` to the names of the linear-like
projections of its attention and MLP blocks — every one of them, as the paper adapts q, k,
v, o, gate, up and down — matched as :func:`sorsa_kernels.apply_sorsa` matches names (the
full module name, its last component, or a dotted suffix such as ``output.dense``).
:data:`ALL_LINEAR` adapts every ``nn.Linear`` and ``transformers`` ``Conv1D`` except the
output head (``get_output_embeddings()``) and the modules kept as trainable copies, as
PEFT's option of that name does.

Routed experts that ``transformers`` stores as fused 3-D parameters in one experts module
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss, DeepSeek-V3) are not linear modules; their rows name the experts
module (``"experts"``), whose two fused projections become
:class:`~sorsa_kernels.nn.experts.SORSAExperts` (see
:mod:`~sorsa_kernels.adapters.experts`).  ``"all-linear"`` leaves them frozen,
as PEFT's option does, and
:func:`~sorsa_kernels.adapters.summary.adaptation_summary` lists fused expert
weights left frozen as not adapted.

gpt-oss checkpoints store the routed experts in MXFP4 (4 bits + one 8-bit scale per 32 weights,
4.25 bits a weight).  ``transformers`` dequantizes them to bf16 when it loads the model on a
machine without its MXFP4 kernels (``Mxfp4Config(dequantize=True)``); SORSA splits that bf16
weight, and QSORSA re-quantizes the residual to NF4 (4 bits + double-quantized absmax, ≈4.13
bits a weight), so the frozen experts take about the checkpoint's own size again.  Routers and gates with one output (Qwen2-MoE's
``shared_expert_gate``) are not projections and are not in the table.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..nn.checks import is_conv1d
from ..nn.experts import SORSAExperts

__all__ = [
    "ALL_LINEAR",
    "EXPERTS",
    "TARGETS_BY_MODEL_TYPE",
    "HEAD_NAMES",
    "is_all_linear",
    "is_linear_like",
    "linear_like_names",
    "output_head_names",
    "default_target_modules",
    "all_linear_names",
    "default_modules_to_save",
    "infer_task_type",
    "fused_expert_parameters",
]

#: ``target_modules`` value that adapts every linear-like module but the output head.
ALL_LINEAR = "all-linear"

_LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NEOX = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
#: The name of the routed-experts module of every ``transformers`` MoE block (both fused projections adapted).
EXPERTS = "experts"
_BERT = ("query", "key", "value", "output.dense", "intermediate.dense")  # not pooler.dense, not the head

#: ``config.model_type`` → names of every attention and MLP projection of its blocks.
TARGETS_BY_MODEL_TYPE: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": _LLAMA + (EXPERTS,),  # attention + the routed experts (fused 3-D)
    "qwen2": _LLAMA,
    "qwen2_moe": _LLAMA + (EXPERTS,),  # attention, shared expert (gate/up/down_proj), routed experts
    "qwen3": _LLAMA,
    "qwen3_moe": _LLAMA + (EXPERTS,),  # attention (+ dense MLP layers), routed experts
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "olmo": _LLAMA,
    "olmo2": _LLAMA,
    "olmoe": _LLAMA + (EXPERTS,),  # attention + routed experts
    # attention + routed experts (E×in×out, interleaved gate/up, expert biases, clamped SwiGLU: the model's
    # own _apply_gate runs on the grouped output, so the interleaving and the clamp stay the model's)
    "gpt_oss": ("q_proj", "k_proj", "v_proj", "o_proj", EXPERTS),
    # MLA attention (q_proj when q_lora_rank is None), the dense MLP of the first first_k_dense_replace
    # layers and the shared experts (gate/up/down_proj), and the routed experts
    "deepseek_v3": ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                    "gate_proj", "up_proj", "down_proj", EXPERTS),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # Conv1D
    "gpt_neox": _NEOX,
    "falcon": _NEOX,
    "bloom": _NEOX,
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "starcoder2": ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
    "t5": ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),
    "bert": _BERT,
    "roberta": _BERT,
    # transformers ≥ 5 names ViT's projections like Llama's attention and fc1/fc2; older releases like BERT's
    "vit": ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2") + _BERT,
}

#: Children of a classification model kept as trainable copies by default (PEFT's ``modules_to_save``
#: for sequence classification is ``classifier`` and ``score``; T5 names its head ``classification_head``).
HEAD_NAMES = ("classifier", "score", "classification_head")
_HEAD_CLASSES = ("ForSequenceClassification", "ForTokenClassification", "ForImageClassification")


def is_all_linear(targets) -> bool:
    """Whether ``target_modules`` is ``"all-linear"`` (or the list ``["all-linear"]``)."""
    return targets == ALL_LINEAR or (not isinstance(targets, str) and targets is not None
                                     and list(targets) == [ALL_LINEAR])


def is_linear_like(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` or a ``transformers`` ``Conv1D`` (what SORSA can adapt)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_like_names(model: nn.Module) -> list[str]:
    """Full names of every ``nn.Linear`` / ``Conv1D`` of ``model``, in module order."""
    return [n for n, m in model.named_modules() if n and is_linear_like(m)]


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the module(s) ``model.get_output_embeddings()`` returns (the LM head), if any."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {n for n, m in model.named_modules() if m is head}


def _short_names(names: list[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def default_target_modules(model: nn.Module) -> tuple[str, ...]:
    """The projection names of ``model``'s architecture (by ``config.model_type``).

    An architecture not in :data:`TARGETS_BY_MODEL_TYPE` is a one-line ValueError naming
    ``all-linear`` and the model's linear layer names.

    Example::

        >>> default_target_modules(GPT2LMHeadModel(GPT2Config(n_layer=2)))
        ('c_attn', 'c_proj', 'c_fc')
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in TARGETS_BY_MODEL_TYPE:
        return TARGETS_BY_MODEL_TYPE[model_type]
    what = f"model_type {model_type!r}" if model_type else f"a {type(model).__name__} (no config.model_type)"
    linear = _short_names(linear_like_names(model))
    raise ValueError(
        f"no default target_modules for {what}; pass target_modules='{ALL_LINEAR}' or names of its linear layers: "
        + (", ".join(linear) if linear else "(it has none)")
    )


def all_linear_names(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """Every linear-like module but the output head and those inside ``exclude`` (full names)."""
    heads = output_head_names(model)
    return [
        n for n in linear_like_names(model)
        if n not in heads and not any(n == e or n.startswith(e + ".") for e in exclude)
    ]


def default_modules_to_save(model: nn.Module) -> list[str]:
    """The classification head of a ``*ForSequenceClassification`` / ``*ForTokenClassification`` /
    ``*ForImageClassification`` model (its child named ``classifier``, ``score`` or
    ``classification_head``); ``[]`` for any other model."""
    if not type(model).__name__.endswith(_HEAD_CLASSES):
        return []
    return [n for n, _ in model.named_children() if n in HEAD_NAMES]


def infer_task_type(model: nn.Module) -> Optional[str]:
    """PEFT's ``task_type`` for ``model``'s class, or None (PEFT's plain ``PeftModel``).

    ``*ForCausalLM`` / ``*LMHeadModel`` → ``CAUSAL_LM``; ``*ForSequenceClassification`` →
    ``SEQ_CLS``; ``*ForTokenClassification`` → ``TOKEN_CLS``; ``*ForQuestionAnswering`` →
    ``QUESTION_ANS``; an encoder-decoder ``*ForConditionalGeneration`` → ``SEQ_2_SEQ_LM``
    (a decoder-only one → ``CAUSAL_LM``); a bare ``*Model`` → ``FEATURE_EXTRACTION``;
    anything else (image classification, a plain ``nn.Module``) → None.

    Example::

        >>> infer_task_type(BertForSequenceClassification(config))
        'SEQ_CLS'
    """
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    config = getattr(model, "config", None)
    if name.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM" if getattr(config, "is_encoder_decoder", False) else "CAUSAL_LM"
    if config is not None and name.endswith("Model") and hasattr(model, "get_input_embeddings"):
        return "FEATURE_EXTRACTION"
    return None


def fused_expert_parameters(model: nn.Module) -> list[str]:
    """Names of routed-expert weights still stored as fused 3-D parameters (not adapted: the experts
    were left out of the targets, or frozen under ``quantize``); adapted ones live in SORSA experts layers."""
    out = []
    for mname, module in model.named_modules():
        if "expert" not in type(module).__name__.lower() or isinstance(module, SORSAExperts):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 3:
                out.append(f"{mname}.{pname}" if mname else pname)
    return out
