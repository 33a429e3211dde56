"""A ``TrainerCallback`` that records how far fine-tuning moves the pretrained weights.

Every ``every`` optimizer steps, and at the start and the end of training,
:class:`TrajectoryCallback` appends one record: the training loss, the learning rate,
the orthonormality of the adapter factors, the size of the trainable low-rank part, and
the paper's ΔΣ and ΔD (Section 3, Eq. 1–4, computed by
:func:`~sorsa_kernels.adapters.analysis.singular_drift`) of every adapted layer —
plus whatever an optional ``evaluate(model)`` returns (held-out loss, exact match …).
``sorsa-kernels compare`` attaches one to each method it trains; users can attach it to
their own runs.

It recognises three kinds of trained layers, so that one recorder serves every method:

========  ===========================================  =====================================
kind      layers                                       ΔW (from the factors at train start)
========  ===========================================  =====================================
sorsa     :class:`~sorsa_kernels.SORSALinear`          ``scale·(U·diag(S)·Vᵀ − U0·diag(S0)·V0ᵀ)``
lora      PEFT LoRA layers (LoRA, PiSSA, …): any       ``scaling·(B·A − B0·A0)`` per active
          module with ``lora_A``/``lora_B``/``base_layer``  adapter
linear    plain ``nn.Linear`` trained in full, named   ``W − W_start``
          by ``target_modules``
========  ===========================================  =====================================

The effective weight is ``W_t = W0 + ΔW`` with ``W0`` the pretrained weight, in float64
on the CPU.  Taking ΔW from the factors (rather than re-adding the frozen residual)
makes every method start at exactly ΔΣ = ΔD = 0: PiSSA's and SORSA's SVD split of
``W0`` and LoRA's ``B = 0`` all reproduce the pretrained weight, so step 0 measures
nothing but rounding otherwise.

Orthonormality is the value of the paper's regularizer, the mean over the factor
matrices of ``‖XᵀX − I‖_F``: ``X ∈ {U, V}`` for SORSA (what ``SORSACallback`` logs), and
the analogue ``X ∈ {B, Aᵀ}`` (m×r and n×r) for PEFT LoRA layers.  LoRA and PiSSA do not
aim for orthonormal factors: PiSSA's start at ``‖Σ_r − I‖_F``-like values (they carry
``√σ``) and LoRA's ``B = 0`` gives ``√r`` for B.  Plain linear layers have none (``None``).
``adapter_norm`` is the mean over layers of ``‖low-rank part‖_F / ‖W0‖_F``: 0 at the
start for LoRA (``B = 0``), the top-r share of ``W0`` for PiSSA and SORSA (their SVD
init); ``None`` for plain linear layers.  ``relative_change`` is the mean over layers of
``‖ΔW‖_F / ‖W0‖_F``, the size of what training has changed (0 at the start for every method).

The SVD of each ``W0`` (what ΔΣ/ΔD need of it) is computed once per layer and kept in
``svd_cache`` (pass one dict to several callbacks to share it across runs); a layer whose ΔW
is exactly zero (every method at step 0) has ΔΣ = ΔD = 0 without an SVD, so no rounding noise.
Timings: ``step_seconds`` (each optimizer step, recording excluded), ``record_seconds``
(ΔΣ/ΔD and norms) and ``evaluate_seconds`` (the ``evaluate`` calls) are kept apart.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, MutableMapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from ..nn.linear import SORSALinear
from ..adapters.analysis import Spectrum, drift_from, spectrum
from ..adapters.surgery import find_targets

__all__ = ["TrajectoryCallback", "tracked_layers", "canonical_name"]

_PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """A module name without PEFT's ``base_model.model.`` wrapper prefix, so that the same
    layer has the same name in a SORSA, a PEFT and a plain model."""
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def _is_peft_lora(module: nn.Module) -> bool:
    """A PEFT LoRA layer on a matrix (not a ``ParamWrapper`` on fused expert weights, which has a
    ``parameter_name`` and is not followed: ΔΣ/ΔD are over the linear target matrices)."""
    return (isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
            and hasattr(module, "base_layer") and not hasattr(module, "parameter_name"))


def tracked_layers(model: nn.Module, target_modules: Union[None, str, Sequence[str]] = None
                   ) -> dict[str, tuple[str, nn.Module]]:
    """``{canonical name: (kind, module)}`` of the layers a :class:`TrajectoryCallback` follows.

    SORSA and PEFT LoRA layers are found by type; without either, the ``nn.Linear``
    layers named by ``target_modules`` (as :func:`~sorsa_kernels.apply_sorsa` matches
    them) are followed as fully trained weights.
    """
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, SORSALinear):
            found[canonical_name(name)] = ("sorsa", module)
        elif _is_peft_lora(module):
            found[canonical_name(name)] = ("lora", module)
    if found:
        return found
    if target_modules is None:
        raise ValueError("the model has no SORSA or PEFT LoRA layers; pass target_modules= to follow "
                         "fully trained nn.Linear layers")
    return {canonical_name(n): ("linear", model.get_submodule(n)) for n in find_targets(model, target_modules)}


def _active(module: nn.Module) -> list[str]:
    names = getattr(module, "active_adapters", None) or getattr(module, "active_adapter", None) or []
    names = [names] if isinstance(names, str) else list(names)
    return [n for n in names if n in module.lora_A]


def _f64(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64)


def _lora_parts(module: nn.Module) -> list[tuple[Tensor, Tensor, float]]:
    """``[(B, A, scaling)]`` of every active adapter, float64 on the CPU, in (out, in) layout."""
    return [(_f64(module.lora_B[n].weight), _f64(module.lora_A[n].weight), float(module.scaling[n]))
            for n in _active(module)]


def _low_rank(kind: str, module: nn.Module, start: Any) -> tuple[Optional[Tensor], Tensor]:
    """``(low-rank part now, ΔW since the start)`` of one layer, float64 on the CPU."""
    if kind == "sorsa":
        U, S, V = (_f64(t) for t in (module.U, module.S, module.V))
        U0, S0, V0 = start
        part = (U * (S * module.scale)) @ V.T
        return part, part - (U0 * (S0 * module.scale)) @ V0.T
    if kind == "lora":
        part = sum(s * (B @ A) for B, A, s in _lora_parts(module))
        part0 = sum(s * (B @ A) for B, A, s in start)
        if getattr(module, "fan_in_fan_out", False):  # Conv1D layout (in, out): compare in (out, in)
            part, part0 = part.T, part0.T
        return part, part - part0
    return None, _f64(module.weight) - start


def _start(kind: str, module: nn.Module) -> Any:
    """What ΔW is measured from: the initial factors (SORSA, LoRA) or the starting weight."""
    if kind == "sorsa":
        if module.init_factors is None:
            raise ValueError("a SORSA layer has no initial factors (init_factors); cannot measure its drift")
        return tuple(t.double() for t in module.init_factors)
    if kind == "lora":
        return _lora_parts(module)
    return _f64(module.weight)


def _reconstructed_w0(kind: str, module: nn.Module, start: Any) -> Tensor:
    """The pretrained weight rebuilt from the layer itself (when none is given)."""
    if kind == "sorsa":
        U0, S0, V0 = start
        return _f64(module.dense_residual()) + (U0 * (S0 * module.scale)) @ V0.T
    if kind == "lora":
        w = _f64(module.base_layer.weight)
        part0 = sum(s * (B @ A) for B, A, s in start)
        return w + (part0.T if getattr(module, "fan_in_fan_out", False) else part0)
    return start.clone()


def _factors(kind: str, module: nn.Module) -> list[Tensor]:
    if kind == "sorsa":
        return [_f64(module.U), _f64(module.V)]
    if kind == "lora":
        return [m for B, A, _ in _lora_parts(module) for m in (B, A.T)]
    return []


def _orthonormality(mats: list[Tensor]) -> Optional[float]:
    if not mats:
        return None
    eye = {}
    vals = []
    for X in mats:
        r = X.shape[1]
        eye.setdefault(r, torch.eye(r, dtype=torch.float64))
        vals.append(torch.linalg.matrix_norm(X.T @ X - eye[r]))
    return float(torch.stack(vals).mean())


class TrajectoryCallback(TrainerCallback):
    """Records loss, orthonormality and ΔΣ/ΔD (paper Eq. 1–4) every ``every`` steps of a Trainer run.

    Args:
        every: record after every ``every``-th optimizer step; the start (step 0) and the last
            step are always recorded.  At each record step the callback asks the Trainer to
            log, so ``train_loss`` is the Trainer's mean training loss since its previous log.
        pretrained: ``{layer name: pretrained weight}`` (names without PEFT's
            ``base_model.model.`` prefix).  Give it to measure every method against the very
            same ``W0``; without it ``W0`` is rebuilt from each layer at the start of training
            (the SORSA/PiSSA residual plus the initial factors, LoRA's base weight).
        target_modules: the ``nn.Linear`` layers to follow when the model has no SORSA or
            PEFT LoRA layers (full fine-tuning); matched as :func:`~sorsa_kernels.apply_sorsa` does.
        evaluate: ``evaluate(model) -> dict`` of extra metrics merged into a record (e.g.
            held-out loss and exact match); called on the first, the last and every
            ``evaluate_every``-th record, in eval mode under ``torch.no_grad``.
        evaluate_every: see ``evaluate``.
        drift: compute ΔΣ/ΔD (one float64 SVD per layer per record, plus ``W0``'s once; set
            False for large models if that is too slow).
        svd_cache: ``{(layer name, shape): Spectrum}`` of the pretrained weights, filled on first
            use; share one dict between callbacks that measure against the same ``W0``.
        start_metrics: the ``evaluate`` result of the pretrained model, used for the step-0
            record instead of calling ``evaluate`` (every method starts from the same function,
            so a comparison evaluates it once).

    ``records`` is a list of dicts with ``step``, ``train_loss``, ``learning_rate``,
    ``orthonormality``, ``adapter_norm``, ``relative_change``, ``delta_sigma`` and ``delta_d``
    (means over the layers), ``layers`` (``{name: {"delta_sigma", "delta_d"}}``) and the
    ``evaluate`` keys; ``record_seconds``, ``evaluate_seconds`` and ``step_seconds`` time them.  ΔW is taken against the factors at the
    start of this ``train()`` call: attach the callback before training starts.

    Example::

        >>> from sorsa_kernels import TrajectoryCallback
        >>> recorder = TrajectoryCallback(every=50)
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[recorder])
        >>> trainer.train()
        >>> [(r["step"], round(r["delta_d"], 4)) for r in recorder.records][:2]
        [(0, 0.0), (50, 0.0123)]
    """

    def __init__(
        self,
        every: int = 25,
        *,
        pretrained: Optional[Mapping[str, Tensor]] = None,
        target_modules: Union[None, str, Sequence[str]] = None,
        evaluate: Optional[Callable[[nn.Module], Mapping[str, float]]] = None,
        evaluate_every: int = 1,
        drift: bool = True,
        svd_cache: Optional[MutableMapping[tuple, Spectrum]] = None,
        start_metrics: Optional[Mapping[str, float]] = None,
    ) -> None:
        if not isinstance(every, int) or every <= 0:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        if not isinstance(evaluate_every, int) or evaluate_every <= 0:
            raise ValueError(f"evaluate_every must be a positive number of records, got {evaluate_every}")
        self.every = every
        self.pretrained = pretrained
        self.target_modules = target_modules
        self.evaluate = evaluate
        self.evaluate_every = evaluate_every
        self.drift = drift
        self.svd_cache: MutableMapping[tuple, Spectrum] = {} if svd_cache is None else svd_cache
        self.start_metrics = dict(start_metrics) if start_metrics is not None else None
        self.records: list[dict[str, Any]] = []
        self.record_seconds = 0.0
        self.evaluate_seconds = 0.0
        self.step_seconds: list[float] = []
        self._step_start: Optional[float] = None
        self._layers: dict[str, tuple[str, nn.Module, Any, Tensor]] = {}

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._layers = {}
        self.records = []
        self.record_seconds = self.evaluate_seconds = 0.0
        self.step_seconds = []
        for name, (kind, module) in tracked_layers(model, self.target_modules).items():
            start = _start(kind, module)
            if self.pretrained is not None:
                if name not in self.pretrained:
                    raise ValueError(f"pretrained weights have no entry for layer {name}")
                w0 = self.pretrained[name].detach()  # a reference, not a copy: read once per record
                if getattr(module, "fan_in_fan_out", False):
                    w0 = w0.T
            else:
                w0 = _reconstructed_w0(kind, module, start)
            self._layers[name] = (kind, module, start, w0)
        self._record(model, state.global_step, final=False)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._step_start is not None:
            self.step_seconds.append(time.perf_counter() - self._step_start)
            self._step_start = None
        step = state.global_step
        last = state.max_steps > 0 and step >= state.max_steps
        if step % self.every == 0 or last:
            self._record(model, step, final=last)
            control.should_log = True  # the training loss of exactly this step's window
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and self.records and self.records[-1]["step"] == state.global_step:
            rec = self.records[-1]
            if "loss" in logs:
                rec["train_loss"] = float(logs["loss"])
            if "learning_rate" in logs:
                rec["learning_rate"] = float(logs["learning_rate"])
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # A run stopped early (epochs, or control.should_training_stop) still ends with a record.
        if self.records and self.records[-1]["step"] != state.global_step:
            self._record(model, state.global_step, final=True)
        return control

    # ------------------------------------------------------------------ measuring
    def measure(self) -> dict[str, Any]:
        """Orthonormality, adapter norm and ΔΣ/ΔD of the followed layers, now."""
        ortho, norms, changes, layers = [], [], [], {}
        for name, (kind, module, start, w0) in self._layers.items():
            part, delta = _low_rank(kind, module, start)
            ortho.extend(_factors(kind, module))
            w0 = _f64(w0)
            w0_norm = float(torch.linalg.matrix_norm(w0))
            if part is not None:
                norms.append(float(torch.linalg.matrix_norm(part)) / w0_norm)
            changes.append(float(torch.linalg.matrix_norm(delta)) / w0_norm)
            if self.drift:
                if not bool(delta.any()):  # untouched: exactly no drift, not the SVD's rounding
                    layers[name] = {"delta_sigma": 0.0, "delta_d": 0.0}
                    continue
                key = (name, tuple(w0.shape))  # a Conv1D layer is seen transposed by PEFT
                if key not in self.svd_cache:
                    self.svd_cache[key] = spectrum(w0)
                d = drift_from(w0 + delta, self.svd_cache[key])
                layers[name] = {"delta_sigma": d.delta_sigma, "delta_d": d.delta_d}
        out: dict[str, Any] = {
            "orthonormality": _orthonormality(ortho),
            "adapter_norm": sum(norms) / len(norms) if norms else None,
            "relative_change": sum(changes) / len(changes) if changes else None,
        }
        if self.drift:
            out["delta_sigma"] = sum(v["delta_sigma"] for v in layers.values()) / len(layers)
            out["delta_d"] = sum(v["delta_d"] for v in layers.values()) / len(layers)
            out["layers"] = layers
        return out

    def _record(self, model, step: int, final: bool) -> None:
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"step": int(step), "train_loss": None, "learning_rate": None}
        rec.update(self.measure())
        t1 = time.perf_counter()
        self.record_seconds += t1 - t0
        if self.evaluate is not None and (final or len(self.records) % self.evaluate_every == 0):
            if not self.records and self.start_metrics is not None:
                rec.update(self.start_metrics)
            else:
                was_training = model.training
                model.eval()
                try:
                    with torch.no_grad():
                        rec.update({k: float(v) for k, v in self.evaluate(model).items()})
                finally:
                    model.train(was_training)
        self.records.append(rec)
        self.evaluate_seconds += time.perf_counter() - t1
