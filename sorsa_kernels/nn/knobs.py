"""One rule table for every numeric knob, shared by the API and the command line.

Each knob (``alpha``, ``gamma``, ``lr_max``, ``learning_rate``, ``dropout``, batch sizes,
step counts, …) has one :class:`Rule`: integer or real, finite, and a range.
:func:`check_knob` applies it and raises a one-line error naming the knob, what is allowed
and the value given.  :meth:`SORSALinear.from_linear <sorsa_kernels.nn.linear.SORSALinear.from_linear>`,
:func:`sorsa_kernels.apply_sorsa`, :func:`sorsa_kernels.add_regularizer_grad`,
:class:`sorsa_kernels.SORSACallback` and the job configs (``FinetuneConfig``,
``CompareConfig``, on construction, through :func:`knob_problem`) all apply it, so
``--alpha 0`` on the command line and ``alpha=0.0`` in Python fail the same way, before
any model is loaded or any weight is touched.

Example::

    >>> check_knob("alpha", 0.0)
    Traceback (most recent call last):
    ValueError: alpha must be a positive finite number, got 0.0
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["Rule", "KNOBS", "check_knob", "check_knobs", "knob_problem", "representable_range", "check_scale",
           "check_gamma_rate"]


@dataclass(frozen=True)
class Rule:
    """What a knob accepts: an ``integer`` or a real number, finite, in ``[low, high]``
    (``low_open`` / ``high_open`` exclude the end), or one of ``also`` (e.g. ``-1``).

    ``optional`` lets ``None`` through (meaning "the default").  ``text`` is what the error
    message says is allowed (``"must be <text>"``).
    """

    text: str
    integer: bool = False
    low: Optional[float] = None
    low_open: bool = False
    high: Optional[float] = None
    high_open: bool = False
    also: tuple = ()
    optional: bool = True

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is allowed (``None`` only when the knob is optional)."""
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if value in self.also:
            return True
        if not math.isfinite(float(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


_POSITIVE = Rule("a positive finite number", low=0.0, low_open=True)
_NON_NEGATIVE = Rule("a non-negative finite number", low=0.0)
_COUNT = Rule("a positive integer", integer=True, low=1)
_NON_NEGATIVE_COUNT = Rule("a non-negative integer", integer=True, low=0)
_FRACTION = Rule("in [0, 1)", low=0.0, high=1.0, high_open=True)

#: Every numeric knob by its Python name (API argument or ``FinetuneConfig`` field).
KNOBS: dict[str, Rule] = {
    # the adapter
    "rank": _COUNT,
    "alpha": _POSITIVE,
    "dropout": _FRACTION,
    "niter": _NON_NEGATIVE_COUNT,
    "oversample": _NON_NEGATIVE_COUNT,
    "quant_iters": _NON_NEGATIVE_COUNT,
    # the regularizer
    "gamma": _NON_NEGATIVE,
    "lr_max": _POSITIVE,
    # the optimizer and schedule
    "learning_rate": _POSITIVE,
    "num_train_epochs": _POSITIVE,
    "max_steps": Rule("positive (or -1 for epochs)", integer=True, low=1, also=(-1,)),
    "warmup_ratio": _FRACTION,
    "weight_decay": _NON_NEGATIVE,
    "max_grad_norm": Rule("a non-negative finite number (0: no clipping)", low=0.0),
    "per_device_train_batch_size": _COUNT,
    "gradient_accumulation_steps": _COUNT,
    "eval_batch_size": _COUNT,
    "max_length": _COUNT,
    "loss_chunk_size": Rule("a non-negative integer (0: the whole sequence at once)", integer=True, low=0),
    # logging, evaluation, saving
    "logging_steps": _COUNT,
    "eval_steps": _COUNT,
    "save_steps": _COUNT,
    "save_total_limit": _COUNT,
    "eval_fraction": _FRACTION,
    "eval_samples": _NON_NEGATIVE_COUNT,
    "max_new_tokens": _COUNT,
    "pretrain_steps": _NON_NEGATIVE_COUNT,
    "record_every": Rule("a positive number of steps", integer=True, low=1),
    "seed": Rule("an integer in [0, 2**32)", integer=True, low=0, high=2**32, high_open=True),
}


def knob_problem(name: str, value: Any, required: bool = False) -> Optional[tuple[type, str]]:
    """What is wrong with ``value`` for ``KNOBS[name]``: ``(TypeError or ValueError, "must be …, got …")``,
    or None when it is allowed.  Lets a caller name the knob its own way (:func:`check_knob`
    by ``label``; a job's config by field, rendered per front end).

    Example::

        >>> knob_problem("rank", 0)
        (<class 'ValueError'>, 'must be a positive integer, got 0')
    """
    rule = KNOBS[name]
    if rule.accepts(value) and not (required and value is None):
        return None
    if value is None:
        return TypeError, f"must be {rule.text}, got None"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            rule.integer and not isinstance(value, numbers.Integral)):
        return TypeError, f"must be {rule.text}, got {type(value).__name__} {value!r}"
    return ValueError, f"must be {rule.text}, got {value!r}"


def check_knob(name: str, value: Any, label: Optional[str] = None, required: bool = False) -> None:
    """Raise a ValueError (TypeError for a non-number) unless ``value`` satisfies ``KNOBS[name]``.

    ``label`` is how the message names the knob (default ``name``).  ``None`` passes (it
    means "the default") unless ``required``.

    Example::

        >>> check_knob("learning_rate", float("nan"))
        Traceback (most recent call last):
        ValueError: learning_rate must be a positive finite number, got nan
    """
    problem = knob_problem(name, value, required)
    if problem is not None:
        kind, text = problem
        raise kind(f"{label or name} {text}")


def check_knobs(**values: Any) -> None:
    """:func:`check_knob` for each ``name=value`` (messages use the Python names)."""
    for name, value in values.items():
        check_knob(name, value)


# ---------------------------------------------------------------------- knobs bounded by the arithmetic
def representable_range(dtype: Any = None) -> tuple[float, float]:
    """``(low, high)`` = ``(1/√max, √max)`` of a floating dtype (default float32).

    A factor in this window keeps both it and its reciprocal, and a product of two such
    numbers, finite and normal in ``dtype``: float32/bfloat16 ≈ (5.4e-20, 1.8e19),
    float16 (2**-8, 2**8).
    """
    import torch

    high = math.sqrt(float(torch.finfo(dtype or torch.float32).max))
    return 1.0 / high, high


def _dtype_name(dtype: Any) -> str:
    return str(dtype or "torch.float32").replace("torch.", "")


def check_scale(alpha: Optional[float], rank: int, dtype: Any = None, label: str = "alpha") -> None:
    """Raise a ValueError unless ``scale = alpha / rank`` fits the adapter dtype's arithmetic.

    The layer stores ``S = σ / scale`` and computes ``scale·S``; outside
    :func:`representable_range` one of them overflows or underflows (``alpha=1e-38`` gives
    ``S = inf``, ``alpha=1e300`` gives ``S = 0`` and NaN outputs).  ``None`` (scale 1) passes.

    Example::

        >>> check_scale(1e300, 8)
        Traceback (most recent call last):
        ValueError: alpha 1e+300 gives scale alpha/rank = 1.25e+299, which float32 cannot hold with S = σ/scale; allowed: alpha/rank in [5.4e-20, 1.8e+19], i.e. alpha in [4.3e-19, 1.5e+20] for rank 8
    """
    check_knob("alpha", alpha, label)
    if alpha is None:
        return
    low, high = representable_range(dtype)
    scale = float(alpha) / rank
    if not low <= scale <= high:
        raise ValueError(
            f"{label} {alpha:g} gives scale alpha/rank = {scale:.3g}, which {_dtype_name(dtype)} cannot hold with "
            f"S = σ/scale; allowed: alpha/rank in [{low:.2g}, {high:.2g}], i.e. {label} in "
            f"[{low * rank:.2g}, {high * rank:.2g}] for rank {rank}"
        )


#: Bound on |∂‖UᵀU−I‖_F/∂U| per element (2·‖U‖₂ with ‖U‖₂ ≈ 1), with a margin of 4.
_REG_GRAD_BOUND = 8.0


def check_gamma_rate(gamma: float, lr_max: float, dtype: Any = None, label: str = "gamma") -> None:
    """Raise a ValueError unless the regularizer's gradient ``gamma/lr_max·∇`` can be held by the
    optimizer in ``dtype`` (default float32).

    AdamW keeps the squared gradient; once ``(gamma/lr_max·∇)²`` overflows, every update of U and V
    is 0 (``--gamma 1e30`` trains only S, silently).  Allowed: ``gamma/lr_max·8 ≤ √max(dtype)``.

    Example::

        >>> check_gamma_rate(1e30, 3e-5)
        Traceback (most recent call last):
        ValueError: gamma 1e+30 with learning rate 3e-05 scales the regularizer gradient by gamma/lr = 3.33e+34, which overflows float32 in the optimizer's squared gradient (U and V would stop training); allowed: gamma up to 6.9e+13 at this learning rate
    """
    check_knob("gamma", gamma, label, required=True)
    check_knob("lr_max", lr_max, required=True)
    high = representable_range(dtype)[1] / _REG_GRAD_BOUND
    if gamma / lr_max > high:
        raise ValueError(
            f"{label} {gamma:g} with learning rate {lr_max:g} scales the regularizer gradient by gamma/lr = "
            f"{gamma / lr_max:.3g}, which overflows {_dtype_name(dtype)} in the optimizer's squared gradient "
            f"(U and V would stop training); allowed: {label} up to {high * lr_max:.2g} at this learning rate"
        )
