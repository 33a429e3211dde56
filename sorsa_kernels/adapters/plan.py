"""Surgery as a plan, then a transaction.

:func:`plan_sorsa` decides everything :func:`sorsa_kernels.apply_sorsa` will change — which
linear layers, which fused experts modules, which modules are kept as trainable copies,
which ``all-linear`` layers are skipped and why — and checks what needs no weight values
(every target entry matches something, the rank fits every weight, no module is both a
target and a saved copy, the model is not adapted yet).  :meth:`SurgeryPlan.check_weights`
then checks every weight's values (finite, a supported dtype), experts included, and
:meth:`SurgeryPlan.apply` changes the model as one :class:`Transaction`: each step records
its undo (the module's parameters, submodules, buffers and instance ``forward``) before it
changes anything, and a failure anywhere puts every step back, newest first, and the
``requires_grad`` flags as they were.

The streaming loader builds its layers from the same plan (``plan.linear``,
``plan.init``), and ``load_adapter`` plans the file's layers, experts and saved modules the
same way and applies the plan with its own builders (factors from the file instead of an
SVD): ``plan.apply(model, build_linear=..., build_experts=..., build_saved=...)``.

Example::

    >>> plan = plan_sorsa(model, 8, ["q_proj", "v_proj", "experts"], alpha=16.0)
    >>> plan.linear[:2], plan.experts[:1]
    (['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj'], ['model.layers.0.mlp.experts'])
    >>> plan.apply(model)        # all or nothing
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from torch import nn
from tqdm.auto import tqdm

from ..nn.checks import linear_weight
from ..nn.experts import SORSAExperts
from ..nn.factory import make_sorsa_linear
from ..nn.init_spec import SORSAInit
from ..nn.linear import SORSALinear
from .experts import adapt_experts, expert_stacks, expert_weight_names, is_adapted_experts, is_fused_experts
from .modules_to_save import SavedModule, resolve_modules_to_save
from .targets import Targets, TargetSpec, inside, is_linear_like, nearest_names

__all__ = ["SurgeryPlan", "Transaction", "plan_sorsa", "pick_targets", "collect_targets", "module_aliases", "set_submodule"]

logger = logging.getLogger(__name__)

_MISSING = object()


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """``{id(module): every name it has}``: a module shared by two parents
    (``layers[1].q_proj = layers[0].q_proj``) has two names, and surgery must replace it under both."""
    out: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            out.setdefault(id(module), []).append(name)
    return out


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name`` in ``model`` (its parent's attribute)."""
    parent, child = _parent(model, name)
    setattr(parent, child, new)


class Transaction:
    """Changes to one model, each recorded with its undo; :meth:`rollback` restores them newest first.

    :meth:`record` keeps a module's parameters, submodules, buffers and instance ``forward``
    (what surgery changes) before a step changes them; the ``requires_grad`` flag of every
    parameter the model had when the transaction began is restored too.

    Example::

        >>> tx = Transaction(model)
        >>> tx.record(model.layers[0]); model.layers[0].q_proj = new
        >>> tx.rollback()                  # the old q_proj is back
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._grad = [(p, p.requires_grad) for p in model.parameters()]
        self._undo: list[tuple[nn.Module, dict, dict, dict, Any]] = []

    def record(self, module: nn.Module) -> None:
        """Remember ``module``'s parameters, submodules, buffers and instance ``forward`` as they are now."""
        self._undo.append((module, dict(module._parameters), dict(module._modules), dict(module._buffers),
                           module.__dict__.get("forward", _MISSING)))

    def replace(self, names: Sequence[str], new: nn.Module) -> None:
        """Put ``new`` at every name of ``names``, recording each parent first."""
        for name in names:
            parent, child = _parent(self.model, name)
            self.record(parent)
            setattr(parent, child, new)

    def rollback(self) -> None:
        """Undo every recorded step, newest first, and restore the ``requires_grad`` flags."""
        for module, params, modules, buffers, forward in reversed(self._undo):
            for store, saved in ((module._parameters, params), (module._modules, modules), (module._buffers, buffers)):
                store.clear()
                store.update(saved)
            if forward is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward
        self._undo.clear()
        for p, flag in self._grad:
            p.requires_grad_(flag)


def collect_targets(model: nn.Module, targets: Targets) -> tuple[list[str], list[str], list[str], set[str]]:
    """Walk ``model`` once with the matcher: ``(linear, experts, adapted, entries)`` — the
    linear layers and fused experts modules it picks (a module shared by several parents
    once, under its first name), those already adapted, and the entries that picked anything.

    A list entry or regex that picks a module which is neither linear nor experts is a
    TypeError; with the architecture's table or ``all-linear`` such modules are passed over
    (``all-linear`` picks linear layers only, as PEFT's option)."""
    linear, experts, adapted, entries = [], [], [], set()
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen or isinstance(module, SORSAExperts):
            continue
        entry = targets.match(name)
        if entry is None:
            continue
        fused, done = is_fused_experts(module), is_adapted_experts(module)
        if fused or done:
            if targets.all_linear:
                continue
            (adapted if done else experts).append(name)
        elif isinstance(module, SORSALinear):
            adapted.append(name)
        elif is_linear_like(module):
            linear.append(name)
        elif targets.explicit:
            raise TypeError(f"target {name} is a {type(module).__name__}, not nn.Linear or Conv1D; "
                            "SORSA adapts nn.Linear and Conv1D layers only")
        else:
            continue
        seen.add(id(module))
        entries.add(entry)
    return linear, experts, adapted, entries


