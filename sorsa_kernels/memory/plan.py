"""The memory plan of a SORSA / QSORSA training run: every byte a GPU holds, before the run.

:func:`plan_memory` builds the model on the meta device (:mod:`.build`: the package's own
target matching and layer classes, no weight read), reads the bytes of every frozen weight,
quantization state, adapter and the rest of the model off its tensors (FSDP2: the rank-0
shard of each parameter, buffers whole), adds gradients and optimizer state per trainable
tensor (:mod:`.optimizers`), activations and the loss from the model's shapes
(:mod:`.activations`) and a fixed CUDA-context allowance, and returns a :class:`MemoryPlan`.

The peak is the persistent bytes plus the larger of the two moments a step reaches:
backward (the activations kept, plus the larger of the loss's logits and gradients and what a
layer's backward adds later: with checkpointing the recomputed layer, and on the CPU reference path
the dequantized NF4 residual or chunk of experts) and the optimizer step (every gradient plus the optimizer's temporaries).  With gradient release each tensor is stepped and its gradient
dropped in its post-accumulate-grad hook, so at most one module's gradients exist.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..adapters.experts import adapted_experts, expert_weight_names
from ..nn.experts import DEFAULT_EXPERT_CHUNK, SORSAExperts
from ..nn.linear import SORSALinear
from ..ops.experts import reference_chunk
from . import optimizers
from .accounting import FROZEN_NAMES, QUANT_STATE_NAMES, bytes_by_category
from .activations import Shapes, activation_bytes, loss_bytes, nf4_expert_chunk_bytes
from .build import adapt_on_meta, config_dtype, meta_model

__all__ = ["CUDA_CONTEXT_BYTES", "PlanSettings", "MemoryPlan", "plan_memory", "count_model", "GIB"]

GIB = 2 ** 30
#: The fixed allowance for the CUDA context, cuBLAS/Triton workspaces and allocator slack, per GPU.
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
#: Components in the order they are printed.
COMPONENTS = ("frozen_base", "quant_state", "rest_of_model", "adapters", "gradients", "optimizer_state",
              "activations", "logits_loss", "nf4_dequant", "optimizer_step", "fsdp_gather", "cuda_context")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_COMPUTE = {4: torch.float32, 2: torch.bfloat16}  # compute dtype by its bytes (the chunk's size is all that counts)


@dataclass(frozen=True)
class PlanSettings:
    """What a run sets that changes its memory (the finetune flags of the same names)."""

    rank: int = 16
    target_modules: Optional[Union[str, Sequence[str]]] = None
    quantize: Optional[str] = None
    bf16: bool = False
    adapter_dtype: Optional[str] = None
    max_length: int = 512
    batch_size: int = 1
    gradient_checkpointing: bool = False
    optim: str = "adamw"
    gradient_release: bool = False
    loss_chunk_size: int = 0
    world_size: int = 1
    #: GPU behaviour: AdamW's ``foreach`` step; NF4 linears by the in-loop-dequantizing kernel.
    device: str = "cuda"

    def __post_init__(self) -> None:
        for name in ("rank", "max_length", "batch_size", "world_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be 0 (unchunked) or a positive integer, got {self.loss_chunk_size!r}")
        if self.optim not in optimizers.OPTIMIZERS:
            raise ValueError(f"optim must be one of {', '.join(optimizers.OPTIMIZERS)}, got {self.optim!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in _DTYPES:
            raise ValueError(f"adapter_dtype must be one of {', '.join(_DTYPES)}, got {self.adapter_dtype!r}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")


@dataclass
class MemoryPlan:
    """Bytes per GPU by component (:data:`COMPONENTS`), the peak, and the settings planned."""

    components: dict[str, int]
    peak_bytes: int
    settings: PlanSettings
    #: Informative figures not summed into the peak (activations with and without checkpointing, paged state, …).
    notes: dict[str, int] = field(default_factory=dict)
    model_type: str = ""

    def fits(self, budget_bytes: int) -> bool:
        """Whether the planned peak fits ``budget_bytes`` of GPU memory."""
        return self.peak_bytes <= budget_bytes

    def line(self) -> str:
        """One line: the planned peak and the settings that decide it."""
        s = self.settings
        what = [f"rank {s.rank}", "QSORSA nf4" if s.quantize else "SORSA", f"batch {s.batch_size}×{s.max_length}",
                s.optim]
        what += [w for w, on in (("checkpointing", s.gradient_checkpointing), ("gradient release", s.gradient_release),
                                 (f"loss chunk {s.loss_chunk_size}", s.loss_chunk_size), ("bf16", s.bf16)) if on]
        if s.adapter_dtype:
            what.append(f"adapters {s.adapter_dtype}")
        if s.world_size > 1:
            what.append(f"FSDP2 over {s.world_size}")
        return f"memory plan: peak {self.peak_bytes / GIB:.2f} GiB per GPU ({', '.join(what)})"


@dataclass
class Tally:
    """Bytes read off a meta model for one GPU (rank 0 of ``world_size``)."""

    frozen: int = 0                 # residuals / NF4 codes and frozen biases of the SORSA layers
    quant_state: int = 0            # absmax, nested absmax, offsets, code tables
    rest: int = 0                   # embeddings, head, norms, routers, layers left unadapted
    adapters: int = 0               # U, S, V
    largest_module_grads: int = 0   # one module's gradients (gradient release)
    trainable: list = field(default_factory=list)  # an optimizers.Trainable per trainable tensor (this rank)
    largest_layer: int = 0          # one decoder layer unsharded (FSDP2's all-gather)
    nf4_linear_dequant: int = 0     # the largest NF4 linear dequantized (CPU reference path)
    nf4_expert_chunk: int = 0       # the largest chunk of NF4 experts dequantized
    adapted_attn: int = 0           # SORSA projections in one layer's attention
    adapted_mlp: int = 0            # … in its dense MLP
    expert_rank: int = 0            # rank of the adapted experts (0: frozen experts)
    moe_layers: int = 0             # decoder layers with routed experts
    eager_attention: bool = False   # the model's attention keeps seq-long probability rows (no SDPA/flash)


def _local(t: torch.Tensor, world: int, parameter: bool) -> int:
    """Bytes of rank 0's FSDP2 shard (dim 0, the larger piece) of a parameter; a buffer stays whole."""
    if not parameter or world == 1 or t.dim() == 0:
        return t.numel() * t.element_size()
    rows = t.shape[0]
    return -(-rows // world) * (t.numel() // max(rows, 1)) * t.element_size()


def count_model(model: nn.Module, world_size: int = 1, compute_bytes: int = 2) -> Tally:
    """The :class:`Tally` of an adapted (meta) model on rank 0 of ``world_size``: frozen, quantization
    state, adapters and the rest by :func:`~sorsa_kernels.memory.accounting.bytes_by_category`, then
    what the plan needs beyond them (each trainable tensor, the largest module's gradients, the
    reference path's dequantized NF4 residuals, the decoder layers' shapes)."""
    from ..distributed.fsdp import decoder_layers
    from ..training.optim import adapter_scales

    scales = adapter_scales(model)  # make_optimizer keeps S's state in float32, as every vector's
    size = lambda t, is_param: _local(t, world_size, is_param)  # noqa: E731
    cats = bytes_by_category(model, (SORSALinear, SORSAExperts),
                             {"frozen": FROZEN_NAMES, "quant_state": QUANT_STATE_NAMES}, nbytes=size)
    out = Tally(frozen=cats["frozen"], quant_state=cats["quant_state"], rest=cats["rest_of_model"],
                adapters=cats["adapters"])
    for module in model.modules():
        mine = [size(t, True) for t in module.parameters(recurse=False) if t.requires_grad]
        out.largest_module_grads = max(out.largest_module_grads, sum(mine))
        for t in module.parameters(recurse=False):
            if t.requires_grad:
                out.trainable.append(optimizers.Trainable(
                    -(-t.numel() // world_size), t.element_size(), bf16=t.dtype == torch.bfloat16,
                    matrix=t.dim() >= 2 and id(t) not in scales))
        if getattr(module, "quantize", None) == "nf4" and isinstance(module, SORSAExperts):
            chunk = reference_chunk(module.num_experts, module.out_features, module.in_features,
                                    _COMPUTE[compute_bytes], getattr(module, "expert_chunk", DEFAULT_EXPERT_CHUNK))
            out.nf4_expert_chunk = max(out.nf4_expert_chunk, nf4_expert_chunk_bytes(
                module.out_features, module.in_features, chunk, compute_bytes))
        elif getattr(module, "quantize", None) == "nf4":
            out.nf4_linear_dequant = max(out.nf4_linear_dequant,
                                         module.out_features * module.in_features * compute_bytes)
    layers = decoder_layers(model)
    for layer in layers:
        out.largest_layer = max(out.largest_layer, sum(t.numel() * t.element_size()
                                                       for t in [*layer.parameters(), *layer.buffers()]))
    probe = layers[len(layers) // 2] if layers else model
    for name, m in probe.named_modules():
        if isinstance(m, SORSALinear):
            if "attn" in name or "attention" in name:
                out.adapted_attn += 1
            elif "experts" not in name:
                out.adapted_mlp += 1
    experts = adapted_experts(model)
    if experts:
        first = next(iter(experts.values()))
        out.expert_rank = getattr(first, expert_weight_names(first)[0]).rank
    out.eager_attention = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
    out.moe_layers = sum(1 for layer in layers if any(n.endswith("experts") for n, _ in layer.named_modules()))
    return out


def build_meta(config: Any, settings: PlanSettings) -> nn.Module:
    """The adapted model of ``settings`` on the meta device."""
    dtype = torch.bfloat16 if settings.bf16 and config_dtype(config) == torch.float32 else None
    model = meta_model(config, dtype)
    adapter_dtype = _DTYPES[settings.adapter_dtype] if settings.adapter_dtype else None
    return adapt_on_meta(model, settings.rank, settings.target_modules, quantize=settings.quantize,
                         adapter_dtype=adapter_dtype)


def plan_memory(config: Any, settings: Optional[PlanSettings] = None, *, tally: Optional[Tally] = None,
                **kwargs: Any) -> MemoryPlan:
    """The memory plan of training the causal LM of ``config`` with ``settings`` (or the
    :class:`PlanSettings` fields as keywords), per GPU.  ``tally`` reuses a :func:`count_model`
    of the same model, rank, targets, quantization and adapter dtype.

    Example::

        >>> plan = plan_memory(AutoConfig.from_pretrained("Qwen/Qwen3-30B-A3B"), rank=16, quantize="nf4",
        ...                    gradient_checkpointing=True, max_length=1024)
        >>> print(plan.line())
    """
    s = settings if settings is not None else PlanSettings(**kwargs)
    c = 2 if s.bf16 else config_dtype(config).itemsize
    if tally is None:
        tally = count_model(build_meta(config, s), s.world_size, c)
    shapes = dataclasses.replace(Shapes.from_config(config), moe_layers=tally.moe_layers,
                                 eager_attention=tally.eager_attention)
    tokens = s.batch_size * s.max_length
    act = {ckpt: activation_bytes(shapes, c, tokens, s.max_length, s.rank, tally.adapted_attn, tally.adapted_mlp,
                                  ckpt, expert_rank=tally.expert_rank) for ckpt in (False, True)}
    kept, recompute = act[s.gradient_checkpointing]
    state = sum(optimizers.state_bytes(s.optim, t) for t in tally.trainable)
    state += optimizers.shared_bytes(s.optim, tally.trainable, per_tensor=s.gradient_release)
    paged = sum(optimizers.paged_bytes(s.optim, t) for t in tally.trainable)
    grads = (tally.largest_module_grads + optimizers.gradient_copy_bytes(tally.trainable, per_tensor=True)
             if s.gradient_release else tally.adapters)
    step = optimizers.step_temporary_bytes(s.optim, tally.trainable, foreach=s.device == "cuda",
                                           per_tensor=s.gradient_release)
    # the GPU kernels (dense NF4 GEMM, grouped NF4 experts) dequantize inside their K loop: only the CPU
    # reference path holds a dequantized residual or chunk of experts
    dequant = tally.nf4_expert_chunk + tally.nf4_linear_dequant if s.device == "cpu" else 0
    comp = dict(
        frozen_base=tally.frozen, quant_state=tally.quant_state, rest_of_model=tally.rest, adapters=tally.adapters,
        gradients=grads, optimizer_state=state, activations=kept + recompute,
        logits_loss=loss_bytes(shapes, c, tokens, s.batch_size * s.loss_chunk_size), nf4_dequant=dequant, optimizer_step=step,
        fsdp_gather=2 * tally.largest_layer if s.world_size > 1 else 0,
        cuda_context=CUDA_CONTEXT_BYTES if s.device == "cuda" else 0,
    )
    persistent = sum(comp[k] for k in ("frozen_base", "quant_state", "rest_of_model", "adapters",
                                       "optimizer_state", "fsdp_gather", "cuda_context")) - paged
    # the loss's backward comes first, the layers' after it (a recomputed layer, the dequantized experts
    # chunk): the two never coexist
    backward = kept + max(comp["logits_loss"], recompute + comp["nf4_dequant"])
    if s.gradient_release:  # each module's step runs in backward: its gradients and step beside the activations
        peak = persistent + backward + grads + step
    else:
        peak = persistent + max(backward, grads + step)
    notes = dict(activations_without_checkpointing=sum(act[False]), activations_with_checkpointing=sum(act[True]),
                 transient_peak=backward,
                 paged_optimizer_state=paged, backward_start=persistent + backward, optimizer_step_moment=persistent
                 + grads + step)
    return MemoryPlan(components=comp, peak_bytes=peak, settings=s, notes=notes,
                      model_type=getattr(config, "model_type", ""))
