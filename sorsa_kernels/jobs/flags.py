"""Command-line flags generated from the jobs' config dataclasses: the one place a config field
becomes a flag, its ``--help`` line, and a config again.

An option is declared once, as a field of ``FinetuneConfig``, ``CompareConfig`` or ``PlanConfig``
(:func:`sorsa_kernels.jobs.options.option`); :func:`add_options` builds its flag, :func:`cli_name`
names it in errors and help text, and :func:`config_from_args` turns parsed arguments back into the
config.  Nothing here imports torch until a config class is asked for.

Example::

    >>> p = argparse.ArgumentParser()
    >>> add_options(p, PlanConfig)
    >>> config_from_args(p.parse_args(["--model", "m"]), PlanConfig).model
    'm'
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

__all__ = ["add_options", "cli_name", "cli_text", "config_classes", "config_from_args"]


def config_classes() -> tuple[type, type, type]:
    """``(FinetuneConfig, CompareConfig, PlanConfig)``: the configs whose fields are flags."""
    from .compare.config import CompareConfig
    from .finetune.config import FinetuneConfig
    from .plan import PlanConfig

    return FinetuneConfig, CompareConfig, PlanConfig


def _config_fields() -> dict[str, dataclasses.Field]:
    """Every option field of the finetune, compare and plan configs, by name."""
    return {f.name: f for cls in config_classes() for f in dataclasses.fields(cls)}


def cli_name(field: str, form: str, value: Any) -> str:
    """How the command line names a config field: the one place field names become flags.

    ``form`` is that of a :class:`~sorsa_kernels.jobs.options.ConfigError`
    template: ``""`` the setting (``learning-rate``), ``"flag"`` the option (``--fsdp``),
    ``"given"`` the option as given (``--quantize nf4``, ``--no-eval``).

    Example::

        >>> cli_name("learning_rate", "flag", None)
        '--learning-rate'
    """
    from .options import is_switch, option_flags

    f = _config_fields().get(field)
    if f is None:  # not an option: a plain value name
        return field
    flag = option_flags(f)[0]
    if form == "flag" or form == "given" and is_switch(f):
        return flag
    if form == "given":
        return " ".join([flag, *map(str, value if isinstance(value, (list, tuple)) else [value])])
    return flag[2:]


def cli_text(template: str, **values: Any) -> str:
    """``template`` with its ``{field:form}`` placeholders named as the command line names them.

    Example::

        >>> cli_text("write to {output_dir:flag}")
        'write to --output-dir'
    """
    from .options import render

    return render(template, cli_name, **values)


def _shown(value: Any) -> str:
    """A default as ``--help`` shows it: ``4e-4`` rather than ``0.0004``, ``1`` rather than ``1.0``."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    if not isinstance(value, float):
        return str(value)
    plain = f"{value:g}"
    mantissa, _, exponent = f"{value:e}".partition("e")
    short = f"{float(mantissa):g}e{int(exponent)}"
    return short if len(short) < len(plain) and float(short) == value else plain


def _help(f: dataclasses.Field) -> str:
    """A field's ``--help`` line: its help, then its default (the value; the paper's and the
    embedded model's; or ``shown``)."""
    from .options import field_default, is_switch

    meta = f.metadata
    shown = meta.get("shown")
    if shown is None and "paper" in meta:
        shown = "{paper}" if meta["paper"] == meta["embedded"] else "{paper}; embedded {embedded}"
    elif shown is None and field_default(f) is not None and not is_switch(f):
        shown = _shown(field_default(f)).replace("{", "{{").replace("}", "}}")  # a value, not a template
    text = meta["help"] + (f" (default: {shown})" if shown else "")
    values = {k: _shown(meta[k]) for k in ("paper", "embedded") if k in meta}
    return cli_text(text, **values).replace("%", "%%")


def add_options(p: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per option field of ``config_class``, generated from the field (``dest`` is its name).

    Example::

        >>> add_options(argparse.ArgumentParser(), PlanConfig)
    """
    from .options import allowed_values, field_default, is_switch, option_flags

    hints = typing.get_type_hints(config_class)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(config_class):
        meta = f.metadata
        if meta.get("internal"):
            continue
        if meta["group"] not in groups:
            groups[meta["group"]] = p.add_argument_group(meta["group"])
        kwargs: dict[str, Any] = dict(dest=f.name, default=field_default(f), help=_help(f))
        if is_switch(f):
            kwargs["action"] = "store_false" if field_default(f) else "store_true"
        else:
            kind = next((t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t in (int, float)), None)
            if kind is not None:
                kwargs["type"] = kind
            if isinstance(meta.get("choices"), tuple):  # a function's choices are checked by the config
                kwargs["choices"] = allowed_values(f)
            for key in ("nargs", "metavar"):
                if key in meta:
                    kwargs[key] = meta[key]
        groups[meta["group"]].add_argument(*option_flags(f), **kwargs)


def config_from_args(args: argparse.Namespace, config_class: type) -> Any:
    """``config_class`` from parsed arguments: every option's ``dest`` is a field; the parser's own
    entries (``command``, ``run``) and other configs' options are left out."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})
