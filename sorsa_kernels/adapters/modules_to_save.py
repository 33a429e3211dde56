"""Trainable copies of whole modules (a classification head) beside the SORSA layers: PEFT's ``modules_to_save``.

``apply_sorsa(..., modules_to_save=[...])`` replaces each named module by a
:class:`SavedModule` that holds the frozen original and a trainable copy and runs the
copy.  The copy is saved in the adapter file, restored by ``load_adapter``, becomes the
module again on ``merge_sorsa``, and is written into the PEFT export under PEFT's own
``modules_to_save`` keys (``base_model.model.<name>.<parameter>``).  The original stays
as it was, so the base model's weights are unchanged while training.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from .targets import Targets, default_modules_to_save, inside

__all__ = [
    "SavedModule",
    "resolve_modules_to_save",
    "saved_modules",
    "unwrap_saved_modules",
    "saved_state",
    "check_saved_state",
]


class SavedModule(nn.Module):
    """A frozen ``original`` and its trainable copy ``trained``; ``forward`` runs the copy.

    Attributes the wrapper lacks (``weight``, ``out_features``, …) are read from the copy,
    so model code that inspects its head keeps working.

    Example::

        >>> head = SavedModule(model.classifier)
        >>> [p.requires_grad for p in head.trained.parameters()]
        [True, True]
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.trained = copy.deepcopy(original)
        self.original = original
        for p in self.original.parameters():
            p.requires_grad_(False)
        for p in self.trained.parameters():
            p.requires_grad_(True)

    @classmethod
    def restored(cls, original: nn.Module, state: dict[str, torch.Tensor]) -> "SavedModule":
        """The wrapper of ``original`` whose trained copy holds ``state`` (a saved module's tensors,
        cast to the copy's own devices and dtypes): how ``load_adapter`` brings a saved head back."""
        wrapped = cls(original)
        own = wrapped.trained.state_dict()
        wrapped.trained.load_state_dict({k: t.to(own[k].device, own[k].dtype) for k, t in state.items()})
        return wrapped

    def forward(self, *args, **kwargs):
        return self.trained(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("trained", "original") or "trained" not in self._modules:
                raise
            return getattr(self._modules["trained"], name)


def resolve_modules_to_save(model: nn.Module, modules_to_save: Optional[Sequence[str]]) -> list[str]:
    """Full names of the modules to keep as trainable copies.

    ``None`` is the default: the classification head of a ``*ForSequenceClassification`` /
    ``*ForTokenClassification`` / ``*ForImageClassification`` model, else nothing.  Names
    match as targets do (full name or dotted suffix, :class:`~sorsa_kernels.adapters.targets.Targets`);
    a name matching nothing is a ValueError.
    """
    if modules_to_save is None:
        return default_modules_to_save(model)
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    out: list[str] = []
    for target in modules_to_save:
        matcher = Targets(names=(target,))
        found = [n for n, _ in model.named_modules() if matcher.match(n)]
        if not found:
            children = ", ".join(n for n, _ in model.named_children())
            raise ValueError(
                f"modules_to_save {target!r} matches no module of the model (its top-level modules: {children})"
            )
        out += [n for n in found if n not in out]
    return [n for n in out if not inside(n, [o for o in out if o != n])]


def saved_modules(model: nn.Module) -> dict[str, SavedModule]:
    """Every :class:`SavedModule` of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SavedModule)}


def unwrap_saved_modules(model: nn.Module) -> list[str]:
    """Put each trained copy in its wrapper's place (the merge of a saved module); returns their names."""
    names = list(saved_modules(model))
    for name in names:
        model.set_submodule(name, model.get_submodule(name).trained)
    return names


def saved_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: state_dict of its trained copy}`` for every saved module."""
    return {name: dict(m.trained.state_dict()) for name, m in saved_modules(model).items()}


def check_saved_state(model: nn.Module, state: dict[str, dict[str, torch.Tensor]], source: str) -> None:
    """Raise a ValueError naming ``source``, the module and the key unless ``state`` fits ``model``'s modules."""
    for name, tensors in state.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source}: the adapter saves module {name}, which the base model does not have") from None
        if isinstance(module, SavedModule):
            module = module.trained
        own = module.state_dict()
        if set(own) != set(tensors):
            raise ValueError(
                f"{source}: saved module {name} holds {sorted(tensors)} but the base model's {name} has {sorted(own)}"
            )
        for key, t in tensors.items():
            if tuple(t.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"{source}: saved module {name}.{key} has shape {tuple(t.shape)} but the base model's has "
                    f"{tuple(own[key].shape)}"
                )
