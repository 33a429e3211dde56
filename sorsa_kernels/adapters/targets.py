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
weights left frozen as not adapted.  Routers and gates of a MoE block (Qwen2-MoE's
``shared_expert_gate``, one output) are not projections: they are not in the table and
``"all-linear"`` leaves them out.

:class:`Targets` is the one matcher: what a ``target_modules`` value (the table's names, a
list of names, a regular expression, ``"all-linear"``) and the modules kept as trainable
copies mean for a module name.  Linear layers, experts modules and saved heads are all
picked through it (as PEFT's ``check_target_module_exists`` serves layers, parameters and
saved modules alike).

gpt-oss checkpoints store the routed experts in MXFP4 (4 bits + one 8-bit scale per 32 weights,
4.25 bits a weight).  ``transformers`` dequantizes them to bf16 when it loads the model on a
machine without its MXFP4 kernels (``Mxfp4Config(dequantize=True)``); SORSA splits that bf16
weight, and QSORSA re-quantizes the residual to NF4 (4 bits + double-quantized absmax, ≈4.13
bits a weight), so the frozen experts take about the checkpoint's own size again.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from torch import nn

from ..nn.checks import is_conv1d
from ..nn.experts import SORSAExperts

__all__ = [
    "Targets",
    "TargetSpec",
    "NoDefaultTargetsError",
    "inside",
    "compile_target_regex",
    "nearest_names",
    "router_names",
    "ALL_LINEAR",
    "EXPERTS",
    "TARGETS_BY_MODEL_TYPE",
    "HEAD_NAMES",
    "is_all_linear",
    "is_linear_like",
    "linear_like_names",
    "output_head_names",
    "default_target_modules",
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


class NoDefaultTargetsError(ValueError):
    """The model's architecture has no row in :data:`TARGETS_BY_MODEL_TYPE`.

    ``what`` names the model (``model_type 'foo'``) and ``linear`` its linear layers' short
    names, so that a front end can word the fix its own way (the command line says
    ``--target-modules all-linear``); ``str()`` words it for Python.
    """

    def __init__(self, what: str, linear: list[str]) -> None:
        self.what, self.linear = what, linear
        super().__init__(self.worded("target_modules", f"target_modules='{ALL_LINEAR}'"))

    def worded(self, option: str, all_linear: str) -> str:
        """The message with the option named ``option`` and the ``all-linear`` fix spelled ``all_linear``."""
        names = ", ".join(self.linear) if self.linear else "(it has none)"
        return f"no default {option} for {self.what}; pass {all_linear} or names of its linear layers: {names}"


def default_target_modules(model: nn.Module) -> tuple[str, ...]:
    """The projection names of ``model``'s architecture (by ``config.model_type``).

    An architecture not in :data:`TARGETS_BY_MODEL_TYPE` is a one-line
    :class:`NoDefaultTargetsError` naming ``all-linear`` and the model's linear layer names.

    Example::

        >>> default_target_modules(GPT2LMHeadModel(GPT2Config(n_layer=2)))
        ('c_attn', 'c_proj', 'c_fc')
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in TARGETS_BY_MODEL_TYPE:
        return TARGETS_BY_MODEL_TYPE[model_type]
    what = f"model_type {model_type!r}" if model_type else f"a {type(model).__name__} (no config.model_type)"
    raise NoDefaultTargetsError(what, _short_names(linear_like_names(model)))


#: What ``target_modules`` accepts: None (the architecture's table), ``"all-linear"``, a list of
#: names, or one string taken as a regular expression over the full module name.
TargetSpec = Union[None, str, Sequence[str]]


def inside(name: str, prefixes: Sequence[str]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or lies inside one (``a.b`` is inside ``a``)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def compile_target_regex(pattern: str) -> "re.Pattern[str]":
    """``pattern`` compiled, or a one-line ValueError naming it and what is wrong with it.

    Example::

        >>> compile_target_regex("(")
        Traceback (most recent call last):
        ValueError: target_modules '(' is not a valid regular expression: missing ), unterminated subpattern at position 0
    """
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"target_modules {pattern!r} is not a valid regular expression: {e}") from None


_ROUTER = re.compile(r"(.*_)?(gate|router)")


def router_names(model: nn.Module) -> set[str]:
    """Linear layers that route a MoE block rather than project (``mlp.gate``, ``mlp.shared_expert_gate``):
    a ``gate``/``*_gate``/``router`` child of a module that holds an ``experts`` module."""
    out = set()
    for pname, parent in model.named_modules():
        if not isinstance(getattr(parent, EXPERTS, None), nn.Module):
            continue
        for cname, child in parent.named_children():
            if _ROUTER.fullmatch(cname) and is_linear_like(child):
                out.add(f"{pname}.{cname}" if pname else cname)
    return out


@dataclass(frozen=True)
class Targets:
    """The one matcher: which module names a ``target_modules`` value picks.

    ``names``: a module matches an entry if its full name equals it or ends with ``"." + entry``
    (so ``q_proj`` and ``self_attn.q_proj`` both name ``model.layers.0.self_attn.q_proj``).
    ``pattern``: a regular expression over the full name.  ``all_linear``: every name but
    ``skip`` (the output head and MoE routers; whether a module is linear is the caller's
    test).  ``default``: the names came from the architecture's table.  Names inside
    ``exclude`` (the modules kept as trainable copies) match nothing.

    Example::

        >>> Targets(names=("q_proj",)).match("model.layers.0.self_attn.q_proj")
        'q_proj'
    """

    names: tuple[str, ...] = ()
    pattern: Optional["re.Pattern[str]"] = None
    all_linear: bool = False
    default: bool = False
    skip: frozenset = frozenset()
    exclude: tuple[str, ...] = ()

    @classmethod
    def resolve(cls, model: nn.Module, target_modules: TargetSpec = None, exclude: Sequence[str] = ()) -> "Targets":
        """``target_modules`` read for ``model``: None → its architecture's table
        (:func:`default_target_modules`), ``"all-linear"`` (alone, or the list ``["all-linear"]``),
        a list of names, or a string compiled as a regular expression.  One-line errors for an
        empty list, a non-string entry, ``all-linear`` beside other entries, a bad regex."""
        exclude = tuple(exclude)
        if is_all_linear(target_modules):
            return cls(all_linear=True, skip=frozenset(output_head_names(model) | router_names(model)),
                       exclude=exclude)
        if target_modules is None:
            return cls(names=tuple(default_target_modules(model)), default=True, exclude=exclude)
        if isinstance(target_modules, str):
            return cls(pattern=compile_target_regex(target_modules), exclude=exclude)
        names = tuple(target_modules)
        if not names:
            raise ValueError("target_modules is empty")
        bad = [t for t in names if not isinstance(t, str) or not t]
        if bad:
            raise TypeError(f"target_modules must be module names (non-empty strings) or one regular expression; "
                            f"got {bad[0]!r} in {list(names)!r}")
        if ALL_LINEAR in names:
            raise ValueError(f"target_modules {list(names)!r}: '{ALL_LINEAR}' must stand alone (it already names "
                             "every linear layer but the output head); pass it alone or list names")
        return cls(names=names, exclude=exclude)

    def match(self, name: str) -> Optional[str]:
        """The entry that picks module ``name`` (a name, the pattern, or ``"all-linear"``), or None."""
        if not name or inside(name, self.exclude):
            return None
        if self.all_linear:
            return None if name in self.skip else ALL_LINEAR
        if self.pattern is not None:
            return self.pattern.pattern if self.pattern.fullmatch(name) else None
        return next((t for t in self.names if name == t or name.endswith("." + t)), None)

    @property
    def explicit(self) -> bool:
        """Whether the user named the modules (a list or a regex), rather than the table or ``all-linear``."""
        return not (self.default or self.all_linear)

    def describe(self) -> str:
        """The value as the user gave it, for messages."""
        if self.all_linear:
            return repr(ALL_LINEAR)
        return repr(self.pattern.pattern) if self.pattern is not None else repr(list(self.names))


def nearest_names(entry: str, names: Sequence[str], n: int = 3) -> list[str]:
    """The short module names (last components) of ``names`` closest to ``entry`` (difflib), best first;
    if none is close, the first few of them."""
    short = _short_names(list(names))
    return difflib.get_close_matches(entry.rsplit(".", 1)[-1], short, n=n, cutoff=0.5) or short[:n + 3]


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
