"""QSORSA: NF4 storage of the residual (bitsandbytes layout), bitsandbytes interop, and the
error-reducing initialization with its report.  bitsandbytes is imported lazily."""
from .init import LayerQuantReport, QuantReport, error_reducing_split, layer_quant_report, quantization_error
from .nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_bnb, quantize_nf4

__all__ = [
    "NF4Weight",
    "quantize_nf4",
    "dequantize_nf4",
    "dequantize_nf4_bnb",
    "LayerQuantReport",
    "QuantReport",
    "error_reducing_split",
    "layer_quant_report",
    "quantization_error",
]
