"""``sorsa-kernels plan``: the memory plan of a finetune run, before the run.

:class:`PlanConfig` holds the finetune options that change memory (same names, flags and help as
:class:`~sorsa_kernels.jobs.finetune.config.FinetuneConfig`'s fields), the memory levers, the FSDP2
world size and the GPU sizes to check.  :func:`load_model_config` reads only a config: a Hub id or
folder (``config.json``), a ``config.json`` file, a ``.gguf`` file's metadata, or the embedded
model's.  :func:`run_plan` plans it (:func:`sorsa_kernels.memory.plan.plan_memory`) and, for each GPU
size the plan does not fit, the levers that would make it fit.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..memory.levers import lever_flags, parse_size, plans_that_fit
from ..memory.optimizers import OPTIMIZERS
from ..memory.plan import COMPONENTS, GIB, MemoryPlan, PlanSettings, plan_memory
from .finetune.config import FinetuneConfig
from .models.embedded import EMBEDDED_NAME
from .options import ConfigError, check_fields, option

__all__ = ["PlanConfig", "PlanReport", "load_model_config", "run_plan", "DEFAULT_GPUS", "settings_of", "check_run_fits"]

#: The GPU sizes ``fits`` reports when none is given.
DEFAULT_GPUS = ("12GB", "16GB", "24GB", "48GB", "80GB")
_FT = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
_LEVERS = "memory levers"


def _same(name: str) -> Any:
    """A finetune option's field, declared once there: same default, flags, help and choices."""
    f = _FT[name]
    return dataclasses.field(default=f.default, metadata=dict(f.metadata))


def _lever(name: str, default: Any, help: str, **kw: Any) -> Any:
    """A lever's field: finetune's own once it has it (the ``levers`` branch), else declared here."""
    return _same(name) if name in _FT else option(default, help, group=_LEVERS, **kw)


@dataclass
class PlanConfig:
    """What ``sorsa-kernels plan`` accepts.

    Example::

        >>> PlanConfig(model="bench/configs/Qwen3-30B-A3B.json", rank=16, quantize="nf4").world_size
        1
    """

    model: str = _same("model")
    rank: Optional[int] = _same("rank")
    target_modules: Optional[Sequence[str]] = _same("target_modules")
    quantize: Optional[str] = _same("quantize")
    bf16: bool = _same("bf16")
    adapter_dtype: Optional[str] = _same("adapter_dtype")
    max_length: int = _same("max_length")
    per_device_train_batch_size: Optional[int] = _same("per_device_train_batch_size")
    gradient_checkpointing: bool = _same("gradient_checkpointing")
    optim: str = _lever("optim", "adamw", "optimizer: torch AdamW, or bitsandbytes' 8-bit AdamW (paged: state "
                        "in unified memory)", choices=OPTIMIZERS)
    gradient_release: bool = _lever("gradient_release", False, "step each adapter in its gradient hook (no "
                                    "accumulation; clipping per tensor)")
    loss_chunk_size: int = _lever("loss_chunk_size", 0, "cross-entropy over chunks of N tokens (0: unchunked)",
                                  metavar="N")
    world_size: int = option(1, "GPUs sharing the model with FSDP2", group=_LEVERS, metavar="N")
    gpu_memory: Optional[Sequence[str]] = option(None, "GPU memory to check, e.g. 24GB (GB = GiB); lists the "
                                                 "levers that fit when the plan does not", group=_LEVERS,
                                                 nargs="+", metavar="SIZE", shown=" ".join(DEFAULT_GPUS))
    json: bool = option(False, "print the plan as JSON", group=_LEVERS)

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("world_size",):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError("{" + name + "} must be a positive integer, got {v}", self, v=getattr(self, name))
        if not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 0:
            raise ConfigError("{loss_chunk_size} must be 0 (unchunked) or a positive number of tokens, got {v}",
                              self, v=self.loss_chunk_size)
        for size in self.gpu_memory or ():
            parse_size(size)


def settings_of(cfg: Any, world_size: int = 1) -> PlanSettings:
    """The :class:`PlanSettings` of a ``PlanConfig`` or a resolved ``FinetuneConfig`` (levers it lacks: off)."""
    from .finetune.config import EMBEDDED_DEFAULTS, PAPER_DEFAULTS, target_spec

    get = lambda name, default: getattr(cfg, name, default)  # noqa: E731
    defaults = EMBEDDED_DEFAULTS if cfg.model == EMBEDDED_NAME else PAPER_DEFAULTS
    return PlanSettings(
        rank=cfg.rank or defaults["rank"], target_modules=target_spec(cfg), quantize=cfg.quantize, bf16=cfg.bf16,
        adapter_dtype=cfg.adapter_dtype, max_length=cfg.max_length,
        batch_size=cfg.per_device_train_batch_size or defaults["per_device_train_batch_size"],
        gradient_checkpointing=cfg.gradient_checkpointing, optim=get("optim", "adamw"),
        gradient_release=get("gradient_release", False), loss_chunk_size=get("loss_chunk_size", 0) or 0,
        world_size=get("world_size", world_size))


