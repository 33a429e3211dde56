"""The modules users touch."""
from .linear import SORSALinear
from .regularizer import add_regularizer_grad, adapter_matrices, orthonormal_regularizer

__all__ = ["SORSALinear", "add_regularizer_grad", "adapter_matrices", "orthonormal_regularizer"]
