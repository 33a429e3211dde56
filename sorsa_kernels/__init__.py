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
from .integrations.adapters.adapter_io import load_adapter, save_adapter
from .integrations.analysis import SingularDrift, model_singular_drift, singular_drift
from .integrations.adapters.peft_export import export_peft_lora
from .integrations.adapters.summary import AdaptationSummary, adaptation_summary
from .integrations.adapters.surgery import DEFAULT_TARGET_MODULES, apply_sorsa, merge_sorsa
from .nn import SORSALinear, add_regularizer_grad, orthonormal_regularizer
from .nn.qlinear import QSORSALinear
from .quant import QuantReport


def __getattr__(name: str):
    # The Trainer callbacks import transformers' Trainer machinery; load it on first use.
    if name == "SORSACallback":
        from .integrations.training.trainer import SORSACallback

        return SORSACallback
    if name == "TrajectoryCallback":
        from .integrations.training.drift_callback import TrajectoryCallback

        return TrajectoryCallback
    raise AttributeError(f"module 'sorsa_kernels' has no attribute {name!r}")


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
