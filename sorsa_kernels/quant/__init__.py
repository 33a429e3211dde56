"""QSORSA's storage: NF4 (bitsandbytes layout), bitsandbytes interop, a lazily dequantizing
dense view, and the quantization-error report.  A leaf: imports only torch (and
bitsandbytes, lazily); the error-reducing split, which needs the SVD of ``ops``, is
:func:`sorsa_kernels.nn.qinit.error_reducing_split`."""
from .dense_view import NF4DenseView
from .init import LayerQuantReport, QuantReport, layer_quant_report, quantization_error
from .nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_bnb, quantize_nf4

__all__ = [
    "NF4Weight",
    "NF4DenseView",
    "quantize_nf4",
    "dequantize_nf4",
    "dequantize_nf4_bnb",
    "LayerQuantReport",
    "QuantReport",
    "layer_quant_report",
    "quantization_error",
]
