"""Optimizer state and step temporaries per trainable tensor, for each ``--optim`` choice.

* ``adamw`` — ``torch.optim.AdamW``: ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype, a
  float32 ``step`` per tensor; on a GPU its ``foreach`` step makes one temporary list the size of
  the parameters (``sqrt(exp_avg_sq)``), or, stepping one tensor at a time (gradient release),
  one tensor's worth.
* ``adamw8bit`` / ``paged_adamw8bit`` — bitsandbytes ``AdamW8bit``: tensors of at least
  ``min_8bit_size`` = 4096 elements keep two uint8 states and a float32 absmax per 256-element
  block for each; smaller tensors (every ``S`` vector, small ``U``/``V``) keep two float32 states;
  the two 256-entry quantization maps are shared.  The update runs in one kernel per tensor:
  no temporaries.  The paged variant puts states of at least 100,000 elements in unified
  memory, which the driver moves to the host under pressure (on a CPU it falls back to the
  non-paged one, with a warning); the plan counts them in ``optimizer_state`` and lists
  them as ``paged``, outside the peak that must fit.
"""
from __future__ import annotations

__all__ = ["OPTIMIZERS", "MIN_8BIT_SIZE", "state_bytes", "paged_bytes", "step_temporary_bytes", "shared_bytes"]

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
#: bitsandbytes' default ``min_8bit_size``: smaller tensors keep float32 state.
MIN_8BIT_SIZE = 4096
_BLOCK = 256
_PAGED_MIN = 100_000


def _check(optim: str) -> None:
    if optim not in OPTIMIZERS:
        raise ValueError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {optim!r}")


def state_bytes(optim: str, numel: int, element_size: int) -> int:
    """Optimizer state bytes of one trainable tensor of ``numel`` elements."""
    _check(optim)
    if optim == "adamw":
        return 2 * numel * element_size + 4
    if numel < MIN_8BIT_SIZE:
        return 2 * numel * 4
    return 2 * numel + 2 * 4 * -(-numel // _BLOCK)


def paged_bytes(optim: str, numel: int, element_size: int) -> int:
    """The part of :func:`state_bytes` in unified (paged) memory."""
    if optim == "paged_adamw8bit" and numel >= _PAGED_MIN:
        return state_bytes(optim, numel, element_size) - 2 * 4 * -(-numel // _BLOCK)
    return 0


def shared_bytes(optim: str) -> int:
    """State shared by all tensors: bitsandbytes' two 256-entry float32 quantization maps."""
    _check(optim)
    return 0 if optim == "adamw" else 2 * 256 * 4


def step_temporary_bytes(optim: str, trainable_bytes: int, largest_bytes: int, foreach: bool) -> int:
    """Temporaries of one optimizer step: AdamW's ``sqrt(exp_avg_sq)`` list (all trainable bytes
    with ``foreach``, else the largest tensor's); none for bitsandbytes' fused 8-bit update."""
    _check(optim)
    if optim != "adamw":
        return 0
    return trainable_bytes if foreach else largest_bytes
