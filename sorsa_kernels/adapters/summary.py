"""What SORSA adapted in a model: layers per projection, trainable parameters, and what it left alone.

:func:`adaptation_summary` reads the model as it is (after :func:`sorsa_kernels.apply_sorsa`
or :func:`sorsa_kernels.load_adapter`), so the summary is never out of date;
``apply_sorsa`` logs its :meth:`AdaptationSummary.line` at INFO and the ``finetune``
command prints it before training.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.checks import linear_weight
from ..nn.kinds import kind_of
from .modules_to_save import SavedModule
from .targets import fused_expert_parameters, is_linear_like

__all__ = ["AdaptationSummary", "adaptation_summary"]

_INDEX = re.compile(r"^(.*\.)?\d+\.")


def _role(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``self_attn.q_proj`` (the part after the last block index)."""
    return _INDEX.sub("", name)


@dataclass
class AdaptationSummary:
    """The outcome of adapting a model.

    Attributes:
        layers: SORSA layers per role (the module name after its block index, e.g. ``self_attn.q_proj``);
            a MoE block's adapted experts count once per fused projection (``mlp.experts.gate_up_proj``,
            ``mlp.experts.down_proj``), each layer holding every expert's factors.
        trainable_parameters: parameters with ``requires_grad`` (adapter factors and saved modules).
        total_parameters: every parameter of the model.
        saved_modules: modules kept as trainable copies (``modules_to_save``).
        not_adapted: every ``nn.Linear`` / ``Conv1D`` that no target matched (the LM head among them).
        fused_experts: routed-expert weights still stored as fused 3-D parameters: experts left out of the
            targets (or frozen under ``quantize``), not adapted.
        below_rank: linear layers left alone whose smaller side is below the adapters' rank (``all-linear``
            skips them: they cannot hold a rank-r split).

    Example::

        >>> print(adaptation_summary(model).line())
        SORSA: 14 layers adapted (self_attn.q_proj×2, …), 30,720 trainable of 1,234,567 parameters (2.49%); not adapted: 1 linear (lm_head)
    """

    layers: dict[str, int] = field(default_factory=dict)
    trainable_parameters: int = 0
    total_parameters: int = 0
    saved_modules: list[str] = field(default_factory=list)
    not_adapted: list[str] = field(default_factory=list)
    fused_experts: list[str] = field(default_factory=list)
    below_rank: list[str] = field(default_factory=list)

    @property
    def adapted(self) -> int:
        """How many SORSA layers the model holds."""
        return sum(self.layers.values())

    def line(self) -> str:
        """The summary as one line (names of what was not adapted appear when there are at most 3)."""
        roles = ", ".join(f"{r}×{c}" for r, c in self.layers.items())
        pct = 100.0 * self.trainable_parameters / max(self.total_parameters, 1)
        text = (f"SORSA: {self.adapted} layers adapted ({roles}), {self.trainable_parameters:,} trainable of "
                f"{self.total_parameters:,} parameters ({pct:.2f}%)")
        if self.saved_modules:
            text += f"; trainable copies: {', '.join(self.saved_modules)}"
        skipped = []
        if self.not_adapted:
            names = f" ({', '.join(self.not_adapted)})" if len(self.not_adapted) <= 3 else ""
            skipped.append(f"{len(self.not_adapted)} linear{names}")
        if self.fused_experts:
            skipped.append(f"{len(self.fused_experts)} fused expert parameters")
        text += f"; not adapted: {', '.join(skipped)}" if skipped else ""
        if self.below_rank:
            names = f" ({', '.join(self.below_rank)})" if len(self.below_rank) <= 3 else ""
            text += f"; {len(self.below_rank)} linear smaller than the rank{names}"
        return text

    def details(self) -> list[str]:
        """One line per module or parameter left unadapted (what ``--verbose`` prints)."""
        return ([f"not adapted (linear): {n}" for n in self.not_adapted]
                + [f"not adapted (fused experts): {n}" for n in self.fused_experts])

    def __str__(self) -> str:
        return self.line()


def adaptation_summary(model: nn.Module) -> AdaptationSummary:
    """The :class:`AdaptationSummary` of ``model`` as it is now.

    Example::

        >>> apply_sorsa(model, rank=8)
        >>> adaptation_summary(model).not_adapted
        ['lm_head']
    """
    s = AdaptationSummary()
    saved = {n for n, m in model.named_modules() if isinstance(m, SavedModule)}
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in saved):
            continue
        if kind_of(module) is not None:  # an adapter layer of any registered kind (nn/kinds.py)
            role = _role(name)
            s.layers[role] = s.layers.get(role, 0) + 1
        elif isinstance(module, SavedModule):
            s.saved_modules.append(name)
        elif name and is_linear_like(module):
            s.not_adapted.append(name)
    seen: set[int] = set()
    for module in model.modules():
        # An NF4 residual is stored packed (two 4-bit codes a byte, plus scales): count the m·n
        # parameters it holds, not its bytes (87.98 M instead of 134.5 M on SmolLM2 otherwise).
        packed = isinstance(getattr(module, "nf4_packed", None), torch.Tensor)
        if packed:
            s.total_parameters += module.weight.shape.numel()  # metadata only: no dequantization
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or (packed and pname.startswith("nf4_")):
                continue
            seen.add(id(p))
            s.total_parameters += p.numel()
            if p.requires_grad:
                s.trainable_parameters += p.numel()
    s.fused_experts = [n for n in fused_expert_parameters(model) if not any(n.startswith(p + ".") for p in saved)]
    rank = max((m.rank for m in model.modules() if kind_of(m) is not None), default=0)
    s.below_rank = [n for n in s.not_adapted if min(linear_weight(model.get_submodule(n)).shape) < rank]
    return s
