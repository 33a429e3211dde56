"""Adapter files, the public face: :func:`save_adapter`, :func:`load_adapter`, :func:`read_adapter`.

One self-describing ``adapter.safetensors`` (+ a readable ``adapter_config.json``) per adapter.
The parts live beside this module, each changing for its own reason:

- :mod:`.adapter_format`: the file schema, its constants and validation (:class:`AdapterError`);
- :mod:`.adapter_save`: collecting the tensors and the publication protocol (a kill leaves
  the old or the new adapter, never a mix);
- :mod:`.adapter_load`: reading, checking against the base model, rebuilding the layers.

Every adapter layer is stored and rebuilt as its kind describes it
(:class:`~sorsa_kernels.nn.kinds.AdapterKind`): SORSA, QSORSA, their experts, or a kind
registered from outside the package.
"""
from __future__ import annotations

from .adapter_format import (CONFIG_NAME, FORMAT, FORMAT_VERSION, METADATA_KEY, WEIGHTS_NAME, AdapterError,
                             validate_adapter)
from .adapter_load import load_adapter, read_adapter
from .adapter_save import save_adapter

__all__ = [
    "AdapterError",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "METADATA_KEY",
    "FORMAT",
    "FORMAT_VERSION",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "validate_adapter",
]
