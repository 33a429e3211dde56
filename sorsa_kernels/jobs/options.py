"""A job's option, declared once: the dataclass field (after PEFT's ``tuners/lora/config.py``).

:func:`option` builds a field that carries the option's default, help text, command-line
spelling, ``--help`` section and allowed values; :func:`check_fields` applies the rules
every field carries (its numeric ``rule``, :class:`~sorsa_kernels.nn.knobs.Rule`, declared on
the field, or for the adapter's own knobs — ``rank``, ``alpha``, ``gamma``, … — the layers' rule
of that name in :data:`~sorsa_kernels.nn.knobs.KNOBS`; and ``choices``).  The command line's
flags, help text and defaults shown are generated from the fields (:mod:`sorsa_kernels.cli`);
nothing about an option is written a second time.

A bad setting is a :class:`ConfigError` whose message is a template naming fields, so a
Python caller reads field names and the command line reads its flags:

=================  =========================  ======================
template           Python                     command line
=================  =========================  ======================
``{rank}``         ``rank``                   ``rank``
``{fsdp:flag}``    ``fsdp``                   ``--fsdp``
``{svd:given}``    ``svd='randomized'``       ``--svd randomized``
=================  =========================  ======================

(``{learning_rate}`` reads ``learning-rate`` on the command line: a field is named by its
first flag.)  Any other ``{key}`` is a value passed to the error; ``{{`` and ``}}`` are
literal braces.  The command line renders the names in one place (``jobs.flags.cli_name``).

Example::

    >>> str(ConfigError("{fsdp:flag} needs {data:flag}"))
    'fsdp needs data'
"""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING
from typing import Any, Callable, Optional

from ..nn.knobs import KNOBS, Rule

__all__ = ["option", "ConfigError", "ConfigTypeError", "check_fields", "field_default", "field_rule", "option_flags",
           "allowed_values", "is_switch", "python_name", "render", "Namer"]

#: ``namer(field, form, value) -> str``: how a front end names a field; ``form`` is "", "flag" or "given".
Namer = Callable[[str, str, Any], str]


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, group: Optional[str] = None,
           flags: Optional[tuple[str, ...]] = None, choices: Any = None, nargs: Optional[str] = None,
           metavar: Optional[str] = None, shown: Optional[str] = None, paper: Any = MISSING,
           embedded: Any = MISSING, internal: bool = False, rule: Optional[Rule] = None) -> Any:
    """A dataclass field declaring one option of a job.

    Args:
        default, default_factory: as :func:`dataclasses.field`.
        help: what the option does, as a template (it may name other options: ``{data:flag}``).
            A switch's help says what its flag does (``--no-eval``: "skip the evaluation").
        group: the ``--help`` section that lists it.
        flags: its command-line spellings (default ``--field-name``); the first names it in
            messages.  A bool field is a switch: ``store_true`` when its default is False,
            else ``store_false``.
        choices: the allowed values: a tuple (the parser enforces it too) or a function
            returning one (checked on construction only: names another library owns).
        nargs, metavar: as argparse's.
        shown: what ``--help`` gives as the default (a template) when the value itself does not say it.
        paper, embedded: the values a ``None`` default takes for a real model (the paper's,
            Table 3) and for the embedded one.
        internal: True for a field without a flag (a test keeps every other field a flag).
        rule: what a number accepts (:class:`~sorsa_kernels.nn.knobs.Rule`: ``POSITIVE``, ``COUNT``, …);
            a field named as one of the layers' knobs (``rank``, ``alpha``, …) has that knob's rule.

    Example::

        >>> @dataclasses.dataclass
        ... class Job:
        ...     rank: Optional[int] = option(None, "adapter rank r", group="SORSA", paper=128, embedded=16)
    """
    metadata: dict[str, Any] = {"help": help, "internal": internal}
    for key, value in (("group", group), ("flags", flags), ("choices", choices), ("nargs", nargs),
                       ("metavar", metavar), ("shown", shown), ("rule", rule)):
        if value is not None:
            metadata[key] = value
    for key, value in (("paper", paper), ("embedded", embedded)):
        if value is not MISSING:
            metadata[key] = value
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def field_default(f: dataclasses.Field) -> Any:
    """The value a field takes when not given."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def field_rule(f: dataclasses.Field) -> Optional[Rule]:
    """The field's numeric rule: its own ``rule``, else the layers' knob of its name, else None."""
    return f.metadata.get("rule") or KNOBS.get(f.name)


def is_switch(f: dataclasses.Field) -> bool:
    """Whether the field is a bool, set by a flag without a value."""
    return isinstance(field_default(f), bool)


def option_flags(f: dataclasses.Field) -> tuple[str, ...]:
    """The field's command-line spellings: its ``flags``, else ``--field-name``."""
    return f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)


def allowed_values(f: dataclasses.Field) -> Optional[tuple]:
    """The field's ``choices`` as a tuple (calling a function), or None when any value goes."""
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


class ConfigError(ValueError):
    """A bad setting, its message a template naming fields (see the module docstring).

    ``str(error)`` names fields as Python does; :meth:`render` as a front end does.
    ``config`` gives the values ``{field:given}`` shows.
    """

    def __init__(self, template: str, config: Any = None, **values: Any) -> None:
        super().__init__(template)
        self.template, self.config, self.values = template, config, values

    def render(self, namer: Namer) -> str:
        return render(self.template, namer, self.config, **self.values)

    def __str__(self) -> str:
        return self.render(python_name)


class ConfigTypeError(ConfigError, TypeError):
    """A setting of the wrong type (``rank=2.5``)."""


def python_name(field: str, form: str, value: Any) -> str:
    """Fields as a Python caller names them: ``learning_rate``, ``quantize='nf4'``."""
    return f"{field}={value!r}" if form == "given" else field


class _Name:
    def __init__(self, field: str, namer: Namer, value: Any) -> None:
        self.field, self.namer, self.value = field, namer, value

    def __format__(self, form: str) -> str:
        return self.namer(self.field, form, self.value)


class _Names(dict):
    def __init__(self, namer: Namer, config: Any, values: dict) -> None:
        super().__init__(values)
        self.namer, self.config = namer, config

    def __missing__(self, key: str) -> _Name:
        return _Name(key, self.namer, getattr(self.config, key, None))


def render(template: str, namer: Namer, config: Any = None, **values: Any) -> str:
    """``template`` with its fields named by ``namer`` and its other ``{key}``s filled from ``values``."""
    return template.format_map(_Names(namer, config, values))


def _allowed_text(allowed: tuple) -> str:
    shown = [repr(v) for v in allowed]
    return " or ".join(shown) if len(shown) <= 2 else "one of " + ", ".join(shown)


def check_fields(config: Any) -> None:
    """Raise a :class:`ConfigError` for the first field of the dataclass ``config`` that breaks
    its rule: its numeric rule (:func:`field_rule`: finite, in range) or its ``choices`` (every
    item of a tuple value).  ``None`` passes."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        rule = field_rule(f)
        if rule is not None:
            problem = rule.problem(value)
            if problem is not None:
                kind, text = problem
                error = ConfigTypeError if kind is TypeError else ConfigError
                raise error("{" + f.name + "} {problem}", config, problem=text)
        allowed = allowed_values(f)
        if allowed is None or value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if item not in allowed:
                raise ConfigError("{" + f.name + "} must be {allowed}, got {item!r}", config,
                                  allowed=_allowed_text(allowed), item=item)
