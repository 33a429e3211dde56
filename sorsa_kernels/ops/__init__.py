"""Autograd-aware ops that choose between Triton kernels and the PyTorch reference."""
from . import reference
from .dispatch import backend, use_triton
from .sorsa_linear import sorsa_linear

__all__ = ["reference", "backend", "use_triton", "sorsa_linear"]
