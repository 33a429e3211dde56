"""sorsa-kernels: fast SORSA fine-tuning.

Fused Triton kernels for the SORSA linear layer and its orthonormal regularizer,
QSORSA (NF4 residual), model surgery for Hugging Face ``transformers`` models,
adapter files, and export to a standard PEFT LoRA adapter.

Example::

    >>> import sorsa_kernels
    >>> spec = sorsa_kernels.SORSAInit(rank=8, alpha=16.0)   # the init options, declared once
    >>> sorsa_kernels.apply_sorsa(model, spec)                # same as apply_sorsa(model, 8, alpha=16.0)
"""
import logging as _logging

from ._version import __version__


class _DropBitsandbytesKernelNoise(_logging.Filter):
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning.

    transformers' Trainer imports bitsandbytes whenever it is installed, and on CPUs with
    AVX512-BF16 bitsandbytes then tries to fetch an optional kernel from the Hub and warns
    when it cannot — before every command and every error, QSORSA or not.  This package
    never uses that kernel (QSORSA has its own NF4 GEMM), so the line says nothing to our
    users.  The filter sits on that one logger and drops only that message; importing
    :mod:`sorsa_kernels` never imports bitsandbytes itself (only QSORSA's bitsandbytes
    interop does, lazily).
    """

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBitsandbytesKernelNoise())
#: Public name → the module that defines it.  Nothing below is imported until first use
#: (PEP 562), so ``import sorsa_kernels`` and the console script's ``--help`` do not load torch.
_EXPORTS = {
    "SORSALinear": ".nn.linear",
    "QSORSALinear": ".nn.qlinear",
    "QuantReport": ".quant",
    "SORSAInit": ".nn.init_spec",
    "orthonormal_regularizer": ".nn.regularizer",
    "add_regularizer_grad": ".nn.regularizer",
    "apply_sorsa": ".adapters.surgery",
    "merge_sorsa": ".adapters.surgery",
    "DEFAULT_TARGET_MODULES": ".adapters.surgery",
    "adaptation_summary": ".adapters.summary",
    "AdaptationSummary": ".adapters.summary",
    "save_adapter": ".adapters.adapter_io",
    "load_adapter": ".adapters.adapter_io",
    "export_peft_lora": ".adapters.peft_export",
    "singular_drift": ".adapters.analysis",
    "model_singular_drift": ".adapters.analysis",
    "SingularDrift": ".adapters.analysis",
    "SORSACallback": ".training.callbacks",
    "TrajectoryCallback": ".training.drift_callback",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sorsa_kernels' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


#: Every public name: the version and the lazy exports above (one list, so the two cannot drift).
__all__ = ["__version__", *_EXPORTS]
