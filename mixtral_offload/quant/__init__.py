"""Quantized expert formats (int2 / int3 / int4 / int8 per group), the quantizer, and Numba CPU kernels."""

from mixtral_offload.quant.format import QuantizedMatrix, QuantSpec, packed_nbytes, part_layout
from mixtral_offload.quant.kernels import dequantize_fast, expert_forward, matmul
from mixtral_offload.quant.quantize import dequantize, dequantize_torch, quantize, relative_error

__all__ = [
    "QuantSpec",
    "QuantizedMatrix",
    "part_layout",
    "packed_nbytes",
    "quantize",
    "dequantize",
    "dequantize_torch",
    "dequantize_fast",
    "relative_error",
    "matmul",
    "expert_forward",
]
