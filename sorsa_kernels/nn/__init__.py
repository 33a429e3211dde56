"""The modules users touch.  Importing this package imports both layer modules, so the
factory (:mod:`.factory`) knows every residual storage before anyone can call it."""
from .experts import SORSAExperts
from .factory import make_sorsa_linear
from .linear import SORSALinear
from .qexperts import QSORSAExperts
from .qlinear import QSORSALinear
from .regularizer import add_regularizer_grad, adapter_matrices, orthonormal_regularizer

__all__ = [
    "SORSALinear",
    "QSORSALinear",
    "SORSAExperts",
    "QSORSAExperts",
    "make_sorsa_linear",
    "add_regularizer_grad",
    "adapter_matrices",
    "orthonormal_regularizer",
]
