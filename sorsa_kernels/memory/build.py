"""The model a run would train, built on the meta device: the architecture from its config and
the package's own surgery decisions, no weight read and no byte allocated.

:func:`meta_model` builds the ``transformers`` causal LM from a config with every tensor on the
meta device.  :func:`adapt_on_meta` then makes the layers :func:`sorsa_kernels.apply_sorsa`
would make: the same surgery plan (:func:`~sorsa_kernels.adapters.plan.plan_sorsa`: the one target
matcher, with its rank checks; weight values are not read), the same layer
classes (:func:`~sorsa_kernels.nn.factory.layer_class` / ``experts_class``) with the same
dtype defaults, constructed on the meta device instead of from an SVD (which needs values).
Every byte the plan counts for frozen weights, quantization state and adapters is read off
these tensors.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..adapters.experts import expert_weight_names, sorsa_experts_forward
from ..adapters.plan import plan_sorsa
from ..adapters.surgery import TargetSpec, module_aliases, replace_everywhere
from ..nn.checks import linear_weight
from ..nn.factory import experts_class, layer_class

__all__ = ["meta_model", "adapt_on_meta"]


def meta_model(config: Any, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The causal LM of ``config`` with every parameter and buffer on the meta device, in
    ``dtype`` (default: the config's ``dtype``, else float32).

    Example::

        >>> model = meta_model(AutoConfig.from_pretrained("Qwen/Qwen3-30B-A3B"))
    """
    from transformers import AutoModelForCausalLM

    dtype = dtype or config_dtype(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def config_dtype(config: Any) -> torch.dtype:
    """The dtype a checkpoint of ``config`` loads in (``dtype="auto"``): its ``dtype``, else float32."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def adapt_on_meta(model: nn.Module, rank: int, target_modules: TargetSpec = None, *,
                  quantize: Optional[str] = None, residual_dtype: Optional[torch.dtype] = None,
                  adapter_dtype: Optional[torch.dtype] = None, alpha: Optional[float] = None) -> nn.Module:
    """Make the SORSA layers ``apply_sorsa(model, rank, target_modules, ...)`` would make, on the
    meta device, in place; every other parameter is frozen.  The residual takes the weight's
    dtype unless ``residual_dtype`` is given; U, S, V are float32 unless ``adapter_dtype`` is.

    Example::

        >>> adapt_on_meta(meta_model(config), 16, quantize="nf4")
    """
    layer_class(quantize)
    plan = plan_sorsa(model, rank, target_modules, quantize=quantize, quant_report=None)
    names, experts = plan.linear, plan.experts
    model.requires_grad_(False)
    adapter_dtype = adapter_dtype or torch.float32
    kw = dict(alpha=alpha, adapter_dtype=adapter_dtype, device="meta")
    aliases = module_aliases(model)
    for name in names:
        linear = model.get_submodule(name)
        w = linear_weight(linear)
        layer = layer_class(quantize)(w.shape[1], w.shape[0], rank, bias=getattr(linear, "bias", None) is not None,
                                      residual_dtype=residual_dtype or w.dtype, **kw)
        replace_everywhere(model, linear, layer, aliases)
    for name in experts:
        module = model.get_submodule(name)
        for attr in expert_weight_names(module):
            w = getattr(module, attr)
            w = w.mT if getattr(module, "is_transposed", False) else w  # seen as E×out×in
            E, m, n = w.shape
            has_bias = getattr(module, "has_bias", False)
            layer = experts_class(quantize)(E, n, m, rank, bias=has_bias, residual_dtype=residual_dtype or w.dtype,
                                            **kw)
            delattr(module, attr)
            setattr(module, attr, layer)
            if has_bias:
                delattr(module, f"{attr}_bias")
        module.forward = sorsa_experts_forward.__get__(module)
    return model