def _check_not_adapted(model: nn.Module, adapted: list[str]) -> None:
    if not adapted:
        return
    experts = [n for n in adapted if is_adapted_experts(model.get_submodule(n))]
    again = "apply_sorsa once per model (merge_sorsa first to adapt the merged weights)"
    if experts:
        raise ValueError(f"the model is already adapted: {experts[0]} holds SORSA experts; {again}")
    more = f" (and {len(adapted) - 1} more)" if len(adapted) > 1 else ""
    raise ValueError(f"the model is already adapted: {adapted[0]} is a SORSA layer{more}; {again}")


def _check_entries(model: nn.Module, targets: Targets, entries: set[str]) -> None:
    """Every entry of a list picks something (issue 29 item 2), and something is picked at all."""
    if targets.explicit and targets.pattern is None:
        for entry in targets.names:
            if entry not in entries:
                candidates = [n for n, m in model.named_modules()
                              if n and (is_linear_like(m) or is_fused_experts(m) or is_adapted_experts(m))]
                raise ValueError(f"no module of the model matches target_modules entry {entry!r} (of "
                                 f"{list(targets.names)!r}); nearest names: {', '.join(nearest_names(entry, candidates))}")
    if not entries:
        raise ValueError(f"no module of the model matches target_modules={targets.describe()}")


def _check_saved_apart(saved: list[str], picked: list[str]) -> None:
    """A module named both as a target and in ``modules_to_save`` is refused (issue 29 item 15)."""
    for s in saved:
        clash = next((t for t in picked if inside(t, [s]) or inside(s, [t])), None)
        if clash is not None:
            raise ValueError(f"modules_to_save {s!r} overlaps the target layer {clash}: a module is either adapted "
                             "by SORSA or kept as a trainable copy; drop it from target_modules or modules_to_save")


def pick_targets(model: nn.Module, target_modules: TargetSpec, saved: Sequence[str] = ()
                 ) -> tuple[Targets, list[str], list[str]]:
    """``(targets, linear, experts)``: the matcher for ``target_modules`` and the linear layers and
    experts modules it picks, checked (not yet adapted; every list entry picks something;
    something is picked).  Modules inside ``saved`` are left out of the table's and
    ``all-linear``'s picks; a list or regex that names one is refused."""
    targets = Targets.resolve(model, target_modules)
    linear, experts, adapted, entries = collect_targets(model, targets)
    _check_not_adapted(model, adapted)
    if targets.explicit:
        _check_saved_apart(list(saved), linear + experts)
    else:
        linear = [n for n in linear if not inside(n, saved)]
        experts = [n for n in experts if not inside(n, saved)]
    _check_entries(model, targets, entries if linear or experts else set())
    return targets, linear, experts


