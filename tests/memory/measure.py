"""Measure one real training step's memory on the CPU, by component, for the plan-vs-measured test.

The step (forward, backward, optimizer step, ``zero_grad(set_to_none=True)``) runs under the
profiler's memory events (``torch.profiler`` with ``profile_memory``), whose memory profile
tags each allocation (gradient, activation, temporary, …).  Bytes are counted relative to
what existed before the step (the model and the optimizer state, made by a warm-up step):

* ``activations`` — the most bytes alive at once during forward + backward that do not outlive it
  (saved activations, the loss's logits and their gradients, temporaries; with gradient release
  the gradients too, which die in their hooks): the plan's ``transient_peak``;
* ``gradients`` — the most gradient bytes alive at once (the profiler's gradient tag, or made by
  the step and alive after it);
* ``peak`` — the most bytes alive at once over the whole step, above nothing (the persistent
  bytes are added back);
* ``frozen``, ``quant_state``, ``adapters``, ``optimizer_state`` — read off the tensors.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sorsa_kernels.memory.accounting import QUANT_STATE_NAMES
from sorsa_kernels.nn.experts import SORSAExperts
from sorsa_kernels.nn.linear import SORSALinear


def _timeline(fn: Callable[[], None]):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        fn()
    mp = p._memory_profile()
    return mp, mp.timeline


def profile_bytes(fn: Callable[[], None]) -> dict[str, int]:
    """``{"peak_above_start", "transient", "gradients"}`` of running ``fn`` (see the module docstring)."""
    from torch.profiler._memory_profiler import Action, Category

    mp, timeline = _timeline(fn)
    created = {key for _t, action, (key, _v), _s in timeline if action == Action.CREATE}
    destroyed = {key for _t, action, (key, _v), _s in timeline if action == Action.DESTROY}
    survivors = created - destroyed  # made by ``fn`` and alive after it: the gradients
    total = grads = kept = peak = transient = grad_peak = 0
    for _t, action, (key, version), size in timeline:
        is_grad = mp._categories.get(key, version) == Category.GRADIENT or key in survivors
        if action == Action.PREEXISTING:
            grads += size if is_grad else 0
            continue
        if action == Action.CREATE:
            total += size
            grads += size if is_grad else 0
            kept += size if key in survivors else 0
        elif action == Action.DESTROY:
            total -= size
            grads -= size if is_grad else 0
        peak = max(peak, total)
        grad_peak = max(grad_peak, grads)
        transient = max(transient, total - kept)
    return {"peak_above_start": peak, "transient": transient, "gradients": grad_peak}


def tensor_bytes(model: nn.Module, optimizer_state: dict) -> dict[str, int]:
    """Frozen, quantization-state and adapter bytes of the adapted layers, and the optimizer state
    (``{param: state}``; tensors shared between states, such as bitsandbytes' quantile maps, once)."""
    out = dict(frozen=0, quant_state=0, adapters=0, optimizer_state=0, persistent=0)
    seen = set()
    for m in model.modules():
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            b = t.numel() * t.element_size()
            out["persistent"] += b
            if t.requires_grad:
                out["adapters"] += b
            elif isinstance(m, (SORSALinear, SORSAExperts)):
                out["quant_state" if name in QUANT_STATE_NAMES else "frozen"] += b
    storages = set()
    for state in optimizer_state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in storages:
                storages.add(v.untyped_storage().data_ptr())
                out["optimizer_state"] += v.untyped_storage().nbytes()
    out["persistent"] += out["optimizer_state"]
    return out
