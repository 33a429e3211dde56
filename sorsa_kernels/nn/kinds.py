"""Adapter kinds: one description per kind of adapter layer, read by everything that handles them.

An :class:`AdapterKind` says, for one module class, what the rest of the package needs to
know without testing ``isinstance`` of concrete classes: which method it implements
(``method``: ``"sorsa"``, or a kind added from outside), how its residual is stored
(``quantize``: None or ``"nf4"``), whether it holds one linear layer or a stack of experts,
which tensors an adapter file stores for it (the trained factors ``U, S, V``, the initial
factors ``U0, S0, V0`` and any ``extra`` trainable tensors, with their shapes), and whether
its update is a LoRA (``B·A``) that a PEFT export can write.  Building, the forward and
merging stay methods of the module (``from_linear``, ``from_factors``, ``merge``,
``merged_weight``), as they are for every SORSA layer.

The four built-in kinds (SORSA, QSORSA, SORSA experts, QSORSA experts) register themselves
when their modules are imported (``nn/factory.py``'s class decorators); a new kind registers
with :func:`register_kind` from anywhere, and ``apply_sorsa`` builds it inside
:func:`building` (or ``make_sorsa_linear(kind=...)``).  Readers: ``nn/factory.py`` (which class
to build), the adapter files (names, shapes, the layer to rebuild), the PEFT export, the
summary, ``sorsa_layers`` and the FSDP helpers.

Example::

    >>> register_kind(AdapterKind("magnitude", MagnitudeLinear, extra={"magnitude": ("out",)}, lora=False))
    >>> with building("magnitude"):
    ...     apply_sorsa(model, 8)
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator, Optional

from torch import nn

__all__ = ["AdapterKind", "DEFAULT_METHOD", "register_kind", "unregister_kind", "find_kind", "kind_of",
           "registered_kinds", "building", "building_method", "is_adapter_layer", "is_adapter_experts", "allowed_quantize"]

#: The method of the built-in kinds, and of every adapter file layer that names none.
DEFAULT_METHOD = "sorsa"
#: Dimension names an ``extra`` tensor's shape may use.
_DIMS = ("out", "in", "rank")


@dataclass(frozen=True)
class AdapterKind:
    """How one kind of adapter layer is stored, rebuilt, exported and summarised.

    Attributes:
        method: the adaptation method (``"sorsa"``; another name for a kind added from outside).
        module_class: the ``nn.Module`` class of the kind's layers.
        quantize: the storage of the frozen residual (None: dense, ``"nf4"``: QSORSA).
        experts: True for a stack of experts (every tensor gets a leading expert dimension).
        trained: the names of the trained factors (attributes of the layer), shapes out×r, r, in×r.
        initial: the names under which the initial factors ``layer.init_factors`` are stored.
        extra: further trainable tensors, by attribute name, with their shape in terms of
            ``"out"``, ``"in"`` and ``"rank"`` (e.g. ``{"magnitude": ("out",)}``); an adapter file stores
            and restores them as it does the factors.
        lora: whether the layer's update is ``scale·(U·diag(S)·Vᵀ − U0·diag(S0)·V0ᵀ)``, a LoRA the PEFT
            export can write; False refuses the export, naming the kind.
        label: what messages and the summary call the kind.
    """

    method: str
    module_class: type
    quantize: Optional[str] = None
    experts: bool = False
    trained: tuple[str, ...] = ("U", "S", "V")
    initial: tuple[str, ...] = ("U0", "S0", "V0")
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)
    lora: bool = True
    label: str = "SORSA"

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"an adapter kind's method must be a non-empty string, got {self.method!r}")
        if not (isinstance(self.module_class, type) and issubclass(self.module_class, nn.Module)):
            raise TypeError(f"module_class of kind {self.method!r} must be an nn.Module class, "
                            f"got {self.module_class!r}")
        for key, dims in self.extra.items():
            if key in self.trained or key in self.initial or not all(d in _DIMS for d in dims):
                raise ValueError(f"kind {self.method!r}: extra tensor {key!r} must be a new name with a shape of "
                                 f"{', '.join(_DIMS)}, got {dims!r}")

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Every tensor an adapter file stores per layer of this kind, in order."""
        return (*self.trained, *self.initial, *self.extra)

    def shapes(self, out_features: int, in_features: int, rank: int,
               num_experts: Optional[int] = None) -> dict[str, tuple[int, ...]]:
        """``{tensor name: shape}`` of one layer's stored tensors (an experts stack's lead with ``num_experts``)."""
        lead = (num_experts,) if self.experts else ()
        size = {"out": out_features, "in": in_features, "rank": rank}
        factor = [(out_features, rank), (rank,), (in_features, rank)]
        out = {k: lead + s for k, s in zip(self.trained, factor)}
        out.update({k: lead + s for k, s in zip(self.initial, factor)})
        out.update({k: lead + tuple(size[d] for d in dims) for k, dims in self.extra.items()})
        return out

    def state(self, layer: nn.Module) -> dict[str, object]:
        """``{tensor name: tensor}`` of ``layer`` as an adapter file stores it (live tensors, not copies)."""
        if layer.init_factors is None:
            raise ValueError(f"a {self.label} layer has no initial factors (it was not built by "
                             "from_linear/from_factors/from_weight)")
        out = {k: getattr(layer, k) for k in self.trained}
        out.update(zip(self.initial, layer.init_factors))
        out.update({k: getattr(layer, k) for k in self.extra})
        return out

    def key(self) -> tuple[str, Optional[str], bool]:
        """``(method, quantize, experts)``: what the registry files the kind under (one kind per key)."""
        return self.method, self.quantize, self.experts


