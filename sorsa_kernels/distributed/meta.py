"""A transformers model skeleton with its parameters on the meta device (buffers real)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

__all__ = ["empty_model"]


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device; buffers stay real.

    Constructors allocate each weight with ``torch.empty`` (no pages touched) before it is
    registered, so the transient cost is one uninitialized tensor at a time.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(config: Any, *, cls: Optional[type] = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A transformers model built from ``config`` with its parameters on the meta device.

    ``cls`` is the model class (default ``AutoModelForCausalLM``); buffers (rotary tables)
    are real CPU tensors.  Fill it with ``load_state_dict(..., assign=True)``.
    """
    with _parameters_on_meta():
        if cls is None:
            from transformers import AutoModelForCausalLM

            kw = {} if dtype is None else {"dtype": dtype}
            return AutoModelForCausalLM.from_config(config, **kw)
        return cls(config)