def load_model_config(name: str) -> Any:
    """The ``transformers`` config of ``--model``: the embedded model, a ``config.json`` file, a
    ``.gguf`` file (its metadata only), a folder or a Hub id (its ``config.json`` only)."""
    from transformers import AutoConfig

    if name == EMBEDDED_NAME:
        from .models.embedded import build_model, build_tokenizer

        return build_model(build_tokenizer()).config
    path = Path(name).expanduser()
    try:
        if path.suffix == ".json":
            if not path.is_file():
                raise ValueError(f"no such config file: {name}")
            d = json.loads(path.read_text())
            if "model_type" not in d:
                raise ValueError(f"{name} has no model_type: not a transformers config.json")
            d.pop("quantization_config", None)  # MXFP4/GPTQ storage: QSORSA requantizes to NF4
            return AutoConfig.for_model(d.pop("model_type"), **d)
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise ValueError(f"no such GGUF file: {name}")
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        config = AutoConfig.from_pretrained(name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        return config
    except ValueError:
        raise
    except Exception as e:  # OSError, JSONDecodeError, …
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read the config of {name!r}: {first}") from None


@dataclass
class PlanReport:
    """A plan and, per GPU size, whether it fits and the lever combinations that would."""

    plan: MemoryPlan
    fits: dict[str, bool]
    fitting: dict[str, list[tuple[dict[str, Any], MemoryPlan]]]

    def as_json(self) -> dict[str, Any]:
        """``{"peak_bytes", "components", "levers" (the settings and, per GPU size that does not fit, the
        lever combinations that would), "fits", "notes", "settings"}``."""
        s = self.plan.settings
        levers = {k: getattr(s, k) for k in ("optim", "gradient_release", "loss_chunk_size", "adapter_dtype",
                                             "gradient_checkpointing", "world_size")}
        levers["to_fit"] = {size: [dict(levers=lv, flags=lever_flags(lv), peak_bytes=p.peak_bytes) for lv, p in found]
                            for size, found in self.fitting.items()}
        return {"peak_bytes": self.plan.peak_bytes, "components": dict(self.plan.components), "levers": levers,
                "fits": dict(self.fits), "notes": dict(self.plan.notes), "settings": dataclasses.asdict(s)}

    def text(self) -> str:
        """The plan as ``sorsa-kernels plan`` prints it: the line, a component table, the peak's two
        moments, activations with and without checkpointing, and one ``fits SIZE`` line per GPU size."""
        p = self.plan
        rows = [p.line(), "", f"{'component':24}{'GiB':>10}"]
        rows += [f"{k:24}{p.components[k] / GIB:10.3f}" for k in COMPONENTS]
        n = p.notes
        rows += ["", f"peak = persistent + max(backward start, optimizer step): {n['backward_start'] / GIB:.2f} vs "
                 f"{n['optimizer_step_moment'] / GIB:.2f} GiB"
                 + (" (gradient release: both at once)" if p.settings.gradient_release else ""),
                 f"activations: {n['activations_with_checkpointing'] / GIB:.3f} GiB with checkpointing, "
                 f"{n['activations_without_checkpointing'] / GIB:.3f} GiB without",
                 f"cuda_context: a fixed allowance of {p.components['cuda_context'] / GIB:.2f} GiB per GPU; "
                 "nf4_dequant: the CPU reference path's dequantized NF4 residual or experts chunk (0 on a GPU: "
                 "the kernels dequantize in their K loop)"]
        if n.get("paged_optimizer_state"):
            rows.append(f"paged optimizer state (in unified memory, outside the peak): "
                        f"{n['paged_optimizer_state'] / GIB:.3f} GiB")
        rows.append("")
        for size, ok in self.fits.items():
            line = f"fits {size}: {'yes' if ok else 'no'}"
            if not ok:
                found = self.fitting.get(size) or []
                line += "; " + ("; ".join(f"{lever_flags(lv)} → {fp.peak_bytes / GIB:.2f} GiB" for lv, fp in found)
                                if found else "no combination of levers fits")
            rows.append(line)
        return "\n".join(rows)


def run_plan(cfg: PlanConfig) -> PlanReport:
    """Plan ``cfg`` and check it against each GPU size (``cfg.gpu_memory`` or :data:`DEFAULT_GPUS`)."""
    config = load_model_config(cfg.model)
    settings = settings_of(cfg)
    plan = plan_memory(config, settings)
    sizes = list(cfg.gpu_memory or DEFAULT_GPUS)
    fits = {size: plan.fits(parse_size(size)) for size in sizes}
    tallies: dict = {}
    fitting = {size: plans_that_fit(config, settings, parse_size(size), tallies=tallies)
               for size, ok in fits.items() if not ok and (cfg.gpu_memory or size == "24GB")}
    return PlanReport(plan, fits, fitting)


def check_run_fits(cfg: Any, force: bool = False) -> Optional[str]:
    """Before a finetune run: plan it, return the plan's one line, and on a GPU raise a one-line
    ValueError (the line and the levers that would fit) when the peak exceeds the visible GPU's
    memory, unless ``force``.  On a CPU the line is only printed.  A config that cannot be read
    (offline Hub id) gives ``memory plan: unavailable (…)``, never a failure."""
    import torch

    import os

    try:
        config = load_model_config(cfg.model)
        settings = settings_of(cfg, int(os.environ.get("WORLD_SIZE", "1")) if getattr(cfg, "fsdp", False) else 1)
        if not torch.cuda.is_available():
            settings = dataclasses.replace(settings, device="cpu")
        plan = plan_memory(config, settings)
    except Exception as e:  # the plan informs; it never stops a run that could work
        return f"memory plan: unavailable ({' '.join(str(e).split())[:120]})"
    if not torch.cuda.is_available() or force:
        return plan.line()
    budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if plan.fits(budget):
        return plan.line()
    found = plans_that_fit(config, settings, budget)
    fix = ("; levers that fit: " + "; ".join(f"{lever_flags(lv)} ({p.peak_bytes / GIB:.2f} GiB)" for lv, p in found)
           if found else "; no combination of levers fits: use more GPUs (--fsdp) or a smaller rank")
    raise ValueError(f"{plan.line()} exceeds this GPU's {budget / GIB:.2f} GiB{fix}; --force runs anyway")
