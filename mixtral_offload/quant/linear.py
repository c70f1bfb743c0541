"""Weights as layers the model calls, `layer(x)` = x @ W.T: float tensors, or int8 per group on the CPU.

`--dense int8` quantizes the attention projections and the output head at load, one tensor at a time
as they are read (round-to-nearest, symmetric, groups of 64 along the input: llama.cpp's Q8_0 with a
float16 scale); decode then reads 1.03 bytes per weight instead of 2. The model never asks which it has.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .format import QuantizedMatrix, QuantSpec, packed_nbytes, part_layout
from .kernels import linear_kernel
from .quantize import dequantize, quantize

DENSE_SPEC = QuantSpec(bits=8, group_size=64)
QUANTIZED_DENSE = ("wq", "wk", "wv", "wo", "lm_head")  # runtime names (last part); embed and router stay
QUANTIZE_ELEMENTS = 1 << 22  # weights quantized per step: a 16 MB float32 chunk


class Linear(Protocol):
    """A weight [out, in] the model multiplies by: `layer(x)` is x [T, in] @ W.T -> [T, out] in x's dtype."""

    shape: torch.Size
    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype to multiply x's rows in: float32 for several float16 rows on the CPU, else x's own.

    torch's CPU float16 GEMM is several times slower than float32 (BENCHMARKS.md), while a float16 GEMV
    (one row) is memory-bound and the fastest; float16 -> float32 is exact, both accumulate in float32.
    """
    if x.dtype == torch.float16 and x.device.type == "cpu" and x.dim() >= 2 and x.shape[-2] > 1:
        return torch.float32
    return x.dtype


class TensorLinear:
    """A float weight held as a torch tensor (any device), multiplied in compute_dtype."""

    def __init__(self, weight: torch.Tensor):
        self.weight, self.shape = weight, weight.shape
        self.nbytes = weight.numel() * weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        if dtype == x.dtype:
            return F.linear(x, self.weight)
        return F.linear(x.to(dtype), self.weight.to(dtype)).to(x.dtype)


class QuantizedLinear:
    """A weight held quantized per group, multiplied by the CPU kernel chosen at construction."""

    def __init__(self, matrix: QuantizedMatrix, activations: str = "int8"):
        self.matrix, self.activations = matrix, activations
        self.shape = torch.Size(matrix.shape)
        self.nbytes = matrix.nbytes
        self.kernel = linear_kernel(matrix.spec, matrix.cols, activations)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = np.ascontiguousarray(x.detach().to(torch.float32).numpy())
        return torch.from_numpy(self.kernel(self.matrix, x32)).to(x.dtype)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the kernels see it, [out, in] (for tests and references)."""
        return torch.from_numpy(dequantize(self.matrix)).to(dtype)


def is_quantized_dense(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the dense tensor of this runtime name ('layers.3.wq', 'lm_head') and shape is held as int8
    (its input width must be whole groups)."""
    return name.rsplit(".", 1)[-1] in QUANTIZED_DENSE and shape[-1] % DENSE_SPEC.group_size == 0


def quantize_dense(tensor: torch.Tensor, activations: str = "int8") -> QuantizedLinear:
    """The int8 form of one dense weight [out, in] (round-to-nearest: refinement gains little at 8 bits).

    Rows go QUANTIZE_ELEMENTS at a time, so the float32 copy a quantizer works on stays small (Mixtral's
    output head whole would be 0.5 GB more RSS during load than the memory plan counts).
    """
    rows, cols = tensor.shape
    parts = {name: np.empty(shape, dtype) for name, (dtype, shape) in part_layout(DENSE_SPEC, (rows, cols)).items()}
    step = max(1, QUANTIZE_ELEMENTS // cols)
    for start in range(0, rows, step):
        chunk = quantize(tensor[start:start + step].to(torch.float32).numpy(), DENSE_SPEC, refine=False)
        parts["codes"][start:start + step] = chunk.codes
        parts["scales"][start:start + step] = chunk.scales
    return QuantizedLinear(QuantizedMatrix.from_parts(DENSE_SPEC, (rows, cols), parts), activations)


def quantized_dense_bytes(shape: tuple[int, int]) -> int:
    """Bytes of one [out, in] weight in DENSE_SPEC: int8 codes and a float16 scale per group."""
    return packed_nbytes(DENSE_SPEC, shape)