_KINDS: dict[tuple[str, Optional[str], bool], AdapterKind] = {}
_BY_CLASS: dict[type, AdapterKind] = {}
_BUILDING: contextvars.ContextVar[str] = contextvars.ContextVar("sorsa_kernels_building", default=DEFAULT_METHOD)


def register_kind(kind: AdapterKind) -> AdapterKind:
    """Make ``kind`` known to the factory, the adapter files, the export, the summary and FSDP; returns it.

    Registering a kind again with the same ``(method, quantize, experts)`` replaces it.
    """
    old = _KINDS.get(kind.key())
    if old is not None:
        _BY_CLASS.pop(old.module_class, None)
    _KINDS[kind.key()] = kind
    _BY_CLASS[kind.module_class] = kind
    return kind


def unregister_kind(kind: AdapterKind) -> None:
    """Forget ``kind`` (a plug-in unloading, a test cleaning up); the built-in kinds stay unless named."""
    if _KINDS.get(kind.key()) is kind:
        del _KINDS[kind.key()]
        _BY_CLASS.pop(kind.module_class, None)


def registered_kinds() -> list[AdapterKind]:
    """Every registered kind, in registration order."""
    return list(_KINDS.values())


def _methods(experts: bool) -> list[str]:
    return sorted({k.method for k in _KINDS.values() if k.experts == experts})


def _storages(method: str, experts: bool) -> list[Optional[str]]:
    return [k.quantize for k in _KINDS.values() if k.method == method and k.experts == experts]


def allowed_quantize(method: str = DEFAULT_METHOD, experts: bool = False) -> str:
    """The ``quantize`` values of ``method`` as an error message lists them: ``None or 'nf4'``."""
    modes = _storages(method, experts)
    return " or ".join(["None"] * (None in modes) + sorted(repr(q) for q in modes if q is not None))


def find_kind(method: Optional[str], quantize: Optional[str], experts: bool = False) -> AdapterKind:
    """The kind of ``method`` (None: :func:`building_method`) with residual storage ``quantize``.

    Raises a one-line ValueError naming what is unknown and what is registered.

    Example::

        >>> find_kind("sorsa", "nf4").module_class.__name__
        'QSORSALinear'
    """
    method = building_method() if method is None else method
    kind = _KINDS.get((method, quantize, experts))
    if kind is not None:
        return kind
    what = "expert weights" if experts else "layers"
    if method not in _methods(experts):
        raise ValueError(f"adapter kind {method!r} is not registered for {what}; registered: "
                         f"{', '.join(map(repr, _methods(experts))) or 'none'} (import the module that registers it)")
    raise ValueError(f"quantize must be {allowed_quantize(method, experts)}{' for expert weights' * experts}"
                     f"{'' if method == DEFAULT_METHOD else f' of kind {method!r}'}, got {quantize!r}")


def kind_of(module: nn.Module) -> Optional[AdapterKind]:
    """The kind of an adapter layer (by its class or nearest registered base class), or None for any other module."""
    for cls in type(module).__mro__:
        kind = _BY_CLASS.get(cls)
        if kind is not None:
            return kind
    return None


def is_adapter_layer(module: nn.Module) -> bool:
    """Whether ``module`` is an adapter layer of one linear weight (SORSA, QSORSA, or a registered kind)."""
    kind = kind_of(module)
    return kind is not None and not kind.experts


def is_adapter_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an adapter stack of expert weights (SORSA or QSORSA experts, or a registered kind)."""
    kind = kind_of(module)
    return kind is not None and kind.experts


def building_method() -> str:
    """The method new layers are built as: :data:`DEFAULT_METHOD` outside :func:`building`."""
    return _BUILDING.get()


@contextlib.contextmanager
def building(method: str) -> Iterator[str]:
    """Within the block, ``apply_sorsa`` and the factory build layers of kind ``method``.

    Example::

        >>> with building("magnitude"):
        ...     apply_sorsa(model, 8)
    """
    if method not in _methods(False) + _methods(True):
        find_kind(method, None)  # raises, naming the registered kinds
    token = _BUILDING.set(method)
    try:
        yield method
    finally:
        _BUILDING.reset(token)
