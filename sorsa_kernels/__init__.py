"""sorsa-kernels: fast SORSA fine-tuning.

Fused Triton kernels for the SORSA linear layer and its orthonormal regularizer,
QSORSA (NF4 residual), model surgery for Hugging Face ``transformers`` models,
adapter files, and export to a standard PEFT LoRA adapter.
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


__all__ = [
    "__version__",
    "SORSALinear",
    "QSORSALinear",
    "QuantReport",
    "apply_sorsa",
    "merge_sorsa",
    "DEFAULT_TARGET_MODULES",
    "adaptation_summary",
    "AdaptationSummary",
    "orthonormal_regularizer",
    "add_regularizer_grad",
    "SORSACallback",
    "TrajectoryCallback",
    "save_adapter",
    "load_adapter",
    "export_peft_lora",
    "singular_drift",
    "model_singular_drift",
    "SingularDrift",
]
