"""sorsa-kernels: fast SORSA fine-tuning (fused Triton kernels, QSORSA, PEFT export)."""
from .nn import SORSALinear, add_regularizer_grad, orthonormal_regularizer

__version__ = "0.1.0"

__all__ = ["SORSALinear", "add_regularizer_grad", "orthonormal_regularizer", "__version__"]
