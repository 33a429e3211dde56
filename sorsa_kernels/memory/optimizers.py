"""Optimizer state and step temporaries per trainable tensor, for each ``--optim`` choice, as
:func:`sorsa_kernels.training.optim.make_optimizer` builds them.

* ``adamw`` — ``torch.optim.AdamW``: ``exp_avg`` and ``exp_avg_sq`` in the dtype the step sees
  (float32 for bf16 adapters, which are stepped in float32), a float32 ``step`` per tensor; on a
  GPU its ``foreach`` step makes one temporary list the size of the parameters
  (``sqrt(exp_avg_sq)``), or, stepping one tensor at a time (on the CPU, or under gradient
  release), one tensor's worth.
* ``adamw8bit`` / ``paged_adamw8bit`` — bitsandbytes ``AdamW8bit`` with ``min_8bit_size`` = 0:
  every trainable **matrix** (U, V, their expert stacks) keeps two uint8 states and a float32
  absmax per 256-element block for each (2 B per element + 8 B per 256 elements), whatever its
  size; SORSA's ``S`` (also an expert stack's E×r) and every vector keep two float32 states
  (8 B per element).  Each optimizer holding 8-bit state keeps two 256-entry float32 quantile
  maps (2 KiB): one optimizer for the model, or one per tensor under gradient release.  The
  update runs in one kernel per tensor: no temporaries.  The paged variant puts states of at
  least 100,000 elements in unified memory, which the driver moves to the host under pressure
  (on a CPU it falls back to the non-paged one, with a warning); the plan counts them in
  ``optimizer_state`` and lists them as ``paged``, outside the peak that must fit.
* bf16 adapters are stepped in float32 and stochastically rounded back: during the step each
  has a float32 copy of itself and of its gradient (8 B per element), every adapter at once
  (each bf16 gradient but the last dropped as its copy is made: 6 B more per element), or one at
  a time under gradient release, beside the bf16 gradients of its module; there the float32
  gradient counts as a gradient (:func:`gradient_copy_bytes`), the parameter's copy as a step
  temporary.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

__all__ = ["OPTIMIZERS", "Trainable", "state_bytes", "paged_bytes", "step_temporary_bytes", "shared_bytes",
           "gradient_copy_bytes"]

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
_BLOCK = 256
_PAGED_MIN = 100_000
#: bitsandbytes' two 256-entry float32 quantile maps, per optimizer with 8-bit state.
_QMAPS = 2 * 256 * 4


class Trainable(NamedTuple):
    """One trainable tensor as the optimizer sees it (on this rank)."""

    numel: int
    element_size: int
    bf16: bool     # stepped in float32 and rounded back (make_optimizer's stochastic rounding)
    matrix: bool   # 8-bit state under adamw8bit (not S, not a vector)

    @property
    def step_element_size(self) -> int:
        """Bytes per element of the tensor the optimizer steps (and of AdamW's state)."""
        return 4 if self.bf16 else self.element_size


def _check(optim: str) -> None:
    if optim not in OPTIMIZERS:
        raise ValueError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {optim!r}")


def _blocks(numel: int) -> int:
    return -(-numel // _BLOCK)


def state_bytes(optim: str, t: Trainable) -> int:
    """Optimizer state bytes of one trainable tensor."""
    _check(optim)
    if optim == "adamw":
        return 2 * t.numel * t.step_element_size + 4
    if not t.matrix:
        return 2 * t.numel * 4
    return 2 * t.numel + 2 * 4 * _blocks(t.numel)


def paged_bytes(optim: str, t: Trainable) -> int:
    """The part of :func:`state_bytes` in unified (paged) memory (the states, not their absmax)."""
    if optim == "paged_adamw8bit" and t.numel >= _PAGED_MIN:
        return state_bytes(optim, t) - (2 * 4 * _blocks(t.numel) if t.matrix else 0)
    return 0


def shared_bytes(optim: str, trainable: Sequence[Trainable], per_tensor: bool) -> int:
    """Bitsandbytes' quantile maps: 2 KiB per optimizer holding 8-bit state (``per_tensor``: one
    optimizer per tensor, as gradient release builds)."""
    _check(optim)
    matrices = sum(1 for t in trainable if t.matrix)
    if optim == "adamw" or not matrices:
        return 0
    return _QMAPS * (matrices if per_tensor else 1)


def step_temporary_bytes(optim: str, trainable: Sequence[Trainable], foreach: bool, per_tensor: bool) -> int:
    """Temporaries of one optimizer step: the float32 copies of bf16 adapters and their gradients
    (less their bf16 gradients), and AdamW's ``sqrt(exp_avg_sq)`` (every tensor with ``foreach``, else
    one); ``per_tensor``: one tensor stepped at a time (gradient release)."""
    _check(optim)
    adam = [t.numel * t.step_element_size if optim == "adamw" else 0 for t in trainable]
    if per_tensor:  # the float32 parameter copy; its gradient's is in gradient_copy_bytes
        return max((4 * t.numel * t.bf16 + a for t, a in zip(trainable, adam)), default=0)
    widen = sum((8 - 2) * t.numel for t in trainable if t.bf16)
    return widen + (sum(adam) if foreach else max(adam, default=0))


def gradient_copy_bytes(trainable: Sequence[Trainable], per_tensor: bool) -> int:
    """Under gradient release (``per_tensor``), the float32 copy of the largest bf16 adapter's
    gradient, made beside its module's bf16 gradients while it steps; 0 otherwise (the copies
    of a whole-model step are in :func:`step_temporary_bytes`)."""
    return max((4 * t.numel for t in trainable if t.bf16), default=0) if per_tensor else 0