@dataclass
class SurgeryPlan:
    """What :func:`plan_sorsa` decided: the changes :meth:`apply` makes, all or nothing.

    Attributes:
        init: the initialization of every layer (rank, alpha, SVD, dtypes, storage).
        linear: full names of the ``nn.Linear`` / ``Conv1D`` layers to replace (one name per module).
        experts: full names of the fused experts modules whose stacks become SORSA experts.
        saved: full names of the modules kept as trainable copies (``modules_to_save``).
        skipped: ``all-linear`` layers left alone, with why (their smaller side is below the rank).
        quant_report: the report each quantized linear layer keeps (``"fro"``, ``"full"`` or None).
    """

    init: SORSAInit
    linear: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    quant_report: Optional[str] = "fro"

    @property
    def rank(self) -> int:
        return self.init.rank

    def check_weights(self, model: nn.Module) -> None:
        """Check every planned weight's values — finite, a supported dtype, not on the meta device —
        and shape against the rank, experts included, before anything changes (one-line errors)."""
        for name in self.linear:
            self.init.check_weight(linear_weight(model.get_submodule(name)), name)
        for name in self.experts:
            for attr, w in expert_stacks(model.get_submodule(name)).items():
                self.init.check_weight(w, f"{name}.{attr}")

    def apply(self, model: nn.Module, *, progress: bool = False,
              build_linear: Optional[Callable[[str, nn.Module], nn.Module]] = None,
              build_experts: Optional[Callable[[str, nn.Module], None]] = None,
              build_saved: Optional[Callable[[str, nn.Module], nn.Module]] = None) -> nn.Module:
        """Change ``model`` as planned, as one :class:`Transaction`: freeze every parameter, replace
        each linear layer (under every name it has), adapt each experts module in place, wrap each
        saved module.  Any failure restores the model exactly and re-raises.

        ``build_linear(name, linear)`` returns the new layer (default: an SVD split by
        :func:`~sorsa_kernels.nn.factory.make_sorsa_linear` with :attr:`init`);
        ``build_experts(name, module)`` adapts an experts module in place (default
        :func:`~sorsa_kernels.adapters.experts.adapt_experts` with :attr:`init`);
        ``build_saved(name, module)`` returns the wrapper of a saved module (default
        :class:`~sorsa_kernels.adapters.modules_to_save.SavedModule`; ``load_adapter`` also fills its copy).
        """
        self.check_weights(model)
        build_linear = build_linear or self.build_linear
        build_experts = build_experts or (lambda name, module: adapt_experts(module, self.init, name=name))
        build_saved = build_saved or (lambda name, module: SavedModule(module))
        aliases = module_aliases(model)
        tx = Transaction(model)
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            # the bar counts what the summary counts: each linear layer and each fused expert weight
            weights = {name: len(expert_weight_names(model.get_submodule(name))) for name in self.experts}
            bar = tqdm(total=len(self.linear) + sum(weights.values()), desc="SORSA init", unit="layer",
                       disable=not progress)
            with bar:
                for name in self.linear:
                    linear = model.get_submodule(name)
                    tx.replace(aliases.get(id(linear), [name]), build_linear(name, linear))
                    del linear
                    bar.update(1)
                for name in self.experts:
                    module = model.get_submodule(name)
                    tx.record(module)
                    build_experts(name, module)
                    bar.update(weights[name])
            for name in self.saved:
                module = model.get_submodule(name)
                if not isinstance(module, SavedModule):
                    tx.replace([name], build_saved(name, module))
        except BaseException:  # all or nothing, whatever kind of module failed
            tx.rollback()
            raise
        return model

    def build_linear(self, name: str, linear: nn.Module, **options: Any) -> nn.Module:
        """The SORSA layer of ``linear`` by :attr:`init` (``options`` replace its fields), split by SVD
        through :func:`~sorsa_kernels.nn.factory.make_sorsa_linear`; ``linear`` is left untouched."""
        init = SORSAInit.of(self.init, name, **options)
        extra = {"quant_report": self.quant_report} if init.quantize is not None else {}
        return make_sorsa_linear(linear, init, quantize=init.quantize, quant_iters=init.quant_iters, name=name, **extra)

    def notes(self) -> list[str]:
        """One line per planned decision the user did not spell out (layers ``all-linear`` skipped)."""
        return [f"not adapted: {name} ({why})" for name, why in self.skipped.items()]


def plan_sorsa(model: nn.Module, rank: Any, target_modules: TargetSpec = None, *,
               modules_to_save: Optional[Sequence[str]] = None, quant_report: Optional[str] = "fro",
               **init_options: Any) -> SurgeryPlan:
    """Decide what :func:`sorsa_kernels.apply_sorsa` changes and check it without changing ``model``.

    ``rank`` is r or a :class:`~sorsa_kernels.nn.init_spec.SORSAInit` (``init_options`` are
    its fields); ``target_modules`` and ``modules_to_save`` are ``apply_sorsa``'s.  Checked
    here (one-line errors, nothing touched): every entry of a target list picks a linear
    layer or experts module (else the nearest names); ``all-linear`` stands alone; no saved
    module is or holds a layer the list or regex names; the model is not adapted yet; the
    rank fits every planned weight (``all-linear`` skips a layer whose smaller side is below
    the rank, and the plan says so in :attr:`SurgeryPlan.skipped`).  Weight values are
    checked by :meth:`SurgeryPlan.check_weights` (which :meth:`SurgeryPlan.apply` runs first),
    so a plan can be made on the meta device.

    With the architecture's table as targets, routed experts stay frozen, with a warning,
    when the run asks for dropout (SORSA experts have none); named explicitly, that is an error.
    """
    init = SORSAInit.of(rank, **init_options)
    saved = resolve_modules_to_save(model, modules_to_save)
    targets, linear, experts = pick_targets(model, target_modules, saved)
    if experts and init.dropout:
        if targets.explicit:
            raise ValueError(f"dropout={init.dropout} is not supported on expert weights ({experts[0]}); leave the "
                             "experts out of target_modules or use dropout=0")
        logger.warning("routed experts (%d modules) left frozen: SORSA experts do not support dropout=%s yet",
                       len(experts), init.dropout)
        experts = []
    skipped = {}
    if targets.all_linear:
        for name in linear:
            small = min(linear_weight(model.get_submodule(name)).shape)
            if small < init.rank:
                skipped[name] = f"its smaller side {small} is below rank {init.rank}"
        linear = [n for n in linear if n not in skipped]
        if not linear:
            raise ValueError(f"no linear layer of the model has both sides at least rank {init.rank} "
                             f"(target_modules='all-linear')")
    for name in linear:
        init.check_shape(tuple(linear_weight(model.get_submodule(name)).shape), name)
    for name in experts:
        for attr, w in expert_stacks(model.get_submodule(name)).items():
            init.check_shape(tuple(w.shape), f"{name}.{attr}")
    return SurgeryPlan(init, linear, experts, saved, skipped, quant_report)
