"""Which levers make a run fit a GPU: every combination of the memory levers a run has not set,
planned, the smallest combinations that fit first.

A lever is one finetune flag (:data:`LEVERS`): ``--optim adamw8bit`` (8-bit AdamW state),
``--gradient-release`` (each adapter stepped in its gradient hook: no full set of gradients),
``--loss-chunk-size`` (cross-entropy over chunks of tokens: no full-sequence float32 logits),
``--adapter-dtype bfloat16`` (U, S, V and their gradients in bf16; the optimizer state as fp32
adapters', each stepped in fp32 and stochastically rounded back) and
``--gradient-checkpointing`` (one layer's activations at a time).  Each costs something:
:data:`COSTS` says what, in one line each.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Optional

from .plan import MemoryPlan, PlanSettings, build_meta, count_model, plan_memory
from .build import config_dtype

__all__ = ["LEVERS", "COSTS", "LOSS_CHUNK", "parse_size", "lever_flags", "plans_that_fit", "plan_levers", "plan_cached"]

#: Tokens per chunk the chunked cross-entropy lever proposes.
LOSS_CHUNK = 256
#: ``(field, value)`` of each lever, in the order they are proposed.
LEVERS = (("gradient_checkpointing", True), ("optim", "adamw8bit"), ("gradient_release", True),
          ("loss_chunk_size", LOSS_CHUNK), ("adapter_dtype", "bfloat16"))
#: What each lever costs (step time, behaviour), stated once.
COSTS = {
    "gradient_checkpointing": "one more forward of each layer in backward (about a third more step FLOPs; "
                              "step time not measured here)",
    "optim": "8-bit blockwise AdamW state, updated by one bitsandbytes kernel per tensor (step time not measured here)",
    "gradient_release": "the optimizer step runs inside backward, one call per tensor; no gradient accumulation, "
                        "clipping per tensor",
    "loss_chunk_size": "the logits recomputed chunk by chunk in backward: one more lm_head matmul per step",
    "adapter_dtype": "U, S, V and their gradients in bf16, stepped in fp32 and stochastically rounded back: an fp32 "
                     "copy of every adapter and its gradient during the step (one at a time with gradient "
                     "release); the optimizer state stays as for fp32 adapters",
}


def parse_size(text: str) -> int:
    """Bytes of a GPU memory size: ``24GB``, ``24GiB``, ``24G``, ``22.5GiB``, ``12288MB``.  GPU memory
    is sold in binary units, so GB and GiB both mean 2³⁰ bytes (a 24 GB RTX 4090 holds 24 GiB)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(G|GB|GiB|M|MB|MiB|T|TB|TiB)\s*", str(text), re.IGNORECASE)
    if m is None:
        raise ValueError(f"GPU memory {text!r} is not a size such as 24GB, 22.5GiB or 12288MB")
    unit = {"g": 2 ** 30, "m": 2 ** 20, "t": 2 ** 40}[m.group(2)[0].lower()]
    value = float(m.group(1)) * unit
    if value <= 0:
        raise ValueError(f"GPU memory {text!r} must be more than 0")
    return int(value)


def lever_flags(levers: dict[str, Any]) -> str:
    """The finetune flags that set ``levers`` (``--optim adamw8bit --gradient-release``)."""
    out = []
    for name, value in levers.items():
        flag = "--" + name.replace("_", "-")
        out.append(flag if value is True else f"{flag} {value}")
    return " ".join(out)


def _unset(settings: PlanSettings) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in LEVERS if getattr(settings, k) in (False, None, 0, "adamw", "float32", "fp32")
            and getattr(settings, k) != v]


def plans_that_fit(config: Any, settings: PlanSettings, budget: int, *, tallies: Optional[dict] = None,
                   limit: int = 3) -> list[tuple[dict[str, Any], MemoryPlan]]:
    """Up to ``limit`` ``(levers, plan)`` whose plan fits ``budget`` bytes, the fewest levers first
    (a combination containing a smaller fitting one is skipped), lowest peak first among equals."""
    tallies = {} if tallies is None else tallies
    found: list[tuple[dict[str, Any], MemoryPlan]] = []
    options = _unset(settings)
    for size in range(1, len(options) + 1):
        batch = []
        for combo in itertools.combinations(options, size):
            levers = dict(combo)
            if any(set(f).issubset(levers.items()) for f, _ in ((tuple(f.items()), p) for f, p in found)):
                continue
            plan = plan_cached(config, dataclasses.replace(settings, **levers), tallies)
            if plan.fits(budget):
                batch.append((levers, plan))
        found += sorted(batch, key=lambda fp: fp[1].peak_bytes)
        if len(found) >= limit:
            break
    return found[:limit]


def plan_cached(config: Any, settings: PlanSettings, tallies: dict) -> MemoryPlan:
    """:func:`plan_memory`, reusing ``tallies`` (one meta model per adapter dtype; the same config, rank,
    targets, quantization and world size in every call with the same dict)."""
    key = settings.adapter_dtype in ("bfloat16", "bf16")
    if key not in tallies:
        c = 2 if settings.bf16 else config_dtype(config).itemsize
        tallies[key] = count_model(build_meta(config, settings), settings.world_size, c)
    return plan_memory(config, settings, tally=tallies[key])


def plan_levers(config: Any, settings: PlanSettings, tallies: Optional[dict] = None) -> dict[str, MemoryPlan]:
    """The plan with each unset lever alone, and with all of them: ``{lever name or "all": plan}``."""
    tallies = {} if tallies is None else tallies
    options = _unset(settings)
    out = {k: plan_cached(config, dataclasses.replace(settings, **{k: v}), tallies) for k, v in options}
    if options:
        out["all"] = plan_cached(config, dataclasses.replace(settings, **dict(options)), tallies)
    return out

